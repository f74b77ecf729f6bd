"""The driver shared by the layer-wise methods (``sparsegpt``, ``wanda``): calibration, the sequential pass, the
per-layer budgets, N:M patterns and the memory plan.

One :func:`prunekit.prune` round of a layer-wise method:

1. **score**: the layers are checked (:func:`~.calibration.as_layer`), the memory plan is made and refused when it
   does not fit (before any forward), the calibration inputs are read once, and ONE pass over them records the
   forward order and ‖X_j‖₂² of every input column of every layer; the scores are Wanda's |W_ij|·‖X_j‖₂ of the
   current model (for ``sparsegpt`` they are informative only: its masks come from its own selection, so its pass
   reads the first calibration batch only, :attr:`LayerwiseMethod.solve_reads_norms`).
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
toward the target.

N:M patterns: the shared ``pattern`` option of :class:`prunekit.prune.PruneOptions` (one knob for every method;
``supports_pattern`` lets it through to these methods' own selection). The groups are those of
:mod:`prunekit.patterns`: M consecutive input columns of a row for Linear / GPT-2 Conv1D, M consecutive input
channels at one kernel position for a convolution; for a convolution the layer's columns are put in (kernel
position, channel) order for the whole solve (:meth:`~.calibration.Layer.channels_fastest`), so the groups are runs
of M consecutive columns there too. In each group the min(n, alive) best weights are kept, n the round's level
(N for a single round; :func:`prunekit.prune.prune` checks the layers and the sparsity before any forward).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ... import distributed
from ...errors import PrunekitError
from ...patterns import Pattern, keep_top_n
from ...registry import PruningMethod, ScoreContext
from ...select import check_sparsity, keep_count
from .calibration import Calibration, Layer, as_layer, group_keys

log = logging.getLogger("prunekit.layerwise")
FAMILY = "layer-wise reconstruction"


@dataclass(frozen=True)
class LayerwiseOptions:
    """Options every layer-wise method has.

    - ``sequential``: calibrate each group of layers on the outputs of the groups already pruned (forward order).
    - ``float64``: compute the statistics and the solve in float64 (always for float64 layers).
    - ``memory_limit``: bytes the calibration statistics may take (default: 70% of the available memory of the
      model's device).
    """

    sequential: bool = True
    float64: bool = False
    memory_limit: int | None = None

    def validate(self, path, error) -> None:
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise error(f"memory_limit must be a positive number of bytes, got {self.memory_limit}")


def alive_matrices(layer: Layer, mask: torch.Tensor) -> torch.Tensor:
    """A mask in the parameter's shape as [G, rows, cols] (bool), in the layer's column order."""
    m = mask.t() if layer.kind == "conv1d_hf" else mask.reshape(mask.shape[0], -1)
    return layer._cols(m.to(torch.bool).reshape(layer.groups, layer.rows, layer.cols))


def nm_keep(scores: torch.Tensor, alive: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[rows, cols] with cols % m == 0: in each row and each run of m columns, the min(n, alive) alive entries of
    highest score (ties: the lower column; :func:`prunekit.patterns.keep_top_n`)."""
    r, c = scores.shape
    return keep_top_n(scores.reshape(-1, m), alive.reshape(-1, m), n).reshape(r, c)


def row_keep(scores: torch.Tensor, alive: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """[rows, cols]: in row i the ``quota[i]`` alive entries of highest score (ties: the lower column)."""
    s = torch.where(alive, scores, torch.full_like(scores, -torch.inf))
    idx = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(s.shape[1], device=s.device).expand_as(s)
    keep = torch.zeros_like(alive).scatter_(1, idx, ranks < quota.to(s.device)[:, None])
    return keep & alive


@dataclass
class Plan:
    """Bytes of one call: the calibration statistics per layer (name, columns, bytes) and their peak
    (``statistics``: the largest group's, plus SparseGPT's three d×d working matrices), and ``working``: what the
    call holds besides them (:meth:`LayerwiseMethod.working_bytes`). ``peak`` is their sum, checked against
    ``limit``."""

    layers: list[tuple[str, int, int]]
    statistics: int
    limit: int
    working: int = 0

    @property
    def peak(self) -> int:
        return self.statistics + self.working

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    def summary(self) -> str:
        name, cols, b = max(self.layers, key=lambda t: t[2])
        return (f"layer-wise memory: peak {self.peak / 2**20:.1f} MiB of {self.limit / 2**20:.1f} MiB allowed "
                f"(statistics {self.statistics / 2**20:.1f} MiB, largest {name!r}: {cols} columns, "
                f"{b / 2**20:.1f} MiB; scores, masks and weight copies {self.working / 2**20:.1f} MiB)")


class LayerwiseMethod(PruningMethod):
    """Base of the layer-wise methods (one object per prune call). Subclasses define :meth:`stat_bytes` (memory of
    one layer's statistic), :meth:`solve_group` and may set ``updates``."""

    updates = False  # the method writes reconstructed weights (SparseGPT)
    supports_pattern = True  # applies the shared N:M pattern in its own selection (prunekit.prune.check_pattern_method)

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

    #: Whether the solve reads the score pass's column norms (wanda); if not (sparsegpt, obc) the score pass reads
    #: only the first calibration batch: it records the forward order, and the returned |W|·‖X‖ (over that batch)
    #: is informative only.
    solve_reads_norms = True

    #: Bytes per weight of the largest layer's selection temporaries (:meth:`working_bytes`).
    transient_per_weight = 40

    def stat_bytes(self, layer: Layer, itemsize: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def working_bytes(self, layers: list[Layer], itemsize: int) -> int:
        """What a call holds besides the statistics, counted from what :meth:`score` and :meth:`select` allocate:
        for every weight the float64 score (8 B), the backup of the weight (``itemsize``), the alive and the new
        mask (2 B) and, for a method that updates, the reconstructed weight (``itemsize``); plus the largest
        layer's selection temporaries, :attr:`transient_per_weight` bytes per weight (Wanda's row ranking: the
        float64 scores, their masked copy, the sorted values and int64 indices, the kept mask). Checked against the
        measured peak by ``bench/bench_layerwise.py --memory``."""
        sizes = [L.groups * L.rows * L.cols for L in layers]
        per = 8 + itemsize + 2 + (itemsize if self.updates else 0)
        return sum(sizes) * per + max(sizes, default=0) * self.transient_per_weight

    def make_plan(self, model, layers: list[Layer], options, device) -> Plan:
        """The memory of the statistics of ``layers`` under ``options``: the largest group's (sequential: a
        transformer block of a Hugging Face model, else one layer), every layer's at once otherwise; plus
        SparseGPT's three d×d working matrices of the widest layer."""
        from ..obs.planner import available_bytes

        self.layers = layers
        item = torch.finfo(torch.float64 if options.float64 or any(
            L.param.tensor.dtype == torch.float64 for L in layers) else torch.float32).bits // 8
        per = [(L.name, L.cols, self.stat_bytes(L, item)) for L in layers]
        work = max(3 * L.cols * L.cols * item for L in layers) if self.updates else 0
        group: dict[str, int] = {}
        for key, (_, _, b) in zip(group_keys(model, layers) if options.sequential else [""] * len(per), per):
            group[key] = group.get(key, 0) + b
        stats = max(group.values())
        limit = options.memory_limit or int(0.7 * available_bytes(device))
        return Plan(per, stats + work, limit, self.working_bytes(layers, item))

    def plan(self, ctx: ScoreContext) -> Plan:
        """:meth:`make_plan` for this call; a PrunekitError with the numbers when the peak exceeds the limit."""
        from ...modes import model_device

        plan = self.make_plan(ctx.model, self.layers, ctx.options, model_device(ctx.model))
        if plan.peak > plan.limit:
            name, cols, b = max(plan.layers, key=lambda t: t[2])
            hint = "" if ctx.options.sequential else "sequential: true (one layer's statistics at a time), "
            raise PrunekitError(
                f"the call needs {plan.peak / 2**20:.1f} MiB but {plan.limit / 2**20:.1f} MiB are allowed: the "
                f"calibration statistics {plan.statistics / 2**20:.1f} MiB (the largest, {name!r}, has {cols} input "
                f"columns: {b / 2**20:.1f} MiB), scores, masks and weight copies {plan.working / 2**20:.1f} MiB; use "
                f"{hint}leave the largest layers out with ignore=[...], or raise memory_limit")
        return plan

    def keep_target(self, layer: Layer, alive: torch.Tensor, sparsity: float, pattern) -> int:
        if pattern is not None:
            return -1  # the pattern decides
        return min(keep_count(alive.numel(), sparsity), int(alive.sum()))

    def check_pattern(self, ctx: ScoreContext, pattern: Pattern) -> None:
        """Refuse the method's options that do not combine with ``pattern`` (before any forward)."""

    def column_norms(self, which, record: bool = False, batches: int | None = None) -> dict[int, torch.Tensor]:
        """‖X_j‖₂² per layer in ``which`` as [G, cols] (float64, on the CPU), from one capture pass (``record``:
        the pass also records the forward order; ``batches``: over the first that many calibration batches)."""
        dt = self._dtype
        sq = {i: torch.zeros(self.layers[i].groups, self.layers[i].cols, dtype=torch.float64) for i in which}

        def add(i, x):
            sq[i] += self.layers[i].inputs(x, dt).square().sum(0).double().cpu()

        self.calib.capture(list(sq), add, record=record, batches=batches)
        distributed.all_sum(*sq.values())  # DDP: each rank's share of the batches, summed
        return sq

    # ------------------------------------------------------------------------------------------ the protocol
    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        self.layers = [as_layer(p) for p in ctx.params]
        pattern = self.pattern(ctx)
        if pattern is not None:
            self.check_pattern(ctx, pattern)
            self.layers = [L.channels_fastest() for L in self.layers]  # N:M groups = runs of M columns
        self._dtype = self.dtype(ctx)
        self.memory = self.plan(ctx)
        log.info(self.memory.summary())
        self.calib = Calibration(ctx.model, self.layers, ctx.data)
        # the pass that records the forward order; its norms are the scores. A method whose solve reads no norms
        # reads one batch here (its scores are informative only), saving a forward over the rest
        self.norms = sq = self.column_norms(range(len(self.layers)), record=True,
                                            batches=None if self.solve_reads_norms else 1)
        return {L.name: self.wanda_scores(L, sq[i]) for i, L in enumerate(self.layers)}

    def wanda_scores(self, layer: Layer, sq: torch.Tensor) -> torch.Tensor:
        """|W_ij|·‖X_j‖₂ in the parameter's shape (float64)."""
        W = layer.matrices(torch.float64).abs().cpu()
        return layer.to_weight(W * sq.sqrt()[:, None, :]).to(layer.param.tensor.device)

    @staticmethod
    def pattern(ctx: ScoreContext) -> Pattern | None:
        """The call's N:M pattern (``prune_options.pattern``), or None."""
        return getattr(ctx.prune_options, "nm", None)

    def select(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict:
        s = check_sparsity(sparsity)
        nm = self.pattern(ctx)
        pattern = None if nm is None else (nm.level(s), nm.m)  # this round's n:M (N on the last round)
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
