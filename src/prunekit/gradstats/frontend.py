"""The front end of :mod:`prunekit.gradstats`: :func:`grad_stats` (checks its arguments, sets up the run, streams
the data through :mod:`.dispatch` and reduces the sums over mini-batches and DDP ranks) and its result
:class:`GradStats`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import distributed
from ..batches import BatchStream
from ..errors import PrunekitError, is_count
from ..modes import scoring_mode
from ..params import PrunableParam
from .capture import _has_batchnorm
from .dispatch import _accumulate_micro_batches, _accumulate_pieces, _assign_engines
from .engines import _Run
from .losses import LossFn

ENGINES = ("auto", "hooks", "vmap", "loop")
MODES = ("eval", "train")
#: Memory budget for per-sample / per-mini-batch tensors materialized at once (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass
class GradStats:
    """Result of :func:`grad_stats`. ``mean`` = ḡ and ``sq`` = F̂ (None with ``need_sq=False``), keyed by name."""

    mean: dict[str, torch.Tensor]
    sq: dict[str, torch.Tensor] | None
    n_samples: int
    n_batches: int
    batch_size: int
    passes: int
    engine: str


def grad_stats(
    model: nn.Module,
    params: Sequence[PrunableParam],
    data: Iterable,
    *,
    loss: LossFn | None = None,
    batch_size: int = 1,
    need_sq: bool = True,
    engine: str = "auto",
    max_chunk: int = 256,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> GradStats:
    """ḡ and F̂ of the prunable tensors ``params`` over ``data`` in mini-batches of ``batch_size`` (module docs).

    - ``data``: iterable of ``(inputs, targets)`` batches of any sizes; samples are taken in order and re-chunked.
      Each batch is moved to the device of the model's first parameter (floating inputs to its dtype).
    - ``loss(outputs, targets)``: a MEAN loss over the batch (cross-entropy by default). ``per_sample_loss``
      (optional) returns the per-sample terms whose mean is ``loss``; without it a user loss runs on 'vmap'.
    - ``mode``: 'eval' (running statistics, no dropout) or 'train' (batch statistics; loop engine only; B = 1 with
      BatchNorm is an error). The previous modes and all buffers are restored.
    - ``engine``: 'auto', 'hooks', 'vmap' or 'loop'; ``max_chunk``: samples per batched forward;
      ``max_bytes``: budget for materialized per-sample / per-mini-batch gradients.
    - ``dtype``: accumulation precision; default float32 (float64 for a float64 model).
    """
    params = _checked_params(model, params)
    _check_options(batch_size, max_chunk, engine, mode, params)
    device, fdtype, acc = _devices_and_precision(model, params, dtype)
    B = batch_size
    if mode == "train" and B == 1 and _has_batchnorm(model):
        raise PrunekitError("mode='train' with batch_size=1 on a model with BatchNorm: a normalization layer would "
                            "see a single sample; use batch_size > 1 or mode='eval'")

    run = _Run(model, params, loss, per_sample_loss, B, need_sq, acc, int(max_bytes))
    stream = BatchStream(data, device, fdtype, who="grad_stats")
    assign = _assign_engines(model, params, engine, mode, run.sum_loss is not None)
    with scoring_mode(model, mode, [p.tensor for p in params]):
        if mode == "eval" and B > max_chunk:
            n_samples, n_batches = _accumulate_micro_batches(run, stream, max_chunk)
        else:
            n_samples, n_batches = _accumulate_pieces(run, stream, assign, engine, mode, max_chunk)
    return _reduce_and_finish(run, n_samples, n_batches)


def _checked_params(model, params) -> list[PrunableParam]:
    """The model is a module and ``params`` a non-empty list of distinct PrunableParams (as a list)."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(params)
    if not params:
        raise PrunekitError("grad_stats needs at least one prunable parameter")
    if not all(isinstance(p, PrunableParam) for p in params):
        raise PrunekitError("params must be PrunableParam objects (see prunekit.params.prunable_params)")
    if len({p.name for p in params}) != len(params):
        raise PrunekitError("params name the same tensor twice")
    return params


def _check_options(batch_size, max_chunk, engine: str, mode: str, params: list[PrunableParam]) -> None:
    """Counts, engine and mode are valid together, and every prunable tensor is floating point."""
    if not is_count(batch_size):
        raise PrunekitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not is_count(max_chunk):
        raise PrunekitError(f"max_chunk must be a positive integer, got {max_chunk!r}")
    if engine not in ENGINES:
        raise PrunekitError(f"unknown gradient engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise PrunekitError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode == "train" and engine in ("hooks", "vmap"):
        raise PrunekitError(f"engine {engine!r} needs mode='eval': with batch statistics per-sample gradients depend "
                            "on the whole mini-batch; use engine='loop' (or 'auto') for mode='train'")
    for p in params:
        if not isinstance(p.tensor, torch.Tensor) or not p.tensor.is_floating_point():
            raise PrunekitError(f"prunable tensor {p.name!r} is not a floating-point tensor")


def _devices_and_precision(model: nn.Module, params: list[PrunableParam], dtype):
    """(device of the data, floating dtype of the model, accumulation dtype) for :func:`grad_stats`."""
    first = next(model.parameters(), None)
    if first is None:
        first = params[0].tensor
    device = first.device
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    # DDP adds the ranks' partial sums in another order than one process: float64 keeps that out of the ranking
    acc = dtype if dtype is not None else (
        torch.float64 if fdtype == torch.float64 or distributed.active() else torch.float32)
    if not isinstance(acc, torch.dtype) or not acc.is_floating_point:
        raise PrunekitError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return device, fdtype, acc


def _reduce_and_finish(run: _Run, n_samples: int, n_batches: int) -> GradStats:
    """Sums over the DDP ranks, then divides by the number of mini-batches."""
    distributed.all_sum(*run.sum.values(), *(run.sq.values() if run.need_sq else ()))
    run.passes = distributed.sum_int(run.passes)
    if n_samples == 0:
        raise PrunekitError("grad_stats got no samples: data yielded no (inputs, targets) batch with samples")
    mean = {k: v.div_(n_batches) for k, v in run.sum.items()}
    sq = {k: v.div_(n_batches) for k, v in run.sq.items()} if run.need_sq else None
    order = [e for e in ("batched", "hooks", "vmap", "loop") if e in run.used]
    return GradStats(mean, sq, n_samples, n_batches, run.B, run.passes, "+".join(order))
