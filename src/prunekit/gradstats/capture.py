"""What the hooks engine of :mod:`prunekit.gradstats` reads from one batched forward and backward: which modules it
handles (:func:`hook_kind`), models it cannot handle (:func:`batch_coupled`), each module's input and output
gradient (:func:`capture_io`), and the unfolded input of a convolution (:func:`unfolder`). Shared with the OBS
gradient matrix (:mod:`prunekit.families.obs.gradients`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # torch >= 2.4
    from torch.autograd.graph import get_gradient_edge as gradient_edge
except ImportError:  # pragma: no cover - old torch: the hooks engine is not available
    gradient_edge = None


def batch_coupled(model: nn.Module) -> bool:
    """True when a BatchNorm without running statistics normalizes with batch statistics even in eval mode: the
    examples of a batch then depend on each other, so per-example gradients cannot come from batched hooks."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


def hook_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'conv2d' for the stock modules (subclasses that keep the stock forward), else None."""
    t = type(module)
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    for cls, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d")):
        if isinstance(module, cls) and t.forward is cls.forward and t._conv_forward is cls._conv_forward:
            return kind
    return None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Unsupported(Exception):
    """Internal: the hooks engine cannot handle a module in this forward."""


def capture_io(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor, total_loss
               ) -> tuple[dict[nn.Module, torch.Tensor], dict[nn.Module, torch.Tensor]]:
    """One forward of ``x`` with hooks on ``modules`` and one backward of ``total_loss(output)`` (a sum over
    examples) to the modules' outputs only (no weight or input gradients): returns ``({module: d total/d output},
    {module: detached input})`` for the modules that were called and reach the loss.

    The output gradient is captured at the output's creation, so a later in-place op (``ReLU(inplace=True)``) does
    not corrupt it. Raises :class:`Unsupported` naming the modules called more than once, whose first input is not
    per-example, or whose input was modified in place.
    """
    records: dict[nn.Module, list] = {m: [] for m in modules}

    def hook(module, args, out):
        rec = records[module]
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor) \
                or out.grad_fn is None:
            rec.append(None)
        else:
            rec.append((args[0], args[0]._version, gradient_edge(out)))

    handles = [m.register_forward_hook(hook, prepend=True) for m in modules]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    bad = [m for m, rec in records.items()
           if len(rec) > 1 or (rec and (rec[0] is None or rec[0][0].shape[0] != n
                                         or rec[0][0]._version != rec[0][1]))]
    if bad:
        raise Unsupported(bad)
    live = [m for m, rec in records.items() if rec]
    grads = torch.autograd.grad(total_loss(out), [records[m][0][2] for m in live], allow_unused=True) if live else []
    dout = {m: g for m, g in zip(live, grads) if g is not None}
    return dout, {m: records[m][0][0].detach() for m in live}


def unfolder(m: nn.Module, x: torch.Tensor, kind: str, gr: int):
    """Function (a, b) -> unfolded input of samples [a, b) as [b-a, gr, (C/gr)*prod(k), P] for a Conv1d/2d.

    Row order (channel, kernel offsets) matches the weight's flattening. Built as a strided window view of the
    padded input and one reshape copy (faster than F.unfold on CPU; no copy at all for a 1x1 kernel, stride 1).
    """
    conv1d = kind == "conv1d"
    k, dil, st = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":  # 'same'/'valid', non-zero modes: as the module
        rp = list(m._reversed_padding_repeated_twice)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    else:  # F.pad order: last dimension first
        rp = [q for pad in reversed(m.padding) for q in (pad, pad)]
        mode = "constant"
    padded = any(rp)
    C = x.shape[1]
    rows = (C // gr) * math.prod(k)

    def unfold(a: int, b: int) -> torch.Tensor:
        xs = x[a:b]
        if padded:
            xs = F.pad(xs, rp, mode=mode)
        if conv1d:
            xs = xs.unsqueeze(2)  # [m, C, 1, L]
        kk, dd, ss = ((1,) + k, (1,) + dil, (1,) + st) if conv1d else (k, dil, st)
        N, _, H, W = xs.shape
        Ho = (H - dd[0] * (kk[0] - 1) - 1) // ss[0] + 1
        Wo = (W - dd[1] * (kk[1] - 1) - 1) // ss[1] + 1
        sn, sc, sh, sw = xs.stride()
        win = xs.as_strided((N, C, kk[0], kk[1], Ho, Wo),
                            (sn, sc, sh * dd[0], sw * dd[1], sh * ss[0], sw * ss[1]), xs.storage_offset())
        return win.reshape(N, gr, rows, Ho * Wo)

    return unfold
