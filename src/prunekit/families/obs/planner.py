"""The memory planner of the OBS family (second_order.md §9).

Before a pruning step it estimates, in bytes:

1. the gradient matrix: N × d_g × 4 (d_g = the columns of G: all prunable weights, or the active ones);
2. the per-example gradient chunks: micro-batch × (3 × the widest tensor × 4 + one example's activations);
3. per block, by route: Gram 2·N²·8 (K and its factor) + 2·N·chunk·8 (a float64 column chunk of G and Z) + c·8;
   direct 3·c²·8 (F, L and L⁻¹) + N_chunk·c·8; Sherman–Morrison c²·s (s = 8 in float64; prunekit updates the
   inverse in place, without the reference's c²·4/k temporary of ``--fisher-parts k``). A batch of nb equal-size
   blocks needs nb times that, plus a gathered copy of its G slice (N·c·4) when the blocks are not evenly spaced;
   one batch gets at most ``BATCH_BYTES`` (larger batches are not faster);
4. the factor cache kept between the two passes: Σ_B min(N, c_B)²·8 (Sherman–Morrison: its inverse, c²·s);
5. a time estimate in flops: Σ_B (N²·c_B + N³) for Gram, Σ_B (N·c_B² + c_B³) for direct.

It then picks the micro-batch, how many blocks go in one batch, and cache-or-recompute, or fails early with a
:class:`~prunekit.errors.PrunekitError` that prints the numbers and what to change. The budget is ``memory_limit``
(bytes) on the compute device, default 70% of the available RAM (``MemAvailable``) for a CPU device and 90% of the
free memory for a CUDA device. With ``grad_device: cpu`` and a CUDA compute device the gradients count against the
host instead; with ``factor_device: cpu`` so does the factor cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ...errors import PrunekitError
from .blocks import BlockLayout
from .engines import DEFAULT_COL_CHUNK, choose_route

HOST_FRACTION = 0.7
CUDA_FRACTION = 0.9
#: Largest working memory of one batch of blocks (batches beyond this size are not faster; at least one block).
BATCH_BYTES = 512 * 2**20
#: Budget of the per-example gradient chunks (more examples per batched forward are not faster).
CHUNK_BYTES = 256 * 2**20
#: Bytes the planner keeps for what it does not model (the model, its activations, the allocator's slack).
MARGIN = 64 * 2**20


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory on ``device``: MemAvailable for the host (total RAM where /proc/meminfo is missing), free CUDA
    memory for a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def default_limit(device: str | torch.device = "cpu") -> int:
    dev = torch.device(device)
    frac = CUDA_FRACTION if dev.type == "cuda" else HOST_FRACTION
    return int(frac * available_bytes(dev))


def _fmt(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def block_work_bytes(route: str, n_grads: int, c: int, *, col_chunk: int = DEFAULT_COL_CHUNK, sm_parts: int = 1,
                     sm_bytes: int = 8) -> int:
    """Peak working bytes of factoring ONE block of c columns from N gradients and taking its diagonal."""
    N = n_grads
    if route == "gram":
        cc = min(c, col_chunk)
        return 2 * N * N * 8 + 2 * N * cc * 8 + 2 * c * 8
    if route == "direct":
        return 3 * c * c * 8 + min(N, 1024) * c * 8 + 2 * c * 8
    return c * c * sm_bytes + 2 * c * 8  # updated in place: no c² temporary (the reference's: c²·4·(1 + 1/k))


def factor_bytes(route: str, n_grads: int, c: int, sm_bytes: int = 8) -> int:
    """Bytes of one cached block factor."""
    if route == "sherman_morrison":
        return c * c * sm_bytes
    return min(n_grads, c) ** 2 * 8


def block_flops(route: str, n_grads: int, c: int) -> float:
    N = float(n_grads)
    if route == "gram":
        return N * N * c + N ** 3
    if route == "direct":
        return N * c * c + float(c) ** 3
    return N * c * c


@dataclass
class MemoryPlan:
    """What the planner decided, with the numbers behind it (bytes)."""

    n_grads: int
    columns: int
    grad_bytes: int
    chunk_examples: int
    chunk_bytes: int
    blocks_per_batch: dict[int, int]
    batch_bytes: int  # largest batch's working memory
    cache_bytes: int
    cache: bool
    peak_bytes: int  # estimated peak on the compute device (gradients included when they live there)
    host_bytes: int  # estimated bytes on the host when offloading (0 otherwise)
    limit: int
    flops: float
    routes: dict[int, str]
    grad_device: str
    factor_device: str
    compute_device: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        per = ", ".join(f"c={c}: {self.routes[c]} ×{n}/batch" for c, n in sorted(self.blocks_per_batch.items(),
                                                                                 reverse=True))
        return (f"OBS memory plan: gradients {_fmt(self.grad_bytes)} ({self.n_grads}×{self.columns} on "
                f"{self.grad_device}), per-example chunk {self.chunk_examples} ({_fmt(self.chunk_bytes)}), block "
                f"batches up to {_fmt(self.batch_bytes)} [{per}], factor cache {_fmt(self.cache_bytes)} "
                f"({'kept on ' + self.factor_device if self.cache else 'recomputed'}), estimated peak "
                f"{_fmt(self.peak_bytes)} of limit {_fmt(self.limit)}; ~{self.flops / 1e9:.1f} GFLOP")


def plan(layout: BlockLayout, n_grads: int, *, widest_tensor: int, activation_bytes: int = 0,
         engine: str = "auto", memory_limit: int | None = None, grad_device: str | torch.device = "cpu",
         factor_device: str | torch.device | None = None, compute_device: str | torch.device | None = None,
         cache: str = "auto", max_micro_batch: int | None = None, grad_batch: int = 1, sm_parts: int = 1,
         grad_bytes_per_value: int = 4, col_chunk: int = DEFAULT_COL_CHUNK) -> MemoryPlan:
    """Plan one OBS step over ``layout`` with N = ``n_grads`` gradients (module docs); raise if it cannot fit.

    ``widest_tensor``: the largest prunable tensor (numel); ``activation_bytes``: one example's activations
    (:func:`prunekit.second_order.gradients.per_example_activation_bytes`); ``cache``: 'auto', 'always' or 'never'.
    """
    if cache not in ("auto", "always", "never"):
        raise PrunekitError(f"cache_factors must be 'auto', 'always' or 'never', got {cache!r}")
    cdev = torch.device(compute_device) if compute_device is not None else torch.device(grad_device)
    gdev = torch.device(grad_device)
    fdev = torch.device(factor_device) if factor_device is not None else cdev
    limit = int(memory_limit) if memory_limit is not None else default_limit(cdev)
    N = int(n_grads)
    grad_bytes = N * layout.n_columns * grad_bytes_per_value
    grads_here = gdev == cdev or (gdev.type == cdev.type == "cpu")
    cache_here = fdev == cdev or (fdev.type == cdev.type == "cpu")
    host_bytes = 0
    notes: list[str] = []

    def refuse(msg: str, suggest: str) -> PrunekitError:
        return PrunekitError(
            f"OBS step does not fit in memory: {msg} (limit {_fmt(limit)}; gradients {N}×{layout.n_columns} = "
            f"{_fmt(grad_bytes)}). {suggest}")

    resident = grad_bytes if grads_here else 0
    if not grads_here:
        host_bytes += grad_bytes
        host_limit = default_limit("cpu")
        if host_bytes > host_limit:
            raise refuse(f"the gradients need {_fmt(grad_bytes)} on the host, {_fmt(host_limit)} available",
                         f"lower fisher_samples (at most {host_limit // max(1, layout.n_columns * 4)})")
    avail = limit - resident - MARGIN
    if avail <= 0:
        hint = "set grad_device: cpu to keep them on the host, or " if cdev.type == "cuda" and grads_here else ""
        raise refuse(f"the gradient matrix alone needs {_fmt(grad_bytes)}",
                     f"{hint}lower fisher_samples (at most {max(0, (limit - MARGIN) // max(1, layout.n_columns * 4))})")

    # per-example chunk
    per_ex = 3 * widest_tensor * 4 + int(activation_bytes)
    m = int(max_micro_batch) if max_micro_batch is not None else \
        max(1, min(256, min(CHUNK_BYTES, avail // 2) // max(1, per_ex)))
    if grad_batch <= m:
        m = max(grad_batch, (m // grad_batch) * grad_batch)
    chunk_bytes = m * per_ex
    if chunk_bytes > avail:
        raise refuse(f"one per-example chunk of {m} example(s) needs {_fmt(chunk_bytes)}",
                     "lower max_micro_batch")

    # blocks
    sizes = layout.sizes()
    routes = {c: choose_route(N, c, engine) for c in sizes}
    sm_bytes = 8
    work = {c: block_work_bytes(routes[c], N, c, col_chunk=col_chunk, sm_parts=sm_parts, sm_bytes=sm_bytes)
            for c in sizes}
    cache_total = sum(n * factor_bytes(routes[c], N, c, sm_bytes) for c, n in sizes.items())
    flops = sum(n * block_flops(routes[c], N, c) for c, n in sizes.items())
    # a batch of blocks that are not evenly spaced is gathered into a copy of its G slice
    strided = {b.size for b in layout.batches() if not b.is_view()}
    # (and every batch is copied to the compute device when the gradients live elsewhere)
    gather = {c: N * c * grad_bytes_per_value if (c in strided or not grads_here) else 0 for c in sizes}
    one = max((work[c] + gather[c] for c in sizes), default=0)
    if one > avail:
        # suggest a block size that fits: the largest c with min(direct, gram) work under the budget
        best = None
        for c in (20000, 10000, 5000, 4000, 2000, 1000, 500, 250, 100, 50):
            r = choose_route(N, c, engine)
            if block_work_bytes(r, N, c, col_chunk=col_chunk, sm_parts=sm_parts) + N * c * 4 <= avail:
                best = c
                break
        hint = f"use block_size: {best}" if best else "lower fisher_samples"
        if grads_here and cdev.type == "cuda":
            hint += " or grad_device: cpu"
        worst_c = max(sizes, key=lambda c: work[c] + gather[c])
        raise refuse(f"one block of {worst_c} weights ({routes[worst_c]} route, N = {N}) needs "
                     f"{_fmt(work[worst_c] + gather[worst_c])} of working memory, {_fmt(avail)} left after the "
                     "gradients", hint + ".")

    # a cached Sherman–Morrison factor IS its working inverse: with the cache it is counted once, under the cache
    kept = {c: work[c] - (factor_bytes(routes[c], N, c, sm_bytes) if routes[c] == "sherman_morrison" else 0)
            for c in sizes}
    one_cached = max((kept[c] + gather[c] for c in sizes), default=0)
    if cache == "never":
        use_cache = False
    elif cache == "always":
        use_cache = True
    else:
        room = avail - one_cached if cache_here else default_limit("cpu") - host_bytes
        use_cache = cache_total <= room
    if cache == "always" and cache_here and cache_total + one_cached > avail:
        raise refuse(f"the factor cache needs {_fmt(cache_total)} plus {_fmt(one_cached)} per block",
                     "set cache_factors: auto (recompute the factors in the update), or factor_device: cpu")
    if use_cache and not cache_here:
        host_bytes += cache_total
    if not use_cache:
        notes.append(f"factor cache of {_fmt(cache_total)} does not fit: factors are recomputed in the update")
    cached = use_cache and cache_here
    budget = min(BATCH_BYTES, avail - (cache_total if cached else 0))
    per_batch, batch_bytes = {}, 0
    for c, n in sizes.items():
        wk = (kept[c] if cached else work[c]) + gather[c]
        k = max(1, min(n, budget // max(1, wk)))
        per_batch[c] = int(k)
        batch_bytes = max(batch_bytes, k * wk)
    peak = resident + max(chunk_bytes, batch_bytes + (cache_total if cached else 0)) + MARGIN
    return MemoryPlan(N, layout.n_columns, grad_bytes, m, chunk_bytes, per_batch, batch_bytes, cache_total, use_cache,
                      peak, host_bytes, limit, flops, routes, str(gdev), str(fdev), str(cdev), notes)


__all__ = ["MemoryPlan", "plan", "available_bytes", "default_limit", "block_work_bytes", "factor_bytes",
           "block_flops", "BATCH_BYTES"]
