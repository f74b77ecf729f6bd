"""A per-layer latency table, measured once per device and layer shape and cached on disk, and the channel multiple
it suggests (``round_channels: "auto"``).

A *layer shape* is one Conv2d or Linear layer at given input and output widths, with its kernel, stride, padding,
input size and batch, on one device with one thread count and dtype. :class:`LatencyTable` times it alone (median
of ``repeats`` forward calls in eval mode under ``torch.inference_mode``, after one warm-up call) the first time it
is asked for, and stores the milliseconds in a JSON file (default ``~/.cache/prunekit/latency/<device>.json``,
``PRUNEKIT_LATENCY_CACHE`` overrides the folder). The file is written atomically (a temporary file in the same
folder, then ``os.replace``), so concurrent runs never see half a file; a later run reads the stored numbers
instead of timing again.

:func:`auto_round_channels` picks a channel multiple from the table: for each candidate k it times every Conv2d
(``groups == 1``) / Linear layer of the model but the last at pruned widths (0.3, 0.45 and 0.6 of its output
width, rounded up to a multiple of k; half its input width), and takes the k whose layers cost the least time per
kept multiply-accumulate; the smallest k within ``min_gain`` of the best wins, since coarser blocks cost
allocation freedom.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import PrunekitError

#: Channel multiples ``round_channels: "auto"`` chooses from.
CANDIDATES = (1, 4, 8, 16, 32)
#: Kept fractions of a layer's width at which the candidates are compared.
PROBES = (0.3, 0.45, 0.6)


def _default_folder() -> Path:
    env = os.environ.get("PRUNEKIT_LATENCY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prunekit" / "latency"


def device_key(device: torch.device | str = "cpu") -> str:
    """The cache file's name: device type (and CUDA device name) and the thread count."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{device.type}-{name.replace(' ', '_')}-t{torch.get_num_threads()}"


def _conv_key(c_in, c_out, kernel, stride, padding, hw, batch, dtype) -> str:
    return f"conv2d|{c_in}|{c_out}|{kernel}|{stride}|{padding}|{hw[0]}x{hw[1]}|b{batch}|{dtype}"


def _linear_key(f_in, f_out, positions, batch, dtype) -> str:
    return f"linear|{f_in}|{f_out}|p{positions}|b{batch}|{dtype}"


class LatencyTable:
    """Milliseconds of single layers, measured on first use and cached on disk (see the module docstring).

    ``timer``: ``timer(module, x) -> seconds`` of one forward call (default: wall clock); tests pass their own."""

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 repeats: int = 5, timer: Callable[[nn.Module, torch.Tensor], float] | None = None):
        if repeats < 1:
            raise PrunekitError(f"repeats must be >= 1, got {repeats}")
        self.device = torch.device(device)
        self.path = Path(path) if path is not None else _default_folder() / f"{device_key(self.device)}.json"
        self.repeats, self.timer = int(repeats), timer or _wall
        self.measured = 0  # layers timed by this object (not read from the file)
        self.entries: dict[str, float] = {}
        if self.path.exists():
            try:
                self.entries = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError) as e:
                raise PrunekitError(f"latency cache {self.path} is not a JSON object of numbers ({e}); delete it "
                                    "and it is measured again") from e

    def _time(self, module: nn.Module, x: torch.Tensor) -> float:
        module = module.to(self.device).eval()
        x = x.to(self.device)
        with torch.inference_mode():
            self.timer(module, x)  # warm-up
            ms = statistics.median(1e3 * self.timer(module, x) for _ in range(self.repeats))
        self.measured += 1
        return ms

    def _get(self, key: str, build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> float:
        if key not in self.entries:
            module, x = build()
            self.entries[key] = self._time(module, x)
            self.save()
        return self.entries[key]

    def conv2d(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, hw: Sequence[int],
               batch: int = 1, dtype: torch.dtype = torch.float32) -> float:
        """Milliseconds of ``Conv2d(c_in, c_out, kernel, stride, padding)`` on a (batch, c_in, *hw) input."""
        key = _conv_key(c_in, c_out, kernel, stride, padding, tuple(hw), batch, dtype)
        return self._get(key, lambda: (nn.Conv2d(c_in, c_out, kernel, stride, padding).to(dtype),
                                       torch.randn(batch, c_in, *hw, dtype=dtype)))

    def linear(self, f_in: int, f_out: int, positions: int = 1, batch: int = 1,
               dtype: torch.dtype = torch.float32) -> float:
        """Milliseconds of ``Linear(f_in, f_out)`` on a (batch, positions, f_in) input."""
        key = _linear_key(f_in, f_out, positions, batch, dtype)
        return self._get(key, lambda: (nn.Linear(f_in, f_out).to(dtype),
                                       torch.randn(batch, positions, f_in, dtype=dtype)))

    def save(self) -> None:
        """Write the table atomically (temporary file in the same folder, then ``os.replace``), merged with what
        another process may have stored meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {}
        if self.path.exists():
            try:
                merged = json.loads(self.path.read_text())
            except ValueError:
                merged = {}
        merged.update(self.entries)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _wall(module: nn.Module, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    module(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def _layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[nn.Module, tuple]]:
    """(module, input shape without batch) of every Conv2d (groups == 1) and Linear, from one forward."""
    seen: list[tuple[nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, tuple(args[0].shape[1:]))))
             for m in model.modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def _layer_cost(table: LatencyTable, mod: nn.Module, shape: tuple, width: int, batch: int) -> tuple[float, float]:
    """(ms, MACs) of layer ``mod`` with ``width`` output channels and half its input channels kept (the layer
    before it is pruned too)."""
    if isinstance(mod, nn.Conv2d):
        c_in = max(1, mod.in_channels // 2) if mod.in_channels > 3 else mod.in_channels
        hw = shape[1:]
        kernel, stride, pad = mod.kernel_size[0], mod.stride[0], mod.padding[0] if isinstance(mod.padding, tuple) else 0
        ms = table.conv2d(c_in, width, kernel, stride, pad, hw, batch)
        h_out = (hw[0] + 2 * pad - kernel) // stride + 1
        w_out = (hw[1] + 2 * pad - kernel) // stride + 1
        return ms, float(c_in * width * kernel * kernel * h_out * w_out)
    positions = int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1
    f_in = max(1, mod.in_features // 2)
    return table.linear(f_in, width, positions, batch), float(f_in * width * positions)


def auto_round_channels(model: nn.Module, input_shape: Sequence[int], table: LatencyTable | None = None,
                        batch: int = 1, candidates: Sequence[int] = CANDIDATES, min_gain: float = 0.05) -> int:
    """The channel multiple for ``round_channels: "auto"`` (see the module docstring): per candidate k, the summed
    latency of the model's Conv2d/Linear layers (all but the last) at pruned widths rounded up to multiples of k,
    per kept MAC; the smallest k within ``min_gain`` of the best. Measured once per device and layer shape
    (:class:`LatencyTable`), at batch ``batch``."""
    table = table or LatencyTable()
    layers = _layers(model, input_shape)[:-1]  # the output layer keeps its width
    if not layers:
        return 1
    cost = {}
    for k in sorted(set(int(c) for c in candidates)):
        ms = work = 0.0
        for mod, shape in layers:
            full = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
            for f in PROBES:  # pruned widths, rounded up to a multiple of k (capped at the full width)
                width = min(full, k * math.ceil(max(1, math.floor(f * full)) / k))
                t, w = _layer_cost(table, mod, shape, width, batch)
                ms, work = ms + t, work + w
        cost[k] = ms / max(work, 1.0)
    best = min(cost.values())
    return min(k for k, c in cost.items() if c <= best * (1.0 + min_gain))


def check_round_channels(value, error=PrunekitError) -> None:
    """``round_channels`` is an int >= 1 or ``"auto"``."""
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"round_channels must be an int >= 1 or 'auto' (picked from the cached latency table), got "
                    f"{value!r}")


def resolve_round_channels(value, model: nn.Module, example) -> int:
    """``round_channels`` as an int: itself, or for ``"auto"`` :func:`auto_round_channels` on the shape of one
    example (``example``: a batch tensor)."""
    if value != "auto":
        return int(value)
    if not isinstance(example, torch.Tensor):
        raise PrunekitError("round_channels='auto' times Conv2d/Linear layers on the model's input shape and needs a "
                            "tensor input (not a dict batch); give an int, e.g. round_channels=8")
    return auto_round_channels(model, tuple(example.shape[1:]))


def timed_layers(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[nn.Module, tuple]]:
    """``{module name: (module, input shape without batch)}`` of the layers a table times: Conv2d with
    ``groups == 1`` and Linear, from one forward of zeros."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: (m, shape) for m, shape in _layers(model, input_shape)}


def layer_ms(table: LatencyTable, mod: nn.Module, shape: tuple, c_in: int, c_out: int, batch: int = 1) -> float:
    """Milliseconds of layer ``mod`` (input shape ``shape`` without batch) with ``c_in`` input and ``c_out``
    output channels (features for a Linear layer, whose input ``shape[-1]`` scales with ``c_in``)."""
    if isinstance(mod, nn.Conv2d):
        pad = mod.padding[0] if isinstance(mod.padding, tuple) else 0
        return table.conv2d(c_in, c_out, mod.kernel_size[0], mod.stride[0], pad, shape[1:], batch)
    positions = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return table.linear(c_in, c_out, positions, batch)


def predicted_ms(table: LatencyTable, layers: dict[str, tuple[nn.Module, tuple]],
                 widths: dict[str, tuple[int, int]], batch: int = 1) -> float:
    """Summed milliseconds of ``layers`` (:func:`timed_layers`) at ``widths`` (``{module name: (in, out)}``; a layer
    left out keeps its full widths)."""
    total = 0.0
    for name, (mod, shape) in layers.items():
        full = (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features,
                                                                                        mod.out_features)
        c_in, c_out = widths.get(name, full)
        total += layer_ms(table, mod, shape, max(1, c_in), max(1, c_out), batch)
    return total
