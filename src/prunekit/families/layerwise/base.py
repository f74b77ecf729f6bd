"""The driver shared by the layer-wise methods (``sparsegpt``, ``wanda``): calibration, the sequential pass, the
per-layer budgets, N:M patterns and the memory plan.

One :func:`prunekit.prune` round of a layer-wise method:

1. **score**: the layers are checked (:func:`~.calibration.as_layer`), the memory plan is made and refused when it
   does not fit (before any forward), the calibration inputs are read once, and ONE pass over them records the
   forward order and ‖X_j‖₂² of every input column of every layer; the scores are Wanda's |W_ij|·‖X_j‖₂ of the
   current model (for ``sparsegpt`` they are informative only: its masks come from its own selection).
2. **select**: the method's own layer-wise solve, at the round's sparsity. ``sequential: true`` goes through the
   groups in forward order (one per transformer block of a Hugging Face model, else one per layer): each group's
   inputs are captured with every earlier group already pruned (and, for SparseGPT, reconstructed) in the model,
   then its layers are solved (for a Hugging Face model whose blocks allow it, each block runs alone on its
   cached inputs, the previous pruned block's outputs: :meth:`~.calibration.Calibration.prepare_blocks`).
   ``sequential: false`` solves every layer on the inputs of the unpruned model. The
   model's weights are restored before select returns (``try/finally``); the solved weights are kept on the method
   object.
3. **update**: SparseGPT writes its reconstructed weights; ``prune`` then applies the masks.

Budgets: a layer keeps k = min(round((1 − s)·n), alive) weights, exactly (prunekit's layer scope; registered with
``scope="layer"``). Weights pruned earlier (the masks given, or the model's exact zeros) stay pruned and count
toward the target. ``pattern="N:M"``: in every row, each run of M consecutive columns (of the (rows, cols) matrix
of :class:`~.calibration.Layer`) keeps min(N, alive) weights; the sparsity must then be 1 − N/M and the column
count a multiple of M.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ... import distributed
from ...errors import PrunekitError
from ...registry import PruningMethod, ScoreContext
from ...select import check_sparsity, keep_count
from .calibration import Calibration, Layer, as_layer, group_keys

log = logging.getLogger("prunekit.layerwise")
FAMILY = "layer-wise reconstruction"


def parse_pattern(pattern: str | None, error=PrunekitError) -> tuple[int, int] | None:
    """``"N:M"`` → (N, M) with 0 < N < M; None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise error(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise error(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


@dataclass(frozen=True)
class LayerwiseOptions:
    """Options every layer-wise method has.

    - ``sequential``: calibrate each group of layers on the outputs of the groups already pruned (forward order).
    - ``pattern``: ``"N:M"`` semi-structured sparsity (N kept in every M consecutive input columns of a row);
      null = unstructured.
    - ``float64``: compute the statistics and the solve in float64 (always for float64 layers).
    - ``memory_limit``: bytes the calibration statistics may take (default: 70% of the available memory of the
      model's device).
    """

    sequential: bool = True
    pattern: str | None = None
    float64: bool = False
    memory_limit: int | None = None

    def validate(self, path, error) -> None:
        parse_pattern(self.pattern, error)
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise error(f"memory_limit must be a positive number of bytes, got {self.memory_limit}")


def alive_matrices(layer: Layer, mask: torch.Tensor) -> torch.Tensor:
    """A mask in the parameter's shape as [G, rows, cols] (bool)."""
    m = mask.t() if layer.kind == "conv1d_hf" else mask.reshape(mask.shape[0], -1)
    return m.to(torch.bool).reshape(layer.groups, layer.rows, layer.cols)


def nm_keep(scores: torch.Tensor, alive: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[rows, cols] with cols % m == 0: in each row and each run of m columns, the min(n, alive) alive entries of
    highest score (ties: the lower column)."""
    r, c = scores.shape
    s = torch.where(alive, scores, torch.full_like(scores, -torch.inf)).reshape(r, c // m, m)
    idx = torch.sort(s, dim=2, descending=True, stable=True).indices
    top = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx[..., :n], True)
    return top.reshape(r, c) & alive


def row_keep(scores: torch.Tensor, alive: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """[rows, cols]: in row i the ``quota[i]`` alive entries of highest score (ties: the lower column)."""
    s = torch.where(alive, scores, torch.full_like(scores, -torch.inf))
    idx = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(s.shape[1], device=s.device).expand_as(s)
    keep = torch.zeros_like(alive).scatter_(1, idx, ranks < quota.to(s.device)[:, None])
    return keep & alive


@dataclass
class Plan:
    """Bytes of the calibration statistics: per layer (name, columns, bytes), and the peak of the whole pass."""

    layers: list[tuple[str, int, int]]
    peak: int
    limit: int

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    def summary(self) -> str:
        name, cols, b = max(self.layers, key=lambda t: t[2])
        return (f"layer-wise statistics: peak {self.peak / 2**20:.1f} MiB of {self.limit / 2**20:.1f} MiB allowed; "
                f"largest {name!r}: {cols} columns, {b / 2**20:.1f} MiB")


class LayerwiseMethod(PruningMethod):
    """Base of the layer-wise methods (one object per prune call). Subclasses define :meth:`stat_bytes` (memory of
    one layer's statistic), :meth:`solve_group` and may set ``updates``."""

    updates = False  # the method writes reconstructed weights (SparseGPT)

    def __init__(self):
        self.layers: list[Layer] = []
        self.calib: Calibration | None = None
        self.norms: dict[int, torch.Tensor] = {}
        self.solved: dict[str, torch.Tensor] = {}
        self.report: dict = {}

    # ---------------------------------------------------------------------------------------------- helpers
    def dtype(self, ctx: ScoreContext) -> torch.dtype:
        if ctx.options.float64 or any(L.param.tensor.dtype == torch.float64 for L in self.layers):
            return torch.float64
        return torch.float32

    def stat_bytes(self, layer: Layer, itemsize: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_plan(self, model, layers: list[Layer], options, device) -> Plan:
        """The memory of the statistics of ``layers`` under ``options``: the largest group's (sequential: a
        transformer block of a Hugging Face model, else one layer), every layer's at once otherwise; plus
        SparseGPT's two d×d working matrices of the widest layer."""
        from ..obs.planner import available_bytes

        self.layers = layers
        item = torch.finfo(torch.float64 if options.float64 or any(
            L.param.tensor.dtype == torch.float64 for L in layers) else torch.float32).bits // 8
        per = [(L.name, L.cols, self.stat_bytes(L, item)) for L in layers]
        work = max(2 * L.cols * L.cols * item for L in layers) if self.updates else 0
        group: dict[str, int] = {}
        for key, (_, _, b) in zip(group_keys(model, layers) if options.sequential else [""] * len(per), per):
            group[key] = group.get(key, 0) + b
        stats = max(group.values())
        limit = options.memory_limit or int(0.7 * available_bytes(device))
        return Plan(per, stats + work, limit)

    def plan(self, ctx: ScoreContext) -> Plan:
        """:meth:`make_plan` for this call; a PrunekitError with the numbers when the peak exceeds the limit."""
        from ...modes import model_device

        plan = self.make_plan(ctx.model, self.layers, ctx.options, model_device(ctx.model))
        if plan.peak > plan.limit:
            name, cols, b = max(plan.layers, key=lambda t: t[2])
            hint = "" if ctx.options.sequential else "sequential: true (one layer's statistics at a time), "
            raise PrunekitError(
                f"the calibration statistics need {plan.peak / 2**20:.1f} MiB but {plan.limit / 2**20:.1f} MiB are "
                f"allowed (the largest, {name!r}, has {cols} input columns: {b / 2**20:.1f} MiB); use {hint}leave "
                "the largest layers out with ignore=[...], or raise memory_limit")
        return plan

    def keep_target(self, layer: Layer, alive: torch.Tensor, sparsity: float, pattern) -> int:
        n = alive.numel()
        if pattern is not None:
            N, M = pattern
            if abs(sparsity - (1 - N / M)) > 1e-9:
                raise PrunekitError(f"pattern {N}:{M} prunes {1 - N / M:g} of the weights: ask for sparsity="
                                    f"{1 - N / M:g} (got {sparsity:g})")
            return -1  # the pattern decides
        return min(keep_count(n, sparsity), int(alive.sum()))

    def column_norms(self, which, record: bool = False) -> dict[int, torch.Tensor]:
        """‖X_j‖₂² per layer in ``which`` as [G, cols] (float64, on the CPU), from one capture pass (``record``:
        the pass also records the forward order)."""
        dt = self._dtype
        sq = {i: torch.zeros(self.layers[i].groups, self.layers[i].cols, dtype=torch.float64) for i in which}

        def add(i, x):
            sq[i] += self.layers[i].inputs(x, dt).square().sum(0).double().cpu()

        self.calib.capture(list(sq), add, record=record)
        distributed.all_sum(*sq.values())  # DDP: each rank's share of the batches, summed
        return sq

    # ------------------------------------------------------------------------------------------ the protocol
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        self.layers = [as_layer(p) for p in ctx.params]
        pattern = parse_pattern(ctx.options.pattern)
        for L in self.layers:
            if pattern is not None and L.cols % pattern[1]:
                raise PrunekitError(f"pattern {ctx.options.pattern}: {L.name!r} has {L.cols} input columns per row, "
                                    f"not a multiple of {pattern[1]}; leave it out with ignore=[...]")
        self._dtype = self.dtype(ctx)
        self.memory = self.plan(ctx)
        log.info(self.memory.summary())
        self.calib = Calibration(ctx.model, self.layers, ctx.data)
        self.norms = sq = self.column_norms(range(len(self.layers)), record=True)
        return {L.name: self.wanda_scores(L, sq[i]) for i, L in enumerate(self.layers)}

    def wanda_scores(self, layer: Layer, sq: torch.Tensor) -> torch.Tensor:
        """|W_ij|·‖X_j‖₂ in the parameter's shape (float64)."""
        W = layer.matrices(torch.float64).abs().cpu()
        return layer.to_weight(W * sq.sqrt()[:, None, :]).to(layer.param.tensor.device)

    def select(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict:
        s = check_sparsity(sparsity)
        pattern = parse_pattern(ctx.options.pattern)
        alive = {L.name: alive_matrices(L, ctx.masks[L.name]).cpu() for L in self.layers}
        keep = {L.name: self.keep_target(L, alive[L.name], s, pattern) for L in self.layers}
        backup = {L.name: L.param.tensor.detach().clone() for L in self.layers}
        out: dict[str, torch.Tensor] = {}
        try:
            groups = self.calib.groups() if ctx.options.sequential else [list(self.calib.order)]
            cached = ctx.options.sequential and self.calib.prepare_blocks(groups)
            for gi, group in enumerate(groups):
                solved = self.solve_group(ctx, group, alive, keep, pattern, scores, first=gi == 0)
                for i, (mask, W) in solved.items():
                    L = self.layers[i]
                    W = W * mask
                    L.write(W)  # the next groups see this layer pruned (and reconstructed)
                    out[L.name] = L.to_weight(mask).to(ctx.masks[L.name].device)
                    if self.updates:
                        self.solved[L.name] = L.param.tensor.detach().clone()
                if cached and gi + 1 < len(groups):
                    self.calib.advance()
        finally:
            self.calib.blocks, self.calib.block_inputs = None, []  # the cached hidden states go
            with torch.no_grad():
                for L in self.layers:
                    L.param.tensor.copy_(backup[L.name])
        self.report = {"samples": self.calib.samples, "groups": len(groups), "block_cache": bool(cached),
                       "plan": self.memory.summary()}
        return out

    def solve_group(self, ctx, group, alive, keep, pattern, scores, first) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        if not self.updates:
            return
        solved, self.solved = self.solved, {}
        for L in self.layers:
            if L.name in solved:
                L.param.tensor.copy_(solved[L.name])


def memory_plan(model, method: str = "sparsegpt", **options) -> Plan:
    """The memory plan of a layer-wise ``method`` on ``model`` before running it: the statistics' bytes per layer
    (name, input columns, bytes) and the peak against the limit (:attr:`Plan.fits`). ``options``: the method's
    own (``sequential``, ``float64``, ``memory_limit``) and the prunable-tensor options of
    :class:`prunekit.params.ParamSpec` (``targets``, ``ignore``, ...)."""
    from ...modes import model_device
    from ...params import ParamSpec, prunable_params
    from ...registry import get_method

    info = get_method(method)
    spec_names = set(ParamSpec.__dataclass_fields__)
    spec = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in spec_names}
    own = info.make_options(**{k: v for k, v in options.items() if k not in spec_names})
    obj = info.new()
    if not isinstance(obj, LayerwiseMethod):
        raise PrunekitError(f"memory_plan is for the layer-wise methods; {info.name!r} is not one")
    layers = [as_layer(p) for p in prunable_params(model, ParamSpec(**spec))]
    return obj.make_plan(model, layers, own, model_device(model))
