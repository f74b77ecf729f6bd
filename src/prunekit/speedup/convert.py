"""Replace pruned Linear layers by :class:`SparseLinear` where, and only where, CSR was measured faster.

    masks = pk.prune(model, "magnitude", sparsity=0.95)         # train/fine-tune the masked dense model as usual
    report = to_sparse(model, masks, rows=128)                    # then, for CPU inference:
    print(report.summary())
    with torch.inference_mode():
        model(x)

For each candidate layer (a ``nn.Linear`` or GPT-2 ``Conv1D``, transposed, whose weight the masks name; with
``masks=None`` the model's default prunable tensors, pruned entries being its exact zeros) :func:`to_sparse` looks up
the dense and CSR times of that shape, sparsity band, row count and thread count in a :class:`SpeedTable`
(measuring them once when missing) and converts the layer only when ``dense / CSR >= min_speedup`` at every row count
in ``rows``. The :class:`SparseReport` names every candidate, converted or not, with its sparsity, the timings and the
reason. Conversion happens in place; the model is put in eval mode with ``requires_grad`` off: it is for inference
(under ``torch.inference_mode()``), and a :class:`prunekit.masks.Masks` made for it no longer applies to the
converted layers. Layers left dense get their masks applied, so the whole model computes the masked model.
Training uses the masked dense path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import PrunekitError, is_count
from ..masks import Masks
from ..params import hf_conv1d, prunable_params
from .csr import SparseLinear
from .timing import SpeedTable

_DEFAULT_TABLE: SpeedTable | None = None


def default_table() -> SpeedTable:
    """The process-wide in-memory :class:`SpeedTable` :func:`to_sparse` uses when given none."""
    global _DEFAULT_TABLE
    if _DEFAULT_TABLE is None:
        _DEFAULT_TABLE = SpeedTable()
    return _DEFAULT_TABLE


@dataclass(frozen=True)
class LayerDecision:
    """One candidate layer: ``shape`` is (out_features, in_features); ``timings`` holds ``(rows, dense_ms, csr_ms)``
    per row count (empty when the layer was not timed)."""

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    converted: bool
    reason: str
    timings: tuple[tuple[int, float, float], ...] = ()

    @property
    def speedup(self) -> float:
        """The smallest dense/CSR ratio over the timed row counts (nan when untimed)."""
        return min((d / c if c > 0 else math.inf) for _, d, c in self.timings) if self.timings else math.nan


@dataclass(frozen=True)
class SparseReport:
    """What :func:`to_sparse` did, layer by layer, and the settings it decided with."""

    layers: tuple[LayerDecision, ...]
    min_speedup: float
    rows: tuple[int, ...]
    threads: int
    notes: tuple[str, ...] = field(default=())

    @property
    def converted(self) -> list[str]:
        return [d.name for d in self.layers if d.converted]

    @property
    def kept_dense(self) -> list[str]:
        return [d.name for d in self.layers if not d.converted]

    def summary(self) -> str:
        """A table: layer, shape, sparsity, the worst speedup over ``rows``, converted or the reason not."""
        head = (f"to_sparse: {len(self.converted)} of {len(self.layers)} layers converted to CSR "
                f"(min_speedup {self.min_speedup:g}, rows {', '.join(map(str, self.rows))}, {self.threads} threads)")
        w = max([5] + [len(d.name) for d in self.layers])
        lines = [head, f"{'layer':<{w}}  {'shape':>10}  {'sparsity':>8}  {'speedup':>7}  decision"]
        for d in self.layers:
            sp = "-" if math.isnan(d.speedup) else f"{d.speedup:.2f}x"
            shape = "x".join(map(str, d.shape)) if d.shape else "-"
            lines.append(f"{d.name:<{w}}  {shape:>10}  {d.sparsity:>8.4f}  {sp:>7}  "
                         f"{'CSR' if d.converted else 'dense'}: {d.reason}")
        return "\n".join(lines + list(self.notes))


def _mask_dict(model: nn.Module, masks) -> dict[str, torch.Tensor] | None:
    if masks is None:
        return None
    if isinstance(masks, Masks):
        if masks.model is not model:
            raise PrunekitError("these masks were made for another model: pass the masks of the model you convert")
        return masks.as_dict()
    if not isinstance(masks, Mapping):
        raise PrunekitError(f"masks must be prunekit Masks or a {{parameter name: bool tensor}} mapping, got "
                            f"{type(masks).__name__}")
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        if name not in params:
            raise PrunekitError(f"mask {name!r} names no parameter of {type(model).__name__}")
        if not torch.is_tensor(m) or tuple(m.shape) != tuple(params[name].shape):
            raise PrunekitError(f"mask {name!r} must be a tensor of shape {tuple(params[name].shape)}, got "
                                f"{tuple(m.shape) if torch.is_tensor(m) else type(m).__name__}")
        out[name] = m
    return out


def _candidates(model: nn.Module, masks: dict | None) -> list[tuple[str, nn.Module]]:
    """(module name, module) of every layer whose weight is masked (or prunable by default), in model order."""
    if masks is None:
        names = {p.module_name for p in prunable_params(model) if p.attr == "weight"}
    else:
        names = {n.rpartition(".")[0] for n in masks if n.rpartition(".")[2] == "weight"}
        if not names:
            raise PrunekitError("the masks name no weight tensor (only biases?): nothing to convert")
    return [(n, m) for n, m in model.named_modules() if n in names]


def _effective(name: str, module: nn.Module, masks: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masked weight as [out, in] and the (masked) bias, both detached."""
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if masks is not None:
        w = w * masks[f"{name}.weight"].to(w.device, w.dtype)
        if b is not None and f"{name}.bias" in masks:
            b = b * masks[f"{name}.bias"].to(b.device, b.dtype)
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        w = w.t()  # GPT-2 Conv1D stores (in, out) and computes x @ W + b
    return w, b


def _apply_masks(name: str, module: nn.Module, masks: dict) -> None:
    for attr in ("weight", "bias"):
        m = masks.get(f"{name}.{attr}")
        if m is not None:
            t = getattr(module, attr)
            t.mul_(m.to(t.device, t.dtype))


def _check_args(model, min_speedup, rows, table) -> tuple[int, ...]:
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"to_sparse converts a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not math.isfinite(min_speedup) \
            or min_speedup <= 0:
        raise PrunekitError(f"min_speedup must be a positive finite number (1.0: convert whenever CSR is at least as "
                            f"fast as dense), got {min_speedup!r}")
    rows_t = (rows,) if isinstance(rows, int) and not isinstance(rows, bool) else tuple(rows) \
        if isinstance(rows, Sequence) and not isinstance(rows, str) else None
    if not rows_t or not all(is_count(r) for r in rows_t):
        raise PrunekitError(f"rows must be a positive whole number or a non-empty list of them (the rows, i.e. "
                            f"batch x tokens, one inference call feeds a Linear layer), got {rows!r}")
    if table is not None and not isinstance(table, SpeedTable):
        raise PrunekitError(f"table must be a prunekit.speedup.SpeedTable, got {type(table).__name__}")
    return rows_t


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_sparse(model: nn.Module, masks: Masks | Mapping[str, torch.Tensor] | None = None, *,
              min_speedup: float = 1.0, rows: int | Sequence[int] = 128,
              table: SpeedTable | None = None) -> SparseReport:
    """Convert, in place, each masked Linear / GPT-2 Conv1D layer of ``model`` whose measured CSR time beats dense by
    ``min_speedup`` at every count in ``rows`` (the rows one inference call feeds a layer: batch x tokens for a
    transformer) to a :class:`SparseLinear` holding its masked weight; returns the :class:`SparseReport`.

    ``masks``: prunekit :class:`Masks` of ``model`` or ``{parameter name: bool tensor}``; None converts the default
    prunable layers with their exact zeros as the pattern. ``table``: the :class:`SpeedTable` to take timings from
    (default: one in-memory table per process); timings are for the current ``torch.get_num_threads()``. The model
    must be float32 on the CPU. The converted model is in eval mode with ``requires_grad`` off: run it under
    ``torch.inference_mode()``; keep training the masked dense model.
    """
    rows_t = _check_args(model, min_speedup, rows, table)
    table = default_table() if table is None else table
    mdict = _mask_dict(model, masks)
    cands = _candidates(model, mdict)
    if any(n == "" for n, _ in cands):
        raise PrunekitError("the model itself is the layer to convert: wrap it (e.g. nn.Sequential(layer)) so it can "
                            "be replaced in place")
    conv1d = hf_conv1d()
    decisions, todo = [], []
    for name, module in cands:
        kind = type(module).__name__
        if isinstance(module, SparseLinear):
            raise PrunekitError(f"{name!r} is already a SparseLinear: convert a model once")
        if not (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))):
            decisions.append(LayerDecision(name, kind, tuple(module.weight.shape[:2]), 0.0, False,
                                           f"a {kind}, not a Linear: CSR conversion covers Linear and GPT-2 Conv1D"))
            todo.append((name, module, None, None, False))  # left dense, masked
            continue
        if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            raise PrunekitError(f"{name!r} is {module.weight.dtype} on {module.weight.device}: to_sparse converts "
                                "float32 CPU models (model.float().cpu()); on CUDA use to_semi_structured")
        w, b = _effective(name, module, mdict)
        sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
        timings = []
        for r in rows_t:
            t = table.lookup(table.key(w.shape[0], w.shape[1], sparsity, r))
            timings.append((r, t.dense_ms, t.csr_ms))
        worst = min(timings, key=lambda t: t[1] / t[2] if t[2] > 0 else math.inf)
        ratio = worst[1] / worst[2] if worst[2] > 0 else math.inf
        ok = ratio >= min_speedup
        reason = (f"CSR {ratio:.2f}x dense speed at {worst[0]} rows (the slowest of the row counts)" if ok else
                  f"CSR only {ratio:.2f}x dense speed at {worst[0]} rows, below min_speedup {min_speedup:g}")
        decisions.append(LayerDecision(name, kind, tuple(w.shape), sparsity, ok, reason, tuple(timings)))
        todo.append((name, module, w, b, ok))
    with torch.no_grad():
        for name, module, w, b, ok in todo:
            if ok:
                _replace(model, name, SparseLinear.from_dense(w, b))
            elif mdict is not None:  # left dense: it still computes the masked layer
                _apply_masks(name, module, mdict)
    model.eval()
    model.requires_grad_(False)
    notes = ("timings are band lower edges (1% bands); they hold for this thread count only",)
    return SparseReport(tuple(decisions), float(min_speedup), rows_t, torch.get_num_threads(), notes)
