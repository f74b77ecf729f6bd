"""Measured dense-vs-CSR matmul times, cached: the evidence behind every :func:`prunekit.speedup.to_sparse` decision.

A :class:`SpeedTable` answers "how long does a ``[rows, in] → [rows, out]`` Linear take dense and as CSR at this
sparsity, with this many threads, here?" by timing it once (:func:`time_pair`) and caching the answer in memory
under a :class:`TimingKey` (shape, sparsity band, rows, threads), and, when the table has a ``path``, in a JSON file
written atomically (:func:`prunekit.io.atomic_write_json`). A file written on another machine (other torch version,
CPU count, processor or MKL setting) is ignored, not trusted.

Sparsities are grouped in bands of :data:`BAND` (1%); a band is timed at its *lower* edge (the most nonzeros it can
hold), so the measured CSR time is an upper bound for every layer in the band. The timed matrices are random with
exactly that many nonzeros at uniformly random positions (seeded), the pattern unstructured magnitude pruning leaves.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import PrunekitError, is_count
from ..io import atomic_write_json
from .csr import SparseLinear

#: Width of a sparsity band (timings are shared by all layers in one band).
BAND = 0.01
FORMAT = "prunekit.csr-timings/1"


def band(sparsity: float) -> float:
    """The lower edge of the :data:`BAND` containing ``sparsity`` (0.957 → 0.95)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise PrunekitError(f"sparsity must lie in [0, 1], got {sparsity!r}")
    return round(math.floor(float(sparsity) / BAND + 1e-9) * BAND, 6)


@dataclass(frozen=True)
class TimingKey:
    """What one timing depends on: the Linear shape, the sparsity band, the rows per call and torch's thread count."""

    out_features: int
    in_features: int
    band: float
    rows: int
    threads: int


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per call of the dense matmul and of the CSR one (:class:`SparseLinear`)."""

    dense_ms: float
    csr_ms: float

    @property
    def speedup(self) -> float:
        """dense time / CSR time (> 1: CSR is faster)."""
        return self.dense_ms / self.csr_ms if self.csr_ms > 0 else float("inf")


def random_sparse_weight(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A float32 [out, in] standard-normal matrix with exactly ``round((1 - sparsity) · out · in)`` nonzeros at
    uniformly random positions (seeded by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    n = out_features * in_features
    keep = int(round((1.0 - float(sparsity)) * n))
    w = torch.zeros(n)
    idx = torch.randperm(n, generator=g)[:keep]
    w[idx] = torch.randn(keep, generator=g)
    w[idx[w[idx] == 0]] = 1.0  # a kept entry is never an exact zero
    return w.reshape(out_features, in_features)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2,
                     min_sample_s: float = 1e-3) -> dict[str, float]:
    """``{name: median milliseconds per call}``: each sample runs one function enough times in a row to last about
    ``min_sample_s`` (calibrated once per function, so calls of a few microseconds are not lost in timer noise), and
    the samples of the functions alternate (A, B, A, B, ...) so machine noise hits all of them alike."""
    if not is_count(repeats) or not isinstance(warmup, int) or warmup < 0:
        raise PrunekitError(f"need repeats >= 1 and warmup >= 0 (whole numbers), got repeats={repeats!r}, "
                            f"warmup={warmup!r}")
    inner = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
        inner[name] = max(1, min(1000, math.ceil(min_sample_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {n: 1e3 * statistics.median(s) for n, s in samples.items()}


def time_pair(out_features: int, in_features: int, sparsity: float, rows: int, repeats: int = 7,
              warmup: int = 2) -> Timing:
    """Dense ``F.linear`` vs :class:`SparseLinear` on a random weight of ``sparsity`` (:func:`random_sparse_weight`)
    with a bias, ``rows`` input rows, under ``torch.inference_mode`` at the current thread count."""
    for what, v in (("out_features", out_features), ("in_features", in_features), ("rows", rows)):
        if not is_count(v):
            raise PrunekitError(f"{what} must be a positive whole number, got {v!r}")
    w = random_sparse_weight(out_features, in_features, sparsity)
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(1))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2))
    sparse = SparseLinear.from_dense(w, b)
    with torch.inference_mode():
        ms = time_interleaved({"dense": lambda: F.linear(x, w, b), "csr": lambda: sparse(x)}, repeats, warmup)
    return Timing(ms["dense"], ms["csr"])


def machine() -> dict:
    """What a timing file is valid for: torch version, threads-independent CPU facts, MKL availability."""
    return {"torch": torch.__version__, "cpu_count": os.cpu_count(), "processor": platform.processor(),
            "machine": platform.machine(), "mkl": bool(torch.backends.mkl.is_available())}


def default_path() -> Path:
    """``~/.cache/prunekit/speedup/csr_timings.json`` (``$XDG_CACHE_HOME`` when set)."""
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "prunekit" / "speedup" / "csr_timings.json"


class SpeedTable:
    """Dense-vs-CSR timings keyed by :class:`TimingKey`, measured on first use (:func:`time_pair`) and cached.

    ``path``: a JSON file to read timings from and write new ones to (atomically); None keeps them in memory only.
    ``repeats``/``warmup``: the timing protocol of :func:`time_interleaved`. ``measure`` replaces :func:`time_pair`
    (tests use it to count or fix measurements).
    """

    def __init__(self, path: str | os.PathLike | None = None, repeats: int = 7, warmup: int = 2,
                 measure: Callable[..., Timing] | None = None):
        if not is_count(repeats) or not isinstance(warmup, int) or warmup < 0:
            raise PrunekitError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
        self.path = None if path is None else Path(path)
        self.repeats, self.warmup = repeats, warmup
        self._measure = measure or time_pair
        self._entries: dict[TimingKey, Timing] = {}
        if self.path is not None and self.path.exists():
            self._entries = self._read(self.path)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def key(self, out_features: int, in_features: int, sparsity: float, rows: int) -> TimingKey:
        """The key of a layer of this shape and sparsity fed ``rows`` rows at the current thread count."""
        return TimingKey(int(out_features), int(in_features), band(sparsity), int(rows), torch.get_num_threads())

    def lookup(self, key: TimingKey) -> Timing:
        """The cached timing of ``key``, measured (and saved when the table has a path) if missing."""
        hit = self._entries.get(key)
        if hit is None:
            if key.threads != torch.get_num_threads():
                raise PrunekitError(f"cannot measure a timing for {key.threads} threads while torch runs "
                                    f"{torch.get_num_threads()}: call torch.set_num_threads({key.threads}) first")
            hit = self._measure(key.out_features, key.in_features, key.band, key.rows, self.repeats, self.warmup)
            self._entries[key] = hit
            if self.path is not None:
                self.save()
        return hit

    def save(self) -> None:
        """Write every cached timing to ``path`` (atomically; entries from another machine are dropped)."""
        if self.path is None:
            raise PrunekitError("this SpeedTable keeps its timings in memory only: pass path=... to save them")
        atomic_write_json(self.path, {"format": FORMAT, "machine": machine(), "entries": [
            {**asdict(k), **asdict(t)} for k, t in sorted(self._entries.items(), key=lambda kv: astuple(kv[0]))]})

    @staticmethod
    def _read(path: Path) -> dict[TimingKey, Timing]:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("machine") != machine():
                return {}  # another format or another machine: its timings say nothing about this one
            out = {}
            for e in data["entries"]:
                k = TimingKey(int(e["out_features"]), int(e["in_features"]), float(e["band"]), int(e["rows"]),
                              int(e["threads"]))
                out[k] = Timing(float(e["dense_ms"]), float(e["csr_ms"]))
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"ignoring the unreadable timing cache {path} ({type(e).__name__}: {e}); it is rewritten "
                          "with fresh timings", stacklevel=3)
            return {}


def astuple(key: TimingKey) -> tuple:
    return (key.out_features, key.in_features, key.band, key.rows, key.threads)
