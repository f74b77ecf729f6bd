"""2:4 semi-structured sparsity on CUDA: Linear weights as ``torch.sparse.SparseSemiStructuredTensor``.

In a 2:4 weight every group of 4 consecutive entries along the input dimension (a row of the [out, in] weight) keeps
at most 2 nonzeros; Ampere-or-newer NVIDIA GPUs multiply such a weight on their sparse tensor cores.
:func:`to_semi_structured` checks that pattern and torch's shape rules for each masked Linear, then swaps the weight
for ``torch.sparse.to_sparse_semi_structured(masked weight)`` (cuSPARSELt when torch has it, else CUTLASS), so
``F.linear`` dispatches to the sparse kernel. The checks (:func:`check_2to4`, :func:`semi_structured_problem`) run
anywhere; the conversion needs CUDA, fp16 or bf16, compute capability 8.0 or newer.

Timings: ``bench/bench_semi_structured_gpu.py`` (MiniLM, dense vs 2:4, batch 1/32/128, lengths 128/512).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import PrunekitError
from ..masks import Masks
from .convert import _candidates, _effective, _mask_dict

#: Minimum weight shape (rows, cols) per dtype, each dim a multiple of it, when torch's classes do not say.
_FALLBACK_MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128), torch.float32: (32, 32)},
}
DTYPES = (torch.float16, torch.bfloat16)


def backend() -> str:
    """``"cusparselt"`` when this torch build has cuSPARSELt, else ``"cutlass"``."""
    cslt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cslt is not None and cslt.is_available() else "cutlass"


def _tensor_class(which: str):
    sparse = torch.sparse
    return getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT" if which == "cusparselt"
                   else "SparseSemiStructuredTensorCUTLASS", None)


def min_shape(dtype: torch.dtype, which: str | None = None) -> tuple[int, int] | None:
    """torch's (rows, cols) block for a semi-structured weight of ``dtype`` on backend ``which`` (None: unsupported
    dtype): both weight dims must be at least, and a multiple of, these."""
    which = which or backend()
    cls = _tensor_class(which)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if isinstance(table, dict):
        c = table.get(dtype)
        return None if c is None else (int(c.sparse_min_rows), int(c.sparse_min_cols))
    return _FALLBACK_MIN_SHAPE[which].get(dtype)


def check_2to4(weight: torch.Tensor) -> str | None:
    """None when the 2-D ``weight`` [out, in] is 2:4 sparse along ``in`` (each group of 4 consecutive entries holds
    at most 2 nonzeros), else a sentence saying why not (shape, or the first offending group and its count)."""
    if weight.dim() != 2:
        return f"a 2:4 weight is 2-D [out, in], this one has shape {tuple(weight.shape)}"
    out_f, in_f = weight.shape
    if in_f % 4:
        return f"in_features {in_f} is not a multiple of 4, so it cannot be split into groups of 4"
    nz = (weight.detach() != 0).reshape(out_f, in_f // 4, 4).sum(-1)
    bad = nz > 2
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        return (f"{int(bad.sum())} of {nz.numel()} groups of 4 hold more than 2 nonzeros (first: row {r}, columns "
                f"{4 * g}-{4 * g + 3}, {int(nz[r, g])} nonzeros)")
    return None


def semi_structured_problem(weight: torch.Tensor, which: str | None = None) -> str | None:
    """None when torch can convert ``weight`` to a semi-structured tensor, else the reason: not CUDA, not fp16/bf16,
    a GPU older than compute capability 8.0, a shape off torch's blocks (:func:`min_shape`), or not 2:4."""
    which = which or backend()
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype} is not float16 or bfloat16: call model.half() (or .to(torch.bfloat16)) first"
    block = min_shape(weight.dtype, which)
    if block is None:
        return f"the {which} backend has no semi-structured kernel for {weight.dtype}"
    rows, cols = weight.shape if weight.dim() == 2 else (0, 0)
    if rows < block[0] or cols < block[1] or rows % block[0] or cols % block[1]:
        return (f"shape {rows}x{cols} is not a multiple of ({block[0]}, {block[1]}), which torch's {which} kernels "
                f"require for {weight.dtype}: leave this layer dense (drop it from the masks)")
    why = check_2to4(weight)
    if why is not None:
        return f"not 2:4 sparse: {why}; prune with a 2:4 mask (top-2 of |w| in each group of 4 along the input dim)"
    if weight.device.type != "cuda":
        return f"the weight is on {weight.device}: semi-structured kernels run on CUDA (model.cuda())"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        name = torch.cuda.get_device_name(weight.device)
        return f"{name} (compute capability < 8.0) has no sparse tensor cores: 2:4 kernels need Ampere or newer"
    return None


def _contiguous_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def to_semi_structured(model: nn.Module, masks: Masks | Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Replace, in place, the weight of each masked ``nn.Linear`` (masks=None: the default prunable ones, pattern
    from their exact zeros) by the 2:4 semi-structured form of the masked weight; returns the converted module names.

    Every layer is checked first (:func:`semi_structured_problem`) and nothing is converted unless all pass; the
    error names the layer and the reason. The model must already be on CUDA in fp16 or bf16. The result is for
    inference (eval mode, ``requires_grad`` off, under ``torch.inference_mode()``)."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"to_semi_structured converts a torch.nn.Module, got {type(model).__name__}")
    mdict = _mask_dict(model, masks)
    plan = []
    for name, module in _candidates(model, mdict):
        if type(module) is not nn.Linear:
            raise PrunekitError(f"{name!r} is a {type(module).__name__}: 2:4 conversion covers nn.Linear only; leave "
                                "it out of the masks")
        w, b = _effective(name, module, mdict)
        why = semi_structured_problem(w)
        if why is not None:
            raise PrunekitError(f"cannot make {name!r} ({w.shape[0]}x{w.shape[1]}) semi-structured: {why}")
        plan.append((name, module, w, b))
    if not plan:
        raise PrunekitError("no Linear layer to convert: pass masks naming Linear weights")
    which = backend()
    cls = _tensor_class(which)
    done = []
    for name, module, w, b in plan:
        sparse_w = cls.from_dense(w.contiguous()) if cls is not None else torch.sparse.to_sparse_semi_structured(w)
        module.weight = nn.Parameter(sparse_w, requires_grad=False)
        if b is not None:
            module.bias = nn.Parameter(b.contiguous(), requires_grad=False)
        # torch's semi-structured linear flattens the input with .view, which a non-contiguous input would fail
        module.register_forward_pre_hook(_contiguous_inputs)
        done.append(name)
    model.eval()
    model.requires_grad_(False)
    return done
