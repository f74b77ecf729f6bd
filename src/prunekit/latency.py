"""Measured inference latency: the same timing protocol for a dense, a masked and a shrunk model.

:func:`measure_latency` times ``model(x)`` in eval mode under ``torch.inference_mode`` for each batch size, after
``warmup`` untimed calls, and reports the median (and the spread) of ``repeats`` timed calls; on CUDA it
synchronizes around every call. :func:`compare_latency` measures several models interleaved (model A, model B,
model A, ...) so machine noise hits all of them alike, and adds each one's speedup over the first.
"""
from __future__ import annotations

import statistics
import time
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import PrunekitError

BATCH_SIZES = (1, 16, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check(input_shape, batch_sizes, repeats, warmup):
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise PrunekitError(f"input_shape must be the shape of one example, e.g. (3, 32, 32), got {input_shape!r}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise PrunekitError(f"batch_sizes must be positive whole numbers, got {batch_sizes!r}")
    if int(repeats) < 1 or int(warmup) < 0:
        raise PrunekitError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def _one_call(model, x, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    return time.perf_counter() - t0


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int, device=None) -> torch.Tensor:
    """A batch of ``batch`` inputs for timing or tracing ``model``: the model's own ``example_input(batch,
    input_shape)`` when it has one (token ids are not Gaussian noise: :class:`prunekit.hf.TextClassifier`), else
    standard normal noise of ``input_shape``."""
    own = getattr(model, "example_input", None)
    x = own(int(batch), tuple(input_shape)) if callable(own) else torch.randn(int(batch), *map(int, input_shape))
    return x.to(device) if device is not None else x


def compare_latency(models: Mapping[str, nn.Module], input_shape: Sequence[int],
                    batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 20, warmup: int = 3) -> list[dict]:
    """Rows ``{model, batch_size, ms, ms_min, ms_max, speedup}``: median milliseconds per call of each model at each
    batch size, timed interleaved; ``speedup`` = the first model's median / this model's median."""
    _check(input_shape, batch_sizes, repeats, warmup)
    if not models:
        raise PrunekitError("compare_latency needs at least one model")
    names = list(models)
    rows = []
    for bs in batch_sizes:
        times: dict[str, list[float]] = {n: [] for n in names}
        inputs = {}
        for n in names:
            dev = _device(models[n])
            inputs[n] = (example_input(models[n], input_shape, bs, dev), dev)
        states = {n: models[n].training for n in names}
        try:
            with torch.inference_mode():
                for n in names:
                    models[n].eval()
                    for _ in range(int(warmup)):
                        _one_call(models[n], *inputs[n])
                for _ in range(int(repeats)):
                    for n in names:
                        times[n].append(_one_call(models[n], *inputs[n]))
        finally:
            for n in names:
                models[n].train(states[n])
        base = statistics.median(times[names[0]])
        for n in names:
            med = statistics.median(times[n])
            rows.append({"model": n, "batch_size": int(bs), "ms": 1e3 * med, "ms_min": 1e3 * min(times[n]),
                         "ms_max": 1e3 * max(times[n]), "speedup": base / med if med > 0 else float("inf")})
    return rows


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = BATCH_SIZES,
                    repeats: int = 20, warmup: int = 3) -> dict[int, float]:
    """``{batch size: median milliseconds per forward call}`` of one model (see the module docstring)."""
    rows = compare_latency({"model": model}, input_shape, batch_sizes, repeats, warmup)
    return {r["batch_size"]: r["ms"] for r in rows}
