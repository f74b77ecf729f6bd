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
:class:`~prunekit.errors.PrunekitError` that prints the numbers and what to change.

Streamed Fisher (the oBERT recipe, Kurtic et al. 2022): when the gradient matrix does not fit but every block's
c×c inverse does (small blocks: Σ_B c_B²·8 = d·c·8 bytes for d weights in blocks of c), and the caller allows it
(``streamable``), G is never stored: the gradients are computed k rows at a time and each block inverse takes a
rank-k Woodbury update (exactly the Sherman–Morrison inverse of λI + GᵀG/N). Memory: the inverses + k·d·4 for one
chunk of rows + one batch of blocks' work; k is the largest count of rows whose chunk fits ``STREAM_ROW_BYTES`` and
what is left. Time: N/k gradient passes, as with G stored. The budget is ``memory_limit``
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
#: Bytes per value of a Sherman–Morrison inverse (prunekit keeps it in float64).
_SM_BYTES = 8
#: Largest chunk of gradient rows a streamed Fisher holds at once.
STREAM_ROW_BYTES = 2 * 2**30


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
    streamed: bool = False  # G never stored: block inverses updated stream_rows gradients at a time
    stream_rows: int = 0

    def summary(self) -> str:
        if self.streamed:
            return (f"OBS memory plan (streamed Fisher): block inverses {_fmt(self.cache_bytes)} on "
                    f"{self.compute_device}, gradients {self.stream_rows} rows at a time ({_fmt(self.grad_bytes)}) of "
                    f"N = {self.n_grads} × {self.columns}, block batches up to {_fmt(self.batch_bytes)}, estimated "
                    f"peak {_fmt(self.peak_bytes)} of limit {_fmt(self.limit)}; ~{self.flops / 1e9:.1f} GFLOP")
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
         grad_bytes_per_value: int = 4, col_chunk: int = DEFAULT_COL_CHUNK, streamable: bool = False) -> MemoryPlan:
    """Plan one OBS step over ``layout`` with N = ``n_grads`` gradients (module docs); raise if it cannot fit.

    ``widest_tensor``: the largest prunable tensor (numel); ``activation_bytes``: one example's activations
    (:func:`prunekit.families.obs.gradients.per_example_activation_bytes`); ``cache``: 'auto', 'always' or 'never';
    ``streamable``: the caller can run a streamed Fisher (module docs), used when storing G does not fit.
    """
    try:
        return _stored_plan(layout, n_grads, widest_tensor=widest_tensor, activation_bytes=activation_bytes,
                            engine=engine, memory_limit=memory_limit, grad_device=grad_device,
                            factor_device=factor_device, compute_device=compute_device, cache=cache,
                            max_micro_batch=max_micro_batch, grad_batch=grad_batch, sm_parts=sm_parts,
                            grad_bytes_per_value=grad_bytes_per_value, col_chunk=col_chunk)
    except PrunekitError as stored:
        if not streamable:
            raise
        cdev = torch.device(compute_device) if compute_device is not None else torch.device(grad_device)
        limit = int(memory_limit) if memory_limit is not None else default_limit(cdev)
        return streamed_plan(layout, int(n_grads), limit, cdev, widest_tensor, activation_bytes, max_micro_batch,
                             grad_batch, str(stored))


def streamed_plan(layout: BlockLayout, N: int, limit: int, cdev: torch.device, widest_tensor: int,
                  activation_bytes: int, max_micro_batch: int | None, grad_batch: int, stored: str) -> MemoryPlan:
    """The plan of a streamed Fisher (module docs), or a refusal with the numbers of both ways (``stored``: why
    storing G does not fit)."""
    sizes = layout.sizes()
    d = layout.n_columns
    inv_bytes = sum(n * c * c * _SM_BYTES for c, n in sizes.items())
    avail = limit - inv_bytes - MARGIN
    per_row = d * 4
    per_ex = 3 * widest_tensor * 4 + int(activation_bytes)
    k = int(min(N, STREAM_ROW_BYTES // max(1, per_row), max(0, avail // 2) // max(1, per_row)))
    cmax = max(sizes, default=1)
    per_block = lambda c: (2 * k * c + k * k + c * c) * 8 + k * c * 4  # noqa: E731 - V, S, Finv·update, gathered G
    if k < 1 or per_block(cmax) + k * per_row > avail:
        need = inv_bytes + per_row + per_block(cmax) + MARGIN
        cbig = max(sizes, key=lambda c: sizes[c] * c * c, default=1)
        c_fit = (limit - MARGIN - 2 * per_row) // max(1, d * _SM_BYTES)
        fix = (f"use blocks of at most {c_fit} weights (block_size: {c_fit}, woodfisherblock)" if c_fit >= 1 else
               "no block size fits: lower the number of prunable weights (targets / ignore)")
        stored = stored.replace("OBS step does not fit in memory: ", "")
        raise PrunekitError(
            f"OBS step does not fit in memory, neither way: storing G: {stored}; streaming the gradients instead (the oBERT "
            f"recipe: no stored G) needs the {sum(sizes.values())} block inverses, {_fmt(inv_bytes)} (d·c·8 for "
            f"{d} weights in blocks of up to {cbig}), plus one gradient row {_fmt(per_row)}: at least {_fmt(need)} "
            f"of limit {_fmt(limit)}. To stream, {fix}; or raise memory_limit")
    budget = min(BATCH_BYTES, avail - k * per_row)
    per_batch = {c: int(max(1, min(n, budget // max(1, per_block(c))))) for c, n in sizes.items()}
    batch_bytes = max((per_batch[c] * per_block(c) for c in sizes), default=0)
    m = int(max_micro_batch) if max_micro_batch is not None else max(1, min(256, CHUNK_BYTES // max(1, per_ex)))
    if grad_batch <= m:
        m = max(grad_batch, (m // grad_batch) * grad_batch)
    peak = inv_bytes + k * per_row + max(batch_bytes, m * per_ex) + MARGIN
    flops = sum(n * float(N) * (2.0 * c * c + k * c) for c, n in sizes.items())
    routes = {c: "sherman_morrison" for c in sizes}
    return MemoryPlan(N, d, k * per_row, m, m * per_ex, per_batch, batch_bytes, inv_bytes, True, peak, 0, limit,
                      flops, routes, str(cdev), str(cdev), str(cdev),
                      [f"streamed Fisher: storing G does not fit ({stored})"], streamed=True, stream_rows=k)


def _stored_plan(layout: BlockLayout, n_grads: int, *, widest_tensor: int, activation_bytes: int,
                 engine: str, memory_limit: int | None, grad_device, factor_device, compute_device, cache: str,
                 max_micro_batch: int | None, grad_batch: int, sm_parts: int, grad_bytes_per_value: int,
                 col_chunk: int) -> MemoryPlan:
    """The plan with G stored (module docs, steps 1-5)."""
    if cache not in ("auto", "always", "never"):
        raise PrunekitError(f"cache_factors must be 'auto', 'always' or 'never', got {cache!r}")
    cdev = torch.device(compute_device) if compute_device is not None else torch.device(grad_device)
    gdev = torch.device(grad_device)
    fdev = torch.device(factor_device) if factor_device is not None else cdev
    limit = int(memory_limit) if memory_limit is not None else default_limit(cdev)
    p = _Planner(layout, int(n_grads), limit, gdev, fdev, cdev, grad_bytes_per_value)
    p.place_gradients()
    m, chunk_bytes = p.chunk(widest_tensor, activation_bytes, max_micro_batch, grad_batch)
    p.block_costs(engine, col_chunk, sm_parts)
    p.choose_cache(cache)
    per_batch, batch_bytes = p.batch_sizes()
    peak = p.resident + max(chunk_bytes, batch_bytes + (p.cache_total if p.cached else 0)) + MARGIN
    return MemoryPlan(p.N, layout.n_columns, p.grad_bytes, m, chunk_bytes, per_batch, batch_bytes, p.cache_total,
                      p.use_cache, peak, p.host_bytes, limit, p.flops, p.routes, str(gdev), str(fdev), str(cdev),
                      p.notes)


class _Planner:
    """The numbers of one :func:`plan`, worked out step by step in the order of the module docs; a step raises
    :meth:`refuse` with the numbers when its part does not fit. Each step keeps on the object what later steps
    read: ``resident``/``avail`` (gradients), ``sizes``/``routes``/``work``/``gather``/``cache_total``/``flops``
    (blocks), ``kept``/``use_cache``/``cached`` (cache); ``host_bytes`` and ``notes`` grow along the way."""

    def __init__(self, layout: BlockLayout, N: int, limit: int, gdev: torch.device, fdev: torch.device,
                 cdev: torch.device, grad_bytes_per_value: int):
        self.layout, self.N, self.limit = layout, N, limit
        self.cdev, self.grad_bytes_per_value = cdev, grad_bytes_per_value
        self.grad_bytes = N * layout.n_columns * grad_bytes_per_value
        self.grads_here = gdev == cdev or (gdev.type == cdev.type == "cpu")
        self.cache_here = fdev == cdev or (fdev.type == cdev.type == "cpu")
        self.host_bytes = 0
        self.notes: list[str] = []

    def refuse(self, msg: str, suggest: str) -> PrunekitError:
        return PrunekitError(
            f"OBS step does not fit in memory: {msg} (limit {_fmt(self.limit)}; gradients {self.N}×"
            f"{self.layout.n_columns} = {_fmt(self.grad_bytes)}). {suggest}")

    def place_gradients(self) -> None:
        """Step 1: G counts against the compute device (``resident``) or the host; ``avail`` is what is left on the
        compute device after it and the margin."""
        layout, grad_bytes, limit = self.layout, self.grad_bytes, self.limit
        self.resident = grad_bytes if self.grads_here else 0
        if not self.grads_here:
            self.host_bytes += grad_bytes
            host_limit = default_limit("cpu")
            if self.host_bytes > host_limit:
                raise self.refuse(f"the gradients need {_fmt(grad_bytes)} on the host, {_fmt(host_limit)} available",
                                  f"lower fisher_samples (at most {host_limit // max(1, layout.n_columns * 4)})")
        self.avail = limit - self.resident - MARGIN
        if self.avail <= 0:
            on_cuda = self.cdev.type == "cuda" and self.grads_here
            hint = "set grad_device: cpu to keep them on the host, or " if on_cuda else ""
            raise self.refuse(f"the gradient matrix alone needs {_fmt(grad_bytes)}",
                              f"{hint}lower fisher_samples (at most "
                              f"{max(0, (limit - MARGIN) // max(1, layout.n_columns * 4))}), or raise memory_limit")

    def chunk(self, widest_tensor: int, activation_bytes: int, max_micro_batch: int | None,
              grad_batch: int) -> tuple[int, int]:
        """Step 2: (examples per batched forward, bytes of that chunk), whole mini-batches when they fit."""
        per_ex = 3 * widest_tensor * 4 + int(activation_bytes)
        m = int(max_micro_batch) if max_micro_batch is not None else \
            max(1, min(256, min(CHUNK_BYTES, self.avail // 2) // max(1, per_ex)))
        if grad_batch <= m:
            m = max(grad_batch, (m // grad_batch) * grad_batch)
        chunk_bytes = m * per_ex
        if chunk_bytes > self.avail:
            raise self.refuse(f"one per-example chunk of {m} example(s) needs {_fmt(chunk_bytes)}",
                              "lower max_micro_batch")
        return m, chunk_bytes

    def block_costs(self, engine: str, col_chunk: int, sm_parts: int) -> None:
        """Steps 3 and 5 for every block size c: its route, working bytes, the bytes of a gathered copy of its G
        slice, the factor cache and the flops; refuses when one block alone is over ``avail``."""
        N, layout = self.N, self.layout
        sizes = self.sizes = layout.sizes()
        routes = self.routes = {c: choose_route(N, c, engine) for c in sizes}
        work = self.work = {c: block_work_bytes(routes[c], N, c, col_chunk=col_chunk, sm_parts=sm_parts,
                                                sm_bytes=_SM_BYTES) for c in sizes}
        self.cache_total = sum(n * factor_bytes(routes[c], N, c, _SM_BYTES) for c, n in sizes.items())
        self.flops = sum(n * block_flops(routes[c], N, c) for c, n in sizes.items())
        # a batch of blocks that are not evenly spaced is gathered into a copy of its G slice
        strided = {b.size for b in layout.batches() if not b.is_view()}
        # (and every batch is copied to the compute device when the gradients live elsewhere)
        gather = self.gather = {c: N * c * self.grad_bytes_per_value if (c in strided or not self.grads_here) else 0
                                for c in sizes}
        one = max((work[c] + gather[c] for c in sizes), default=0)
        if one > self.avail:
            raise self._block_refusal(engine, col_chunk, sm_parts)

    def _block_refusal(self, engine: str, col_chunk: int, sm_parts: int) -> PrunekitError:
        """The error when one block alone does not fit, suggesting the largest block size c whose work does."""
        N, avail, work, gather = self.N, self.avail, self.work, self.gather
        best = None
        for c in (20000, 10000, 5000, 4000, 2000, 1000, 500, 250, 100, 50):
            r = choose_route(N, c, engine)
            if block_work_bytes(r, N, c, col_chunk=col_chunk, sm_parts=sm_parts) + N * c * 4 <= avail:
                best = c
                break
        hint = f"use block_size: {best}" if best else "lower fisher_samples"
        if self.grads_here and self.cdev.type == "cuda":
            hint += " or grad_device: cpu"
        worst_c = max(self.sizes, key=lambda c: work[c] + gather[c])
        return self.refuse(f"one block of {worst_c} weights ({self.routes[worst_c]} route, N = {N}) needs "
                           f"{_fmt(work[worst_c] + gather[worst_c])} of working memory, {_fmt(avail)} left after the "
                           "gradients", hint + ".")

    def choose_cache(self, cache: str) -> None:
        """Step 4: keep the block factors between the passes (``use_cache``) or recompute them in the update."""
        N, routes, work, gather, cache_total = self.N, self.routes, self.work, self.gather, self.cache_total
        # a cached Sherman–Morrison factor IS its working inverse: with the cache it is counted once, under the cache
        kept = self.kept = {c: work[c] - (factor_bytes(routes[c], N, c, _SM_BYTES)
                                          if routes[c] == "sherman_morrison" else 0) for c in self.sizes}
        one_cached = max((kept[c] + gather[c] for c in self.sizes), default=0)
        if cache == "never":
            use_cache = False
        elif cache == "always":
            use_cache = True
        else:
            room = self.avail - one_cached if self.cache_here else default_limit("cpu") - self.host_bytes
            use_cache = cache_total <= room
        if cache == "always" and self.cache_here and cache_total + one_cached > self.avail:
            raise self.refuse(f"the factor cache needs {_fmt(cache_total)} plus {_fmt(one_cached)} per block",
                              "set cache_factors: auto (recompute the factors in the update), or factor_device: cpu")
        if use_cache and not self.cache_here:
            self.host_bytes += cache_total
        if not use_cache:
            self.notes.append(f"factor cache of {_fmt(cache_total)} does not fit: factors are recomputed in the "
                              "update")
        self.use_cache = use_cache
        self.cached = use_cache and self.cache_here

    def batch_sizes(self) -> tuple[dict[int, int], int]:
        """How many blocks of each size go in one batch (at most ``BATCH_BYTES`` of working memory, at least one
        block), and the largest batch's bytes."""
        budget = min(BATCH_BYTES, self.avail - (self.cache_total if self.cached else 0))
        per_batch, batch_bytes = {}, 0
        for c, n in self.sizes.items():
            wk = (self.kept[c] if self.cached else self.work[c]) + self.gather[c]
            k = max(1, min(n, budget // max(1, wk)))
            per_batch[c] = int(k)
            batch_bytes = max(batch_bytes, k * wk)
        return per_batch, batch_bytes


__all__ = ["MemoryPlan", "plan", "streamed_plan", "available_bytes", "default_limit", "block_work_bytes", "factor_bytes",
           "block_flops", "BATCH_BYTES"]
