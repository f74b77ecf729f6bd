"""The OBS family (seed 003, WoodFisher; second_order.md §§1–6): ``woodfisher``, ``woodtaylor``, ``woodfisherblock``,
``woodfisherblockgroup``, ``woodtaylorblock``, ``woodfisherblockdynamic``, ``woodfisherblock_flops``.

One pruning step (``pk.prune`` calls the score, selects, then the update, then applies the masks):

1. **Score** (pass 1): the gradient matrix G [N, d] of masked mini-batch gradients
   (:func:`prunekit.families.obs.gradients.gradient_matrix`), a block layout (:mod:`prunekit.families.obs.blocks`),
   and per block diag(F⁻¹) of the damped empirical Fisher F = λI + GᵀG/N through the engines of
   :mod:`prunekit.families.obs.engines` (Gram–Woodbury when N < c, direct Cholesky otherwise; equal-size blocks
   batched). Score ρ_q = w_q²/(2[F⁻¹]_qq), the predicted loss increase of removing q alone; WoodTaylor ranks by
   ½(w_q − h_q)²/[F⁻¹]_qq with h = F⁻¹∇L (§5). What the update needs (G, the layout, the diagonal, h and, when the
   memory planner allows, the block factors) stays on the method object (:class:`WoodFisher`, one per prune call).
2. **Select**: prunekit's exact-count selection (global scope by default).
3. **Update** (pass 2): for the newly pruned set Q and each block B with Q∩B non-empty,
   δw_B = −σ·F_B⁻¹ u_B with u_B = Σ_{q∈Q∩B} (w_q/[F⁻¹]_qq)·e_q (``update: sum``, the reference's summed update), or
   the exact joint OBS solution (``update: joint``); WoodTaylor adds the gradient term: δw = −σ·F⁻¹(∇L + Σ μ_q e_q).
   Factors are reused from pass 1 or recomputed. The live weights move in place; ``prune`` then zeroes Q.

The full codes (``woodfisher``, ``woodtaylor``) use ONE block of all d weights through the Gram route: O(N²d + N³)
time and O(Nd + N²) memory, never a d×d matrix. ``woodfisherblock_flops`` through ``pk.prune`` behaves like
``woodfisherblock`` (with the ``flops_power`` reweighting when set) at the sparsity it is given; its FLOPs target is
met by :func:`prune_to_flops`, which computes the statistics once, bisects the sparsity on the masks alone and
applies ONE update (§6).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ... import distributed
from ...batches import BatchStream, call, labelled_pair
from ...errors import PrunekitError
from ...flops import layer_positions
from ...modes import model_device, scoring_mode
from ...registry import PruningMethod, ScoreContext, register
from . import planner as _planner
from .blocks import BlockBatch, BlockLayout, make_layout
from .engines import ShermanMorrisonFactor, cholesky, block_factor
from .gradients import gradient_matrix, mean_gradient, per_example_activation_bytes

log = logging.getLogger("prunekit.obs")
F64 = torch.float64
FAMILY = "second order (OBS)"
#: Working memory of one batch of the joint update (E, X and the |Q|×|Q| systems).
JOINT_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OBSOptions:
    """Options of the OBS family (second_order.md; reference flags in brackets).

    Fisher (§1): ``fisher_samples`` N [--fisher-subsample-size]; ``fisher_batch`` b, examples per gradient
    [--fisher-mini-bsz]; ``fisher_damp`` λ [--fisher-damp]; ``effective_damp``: λ += ``weight_decay``;
    ``true_fisher``: labels sampled from the model; ``hess_label_smoothing``: label smoothing of this loss only;
    ``max_micro_batch``: examples per batched forward (default: the memory planner's).
    Blocks (§4): ``block_size`` c (null = whole tensor, or with ``blocks: global`` one block of all weights);
    ``blocks``: ``layer`` (blocks inside tensors) or ``global`` (chunks of the concatenated vector).
    Engines (§3): ``engine`` auto | gram | direct | sherman_morrison; ``sm_parts`` k (Sherman–Morrison tiling);
    ``centered``: use F − ḡḡᵀ.
    Update (§2): ``scale_prune_update`` σ (0 = no compensation); ``update`` sum | joint; ``joint_max``: largest
    |Q∩B| solved jointly (larger blocks fall back to sum with a warning); ``zero_after_prune``: write δw_q = −w_q;
    ``normalize_update``: rescale δw to ``update_mult``·‖w‖ when longer; ``log_loss_change``: log the measured loss
    change on the Fisher subset next to the predicted one.
    FLOPs (§6): ``flops_power`` p divides ρ by φ_ℓ^p (φ_ℓ = nnz_ℓ·P_ℓ MACs, or P_ℓ with ``flops_per_param``);
    ``input_shape`` for the FLOPs count (default: ``model.input_shape``).
    Memory (§9): ``memory_limit`` bytes (default 70% of available RAM, 90% of free CUDA memory); ``grad_device``,
    ``factor_device``, ``compute_device`` (e.g. ``cpu`` to offload); ``cache_factors`` auto | always | never. When
    the gradient matrix does not fit but the block inverses do, the step streams the gradients into the inverses
    (G never stored; not with ``centered`` or ``update: joint``; see :mod:`.planner`).
    """

    fisher_samples: int = 1000
    fisher_batch: int = 1
    fisher_damp: float = 1e-5
    effective_damp: bool = False
    weight_decay: float = 0.0
    true_fisher: bool = False
    hess_label_smoothing: float = 0.0
    max_micro_batch: int | None = None
    block_size: int | None = 2000
    blocks: Literal["layer", "global"] = "layer"
    engine: Literal["auto", "gram", "direct", "sherman_morrison"] = "auto"
    sm_parts: int = 1
    centered: bool = False
    scale_prune_update: float = 1.0
    update: Literal["sum", "joint"] = "sum"
    joint_max: int = 2048
    zero_after_prune: bool = False
    normalize_update: bool = False
    update_mult: float = 1.0
    log_loss_change: bool = False
    flops_power: float = 0.0
    flops_per_param: bool = False
    input_shape: tuple[int, ...] | None = None
    memory_limit: int | None = None
    grad_device: str | None = None
    factor_device: str | None = None
    compute_device: str | None = None
    cache_factors: Literal["auto", "always", "never"] = "auto"

    def validate(self, path, error) -> None:
        if self.fisher_samples < 1:
            raise error(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.fisher_batch < 1:
            raise error(f"fisher_batch must be >= 1, got {self.fisher_batch}")
        if not self.fisher_damp > 0:
            raise error(f"fisher_damp must be > 0 (it makes the Fisher invertible), got {self.fisher_damp}")
        if self.weight_decay < 0:
            raise error(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.hess_label_smoothing < 1.0:
            raise error(f"hess_label_smoothing must be in [0, 1), got {self.hess_label_smoothing}")
        if self.max_micro_batch is not None and self.max_micro_batch < 1:
            raise error(f"max_micro_batch must be >= 1, got {self.max_micro_batch}")
        if self.block_size is not None and self.block_size < 1:
            raise error(f"block_size must be >= 1 or null, got {self.block_size}")
        if self.sm_parts < 1:
            raise error(f"sm_parts must be >= 1, got {self.sm_parts}")
        if self.joint_max < 1:
            raise error(f"joint_max must be >= 1, got {self.joint_max}")
        if self.update_mult <= 0:
            raise error(f"update_mult must be > 0, got {self.update_mult}")
        if self.flops_power < 0:
            raise error(f"flops_power must be >= 0, got {self.flops_power}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise error(f"memory_limit must be a positive number of bytes, got {self.memory_limit}")
        for name in ("grad_device", "factor_device", "compute_device"):
            v = getattr(self, name)
            if v is not None:
                try:
                    torch.device(v)
                except (RuntimeError, TypeError):
                    raise error(f"{name}: {v!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None


@dataclass(frozen=True)
class FullOptions(OBSOptions):
    """``woodfisher``: one block of all prunable weights (``block_size: null``, ``blocks: global``)."""

    block_size: int | None = None
    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class GroupOptions(OBSOptions):
    """``woodfisherblockgroup``: chunks of ``block_size`` over the concatenated weights (``blocks: global``)."""

    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class TaylorOptions(OBSOptions):
    """WoodTaylor (§5), block version: ``fisher_damp`` defaults to 0.1; ``grad_samples``: examples for ∇L (default:
    the mean of the N stored gradients); ``normalize_hgp``: h ← h/‖h‖; ``woodtaylor_abs``: rank by |ρ_q| with the
    constant −½∇ᵀF⁻¹∇ included (reproduction only)."""

    fisher_damp: float = 0.1
    grad_samples: int | None = None
    normalize_hgp: bool = False
    woodtaylor_abs: bool = False

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.grad_samples is not None and self.grad_samples < 1:
            raise error(f"grad_samples must be >= 1 or null, got {self.grad_samples}")


@dataclass(frozen=True)
class FullTaylorOptions(TaylorOptions):
    """``woodtaylor``: WoodTaylor over one block of all prunable weights."""

    block_size: int | None = None
    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class FlopsOptions(OBSOptions):
    """``woodfisherblock_flops`` (§6): ``flops_target`` in MFLOPs (multiply-accumulates per example / 1e6, as
    :mod:`prunekit.flops` counts them), ``flops_epsilon`` the tolerance of the bisection in MFLOPs,
    ``max_sparsity`` where an unreachable target stops. Used by :func:`prune_to_flops`; through ``pk.prune`` with a
    sparsity the code behaves like ``woodfisherblock`` (with the ``flops_power`` reweighting)."""

    flops_target: float | None = None
    flops_epsilon: float = 0.1
    max_sparsity: float = 0.99

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.flops_target is not None and self.flops_target < 0:
            raise error(f"flops_target must be >= 0 MFLOPs, got {self.flops_target}")
        if not self.flops_epsilon > 0:
            raise error(f"flops_epsilon must be > 0, got {self.flops_epsilon}")
        if not 0.0 < self.max_sparsity < 1.0:
            raise error(f"max_sparsity must be in (0, 1), got {self.max_sparsity}")


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass
class OBSState:
    """What the score leaves for the update (one pruning step)."""

    G: torch.Tensor | None  # None for a streamed Fisher (the cached factors hold the block inverses)
    layout: BlockLayout
    batches: list[BlockBatch]
    factors: list[Any]  # cached factor per batch (None: recompute)
    diag: torch.Tensor  # [n_columns] float64, [F⁻¹]_qq
    w: torch.Tensor  # [n_columns] float64
    lam: float
    taylor: bool
    gbar: torch.Tensor | None = None  # ∇L per column
    h: torch.Tensor | None = None  # F⁻¹∇L per column
    rho: torch.Tensor | None = None
    constant: float = 0.0
    n_grads: int = 0  # N, the gradients behind the Fisher
    plan: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: dict = field(default_factory=dict)


def _devices(o: OBSOptions, model: nn.Module):
    mdev = model_device(model)
    cdev = torch.device(o.compute_device) if o.compute_device else mdev
    gdev = torch.device(o.grad_device) if o.grad_device else mdev
    fdev = torch.device(o.factor_device) if o.factor_device else cdev
    return mdev, gdev, cdev, fdev


def _activation_bytes(model: nn.Module) -> int:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return 0
    p = next(model.parameters())
    try:
        return per_example_activation_bytes(model, torch.zeros(1, *shape, dtype=p.dtype, device=p.device))
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


def damping(o: OBSOptions) -> float:
    return float(o.fisher_damp) + (float(o.weight_decay) if o.effective_damp else 0.0)


def obs_statistics(ctx: ScoreContext, *, taylor: bool, dynamic: bool, G: torch.Tensor | None = None) -> OBSState:
    """Pass 1 of a step: G, the layout, diag(F⁻¹) per block (and h = F⁻¹∇L for WoodTaylor), factors cached when the
    memory planner allows. ``G``: a precomputed gradient matrix (benchmarks), columns as the layout's."""
    o = ctx.options
    model, params = ctx.model, ctx.params
    lam = damping(o)
    mdev, gdev, cdev, fdev = _devices(o, model)
    masks = [ctx.masks[p.name] for p in params]
    layout = make_layout(masks, blocks=o.blocks, block_size=o.block_size, dynamic=dynamic)
    if layout.skipped:
        log.info("OBS: %d tensor(s) have no active weight and are skipped (collapsed)", len(layout.skipped))
    widest = max(p.tensor.numel() for p in params)
    plan_kw = dict(widest_tensor=widest, activation_bytes=_activation_bytes(model), engine=o.engine,
                   memory_limit=o.memory_limit, grad_device=gdev, factor_device=fdev, compute_device=cdev,
                   cache=o.cache_factors, max_micro_batch=o.max_micro_batch, grad_batch=o.fisher_batch,
                   sm_parts=o.sm_parts)
    streamable = G is None and not o.centered and o.update == "sum"
    mplan = _planner.plan(layout, o.fisher_samples, streamable=streamable, **plan_kw)  # refuses before any data
    log.info(mplan.summary())
    if mplan.streamed:
        return _streamed_statistics(ctx, layout, mplan, taylor=taylor, dynamic=dynamic, masks=masks, lam=lam,
                                    devices=(gdev, cdev))
    if G is None:
        G = gradient_matrix(model, params, ctx.data, n_grads=o.fisher_samples, grad_batch=o.fisher_batch,
                            true_fisher=o.true_fisher, generator=ctx.generator, loss=ctx.loss, masks=ctx.masks,
                            active_only=dynamic, device=gdev, label_smoothing=o.hess_label_smoothing,
                            max_micro_batch=mplan.chunk_examples)
    elif G.shape[1] != layout.n_columns:
        raise PrunekitError(f"the given gradient matrix has {G.shape[1]} columns, the layout {layout.n_columns}")
    N = G.shape[0]
    if N != o.fisher_samples:
        mplan = _planner.plan(layout, N, **plan_kw)
    cols = None if layout.columns is None else layout.columns.to(cdev)
    w = torch.cat([p.tensor.detach().reshape(-1) for p in params]).to(cdev, F64)
    active = torch.cat([m.reshape(-1) for m in masks]).to(cdev)
    if cols is not None:
        w, active = w[cols], active[cols]
    gbar, h = _taylor_terms(o, ctx, model, params, cdev, cols, w, lambda: _col_mean(G).to(cdev)) if taylor \
        else (None, None)
    # DDP: the batches of blocks are shared out round robin (prunekit.distributed.owns); each rank inverts its own
    # blocks and the per-weight results are summed over the ranks (disjoint supports: the sum is exact)
    diag = torch.zeros_like(w)
    covered = torch.zeros_like(w)
    batches = layout.batches(mplan.blocks_per_batch, active=active.cpu())
    factors = []
    for i, batch in enumerate(batches):
        if not distributed.owns(i):
            factors.append(None)
            continue
        Gb = batch.gather(G, cdev)
        f = block_factor(Gb, lam, o.engine, center=o.centered, sm_parts=o.sm_parts)
        dg = f.diag(Gb)
        batch.scatter_vec(diag, dg)
        batch.scatter_vec(covered, torch.ones_like(dg))
        if taylor:
            batch.scatter_vec(h, f.apply(Gb, batch.gather_vec(gbar).unsqueeze(-1)).squeeze(-1))
        factors.append(f.to(fdev) if mplan.cache else None)
        del Gb, f
    distributed.all_sum(diag, covered, h)
    diag = torch.where(covered > 0, diag, torch.full_like(w, 1.0 / lam))
    st = OBSState(G, layout, batches, factors, diag, w, lam, taylor, gbar, h, plan=mplan, device=cdev)
    return _finish_statistics(st, o, taylor, active, N, layout, mplan, lam)


def _example_chunks(stream: BatchStream, n: int):
    """The next ``n`` examples of ``stream`` (fewer at the end of the data), as (inputs, targets) pieces."""
    got = 0
    while got < n and (piece := stream.take(n - got)) is not None:
        got += piece[0].shape[0]
        yield piece


def _streamed_statistics(ctx: ScoreContext, layout: BlockLayout, mplan, *, taylor: bool, dynamic: bool,
                         masks: list[torch.Tensor], lam: float, devices) -> OBSState:
    """Pass 1 without a stored G (planner: streamed Fisher, the oBERT recipe): the gradients ``stream_rows`` at a
    time, each block's inverse F_B⁻¹ (from I/λ) updated by the rank-k Woodbury identity
    F⁻¹ ← F⁻¹ − V(N·I + G_B V)⁻¹Vᵀ, V = F⁻¹G_Bᵀ, i.e. exactly the inverse of λI + G_BᵀG_B/N. The inverses are the
    cached Sherman–Morrison factors of the update; WoodTaylor's ∇L is the mean of the streamed gradients
    (``grad_samples`` reads the data again)."""
    o = ctx.options
    model, params = ctx.model, ctx.params
    gdev, cdev = devices
    N, k = o.fisher_samples, mplan.stream_rows
    cols = None if layout.columns is None else layout.columns.to(cdev)
    w = torch.cat([p.tensor.detach().reshape(-1) for p in params]).to(cdev, F64)
    active = torch.cat([m.reshape(-1) for m in masks]).to(cdev)
    if cols is not None:
        w, active = w[cols], active[cols]
    batches = layout.batches(mplan.blocks_per_batch, active=active.cpu())
    finv = []
    for batch in batches:
        f = torch.zeros(batch.count, batch.size, batch.size, dtype=F64, device=cdev)
        f.diagonal(dim1=-2, dim2=-1).fill_(1.0 / lam)
        finv.append(f)
    fro2 = [torch.zeros(batch.count, dtype=F64, device=cdev) for batch in batches]
    gsum = torch.zeros(layout.n_columns, dtype=F64, device=cdev) if taylor else None
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    stream = BatchStream(ctx.data, model_device(model), fdtype, who="the OBS family")
    rows = 0
    while rows < N:
        want = min(k, N - rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a short last chunk is reported once below
            try:
                Gk = gradient_matrix(model, params, _example_chunks(stream, want * o.fisher_batch), n_grads=want,
                                     grad_batch=o.fisher_batch, loss=ctx.loss, masks=ctx.masks,
                                     active_only=dynamic, device=gdev, label_smoothing=o.hess_label_smoothing,
                                     max_micro_batch=mplan.chunk_examples)
            except PrunekitError:
                if rows == 0:
                    raise
                break  # the data ended on a chunk boundary
        for i, batch in enumerate(batches):
            if not distributed.owns(i):
                continue
            Gb = batch.gather(Gk, cdev).to(F64)  # [nb, k, c]
            V = torch.bmm(finv[i], Gb.transpose(1, 2))  # [nb, c, k]
            S = torch.bmm(Gb, V)
            S.diagonal(dim1=-2, dim2=-1).add_(float(N))
            L = cholesky(S, S.shape[-1], "N·I + G_B F_B⁻¹ G_Bᵀ")
            finv[i] -= torch.bmm(V, torch.cholesky_solve(V.transpose(1, 2), L))
            fro2[i] += Gb.square().sum((1, 2))
        if taylor:
            gsum += _col_mean(Gk).to(cdev) * Gk.shape[0]
        rows += Gk.shape[0]
        if Gk.shape[0] < want:
            break
        del Gk
    if rows < N:
        warnings.warn(f"data holds {rows * o.fisher_batch} examples, fewer than fisher_samples × fisher_batch = "
                      f"{N} × {o.fisher_batch}: the streamed Fisher normalizes by N = {N}; pass fisher_samples="
                      f"{rows} for the mean over the gradients read", stacklevel=4)
    factors = [ShermanMorrisonFactor.from_inverse(f, r, lam, N) for f, r in zip(finv, fro2)]
    gbar, h = _taylor_terms(o, ctx, model, params, cdev, cols, w, lambda: gsum / max(1, rows)) if taylor \
        else (None, None)
    diag = torch.zeros_like(w)
    covered = torch.zeros_like(w)
    for i, (batch, f) in enumerate(zip(batches, factors)):
        if not distributed.owns(i):
            continue
        dg = f.diag(None)
        batch.scatter_vec(diag, dg)
        batch.scatter_vec(covered, torch.ones_like(dg))
        if taylor:
            batch.scatter_vec(h, f.apply(None, batch.gather_vec(gbar).unsqueeze(-1)).squeeze(-1))
    distributed.all_sum(diag, covered, h)
    diag = torch.where(covered > 0, diag, torch.full_like(w, 1.0 / lam))
    st = OBSState(None, layout, batches, factors, diag, w, lam, taylor, gbar, h, plan=mplan, device=cdev)
    return _finish_statistics(st, o, taylor, active, N, layout, mplan, lam)


def _finish_statistics(st: OBSState, o, taylor: bool, active: torch.Tensor, N: int, layout: BlockLayout, mplan,
                       lam: float) -> OBSState:
    """ρ (and WoodTaylor's constant) from the state's diag, w and h; the step's numbers in ``st.report``."""
    w, h = st.w, st.h
    if taylor:
        st.constant = -0.5 * float((st.gbar * h).sum())
        if o.normalize_hgp:
            nrm = float(h.norm())
            if nrm > 0:
                st.h = h / nrm
    num = w - st.h if taylor else w
    rho = num.square() / (2.0 * st.diag)
    if taylor and o.woodtaylor_abs:
        rho = (rho + st.constant).abs()
    st.rho = torch.where(active, rho, torch.zeros_like(rho))
    st.n_grads = N
    st.report.update(n_grads=N, layout=layout.describe(), plan=mplan.summary(), lam=lam)
    if taylor:
        log.info("WoodTaylor: constant term -½·∇ᵀF⁻¹∇ = %.6g (same for every weight, not ranked)", st.constant)
    return st


def _col_mean(G: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty(G.shape[1], dtype=F64, device=G.device)
    for a in range(0, G.shape[1], chunk):
        out[a: a + chunk] = G[:, a: a + chunk].to(F64).mean(0)
    return out


def _taylor_terms(o, ctx, model, params, cdev, cols, w, gradient_mean):
    """WoodTaylor's (ḡ, h): ḡ the mean gradient over ``grad_samples`` examples when set, else
    ``gradient_mean()`` (the mean of the Fisher's own gradients: stored or streamed); h the zero accumulator."""
    if o.grad_samples is not None:
        gfull = mean_gradient(model, params, ctx.data, n_examples=o.grad_samples, loss=ctx.loss,
                              masks=ctx.masks, label_smoothing=o.hess_label_smoothing).to(cdev)
        gbar = gfull if cols is None else gfull[cols]
    else:
        gbar = gradient_mean()
    return gbar, torch.zeros_like(w)


def _flops_divisors(model, params, masks, o: OBSOptions, data=None) -> dict[str, float]:
    example = None
    if o.input_shape is None and getattr(model, "input_shape", None) is None and data is not None:
        x, _ = labelled_pair(next(iter(data)))  # a transformer: trace one example of the data (its sequence length)
        example = x[:1]
    layers = layer_positions(model, o.input_shape, example)
    out = {}
    for p in params:
        lf = layers.get(p.module_name)
        if lf is None:
            raise PrunekitError(f"flops_power: module {p.module_name!r} is not a Conv/Linear layer whose FLOPs "
                                "prunekit counts; set flops_power: 0")
        phi = lf.positions if o.flops_per_param else int(masks[p.name].sum()) * lf.positions
        out[p.name] = float(phi) ** o.flops_power + 1e-10
    return out


def _scores(ctx: ScoreContext, st: OBSState) -> dict[str, torch.Tensor]:
    params = ctx.params
    d = sum(p.tensor.numel() for p in params)
    if st.layout.columns is not None:
        full = torch.zeros(d, dtype=F64, device=st.device)
        full[st.layout.columns.to(st.device)] = st.rho
    else:
        full = st.rho
    o = ctx.options
    div = _flops_divisors(ctx.model, params, ctx.masks, o, ctx.data) if o.flops_power > 0 else None
    out, off = {}, 0
    for p in params:
        n = p.tensor.numel()
        s = full[off: off + n].reshape(p.tensor.shape)
        if div is not None:
            s = s / div[p.name]
        out[p.name] = s.to(p.tensor.device)
        off += n
    return out


class WoodFisher(PruningMethod):
    """The OBS codes as one method object per prune call: :meth:`score` computes the statistics of pass 1 and keeps
    them; :meth:`update` applies pass 2 with them once (the report of the step is then in :attr:`report`)."""

    taylor = False  # WoodTaylor: rank and update with the first-order term
    dynamic = False  # woodfisherblockdynamic: blocks over the active weights, growing block size

    def __init__(self):
        self.state: OBSState | None = None
        self.report: dict = {}

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        self.state = obs_statistics(ctx, taylor=self.taylor, dynamic=self.dynamic)
        return _scores(ctx, self.state)

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        st, self.state = self.state, None
        if st is not None:
            obs_update(ctx, st, before, after)
            self.report = st.report


class WoodTaylor(WoodFisher):
    taylor = True


class WoodFisherDynamic(WoodFisher):
    dynamic = True


# -------------------------------------------------------------------------------------------------------- update


def obs_update(ctx: ScoreContext, st: OBSState, before: dict, after: dict) -> None:
    """Pass 2: move the live weights by the OBS update for Q = before & ~after (module docs), with the statistics
    ``st`` of pass 1; the step's numbers go to ``st.report``. Runs under no_grad."""
    o = ctx.options
    dev = st.device
    q_full = torch.cat([(before[p.name] & ~after[p.name]).reshape(-1) for p in ctx.params]).to(dev)
    cols = None if st.layout.columns is None else st.layout.columns.to(dev)
    Q = q_full if cols is None else q_full[cols]
    if not bool(Q.any()) and not st.taylor:
        return
    # counted once over the ranks (summed below)
    predicted = float(st.rho[Q].sum()) if o.update == "sum" and distributed.is_main() else 0.0
    with torch.no_grad():
        delta, predicted, fell_back = _block_deltas(st, o, Q, predicted)
    distributed.all_sum(delta)
    predicted, fell_back = distributed.sum_int(predicted), distributed.sum_int(fell_back)
    if fell_back:
        warnings.warn(f"update: joint: {fell_back} block(s) have more than joint_max={o.joint_max} newly pruned "
                      "weights; they use the summed update", stacklevel=3)
    if o.normalize_update:
        nd, nw = float(delta.norm()), float(st.w.norm())
        if nw > 0 and nd > o.update_mult * nw:
            delta *= o.update_mult * nw / nd
    if cols is not None:
        full = torch.zeros(q_full.numel(), dtype=F64, device=dev)
        full[cols] = delta
    else:
        full = delta
    loss_before = _subset_loss(ctx, st) if o.log_loss_change else None
    _move_weights(ctx.params, full, before, after, zero=o.zero_after_prune or o.log_loss_change)
    _report_update(ctx, st, predicted, int(Q.sum()), float(delta.norm()), loss_before)


def _block_deltas(st: OBSState, o: OBSOptions, Q: torch.Tensor, predicted: float) -> tuple[torch.Tensor, float, int]:
    """δw over the columns from the batches of blocks this rank owns (DDP: the owner of a batch updates it; the caller
    sums over the ranks), ``predicted`` with each block batch's predicted increase added in turn, and the number of
    blocks where ``update: joint`` fell back to the summed update. Without WoodTaylor only the blocks meeting Q move."""
    delta = torch.zeros_like(st.w)
    fell_back = 0
    for i, batch in enumerate(st.batches):
        if not distributed.owns(i):
            continue
        qb = batch.gather_vec(Q)
        has = qb.any(1)
        if not st.taylor and not bool(has.any()):
            continue
        sub = batch
        keep = None
        if not st.taylor and not bool(has.all()):
            keep = torch.nonzero(has, as_tuple=True)[0]
            sub = BlockBatch(batch.size, [batch.starts[j] for j in keep.tolist()])
            qb = qb[keep]
        Gb = None if st.G is None else sub.gather(st.G, st.device)
        f = st.factors[i]
        if f is not None:  # cached in pass 1 (for every block of the batch)
            f = (f if keep is None else f.select(keep.cpu())).to(st.device)
        else:
            f = block_factor(Gb, st.lam, o.engine, center=o.centered, sm_parts=o.sm_parts)
        if o.update == "joint":
            d, predicted, fb = _joint_delta(st, o, sub, f, Gb, qb, predicted)
            fell_back += fb
        else:
            num, db = _numerators(st, sub)
            coef = torch.where(qb, num / db, torch.zeros_like(num))
            d = -float(o.scale_prune_update) * _inverse_times(st, sub, f, Gb, coef)
        sub.scatter_vec(delta, d, add=True)
        del Gb, f
    return delta, predicted, fell_back


def _numerators(st: OBSState, sub: BlockBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(w − h for WoodTaylor, else w; [F⁻¹]_qq) on the blocks of ``sub``."""
    wb, db = sub.gather_vec(st.w), sub.gather_vec(st.diag)
    hb = sub.gather_vec(st.h) if st.taylor else None
    num = wb - hb if st.taylor else wb
    return num, db


def _inverse_times(st: OBSState, sub: BlockBatch, f, Gb: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """F_B⁻¹(coef + ∇L_B) for WoodTaylor, F_B⁻¹·coef otherwise, per block of ``sub``."""
    V = coef + sub.gather_vec(st.gbar) if st.taylor else coef
    return f.apply(Gb, V.unsqueeze(-1)).squeeze(-1)


def _joint_delta(st: OBSState, o: OBSOptions, sub: BlockBatch, f, Gb: torch.Tensor, qb: torch.Tensor,
                 predicted: float) -> tuple[torch.Tensor, float, int]:
    """``update: joint`` on one batch of blocks: the exact joint solution where |Q∩B| ≤ joint_max, the summed update
    on the others, plus the gradient term for WoodTaylor. Returns (δw of the batch, ``predicted`` with this batch's
    increase added, the number of blocks that fell back to the summed update)."""
    num, db = _numerators(st, sub)
    dq, pred, fb = _joint(f, Gb, qb, num, o.joint_max)
    predicted += pred
    coef = torch.where(qb & fb[:, None], num / db, torch.zeros_like(num))
    if bool(fb.any()) or st.taylor:
        dq = dq + _inverse_times(st, sub, f, Gb, coef)
        if bool(fb.any()):
            predicted += float(sub.gather_vec(st.rho)[qb & fb[:, None]].sum())
    return -float(o.scale_prune_update) * dq, predicted, int(fb.sum())


def _move_weights(params, full: torch.Tensor, before: dict, after: dict, *, zero: bool) -> None:
    """Adds δw (flat over all prunable tensors) to the live tensors; ``zero``: writes exact zeros at the newly pruned
    weights."""
    with torch.no_grad():
        off = 0
        for p in params:
            t = p.tensor
            n = t.numel()
            t.add_(full[off: off + n].reshape(t.shape).to(t.device, t.dtype))
            if zero:
                t.masked_fill_((before[p.name] & ~after[p.name]).to(t.device), 0.0)
            off += n


def _report_update(ctx: ScoreContext, st: OBSState, predicted: float, newly_pruned: int, update_norm: float,
                   loss_before: float | None) -> None:
    """The step's numbers into ``st.report`` and the log (the measured loss change with ``log_loss_change``)."""
    st.report.update(predicted_increase=predicted, newly_pruned=newly_pruned, update_norm=update_norm)
    if st.taylor:
        st.report["constant"] = st.constant
    if loss_before is not None:
        loss_after = _subset_loss(ctx, st)
        st.report.update(loss_before=loss_before, loss_after=loss_after)
        log.info("OBS step: predicted loss increase %.6g, measured %.6g on the Fisher subset", predicted,
                 loss_after - loss_before)
    else:
        log.info("OBS step: %d weights pruned, predicted loss increase %.6g", newly_pruned, predicted)


def _joint(f, Gb, qb, num, joint_max: int):
    """Exact joint OBS per block: δw_B = −F_B⁻¹E_Q([F⁻¹]_QQ)⁻¹·num_Q (num = w, or w − h for WoodTaylor; the
    caller adds the gradient term and σ). Returns (δ [nb, c] without σ, predicted increase, fallback mask [nb])."""
    nb, c = qb.shape
    counts = qb.sum(1)
    fallback = counts > joint_max
    use = (~fallback) & (counts > 0)
    out = torch.zeros(nb, c, dtype=F64, device=qb.device)
    pred = 0.0
    idx = torch.nonzero(use, as_tuple=True)[0]
    if idx.numel() == 0:
        return out, pred, fallback
    qmax = int(counts[idx].max())
    step = max(1, JOINT_BYTES // max(1, 3 * c * qmax * 8))
    for a in range(0, idx.numel(), step):
        j = idx[a: a + step]
        fj = f.select(j) if j.numel() != nb else f
        Gj = Gb if Gb is None or j.numel() == nb else Gb[j]
        qj, nj = qb[j], num[j]
        k = j.numel()
        pos = torch.argsort((~qj).to(torch.int8), dim=1, stable=True)[:, :qmax]  # Q positions first, in order
        valid = torch.arange(qmax, device=qb.device)[None, :] < counts[j][:, None]
        E = torch.zeros(k, c, qmax, dtype=F64, device=qb.device)
        E.scatter_(1, pos[:, None, :], valid[:, None, :].to(F64))
        X = fj.apply(Gj, E)  # F⁻¹E_Q [k, c, qmax]
        S = X.gather(1, pos[:, :, None].expand(k, qmax, qmax))  # [F⁻¹]_QQ
        vv = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(qmax, dtype=F64, device=qb.device).expand(k, qmax, qmax)
        S = torch.where(vv, S, eye)
        S = 0.5 * (S + S.transpose(1, 2))
        rhs = torch.where(valid, nj.gather(1, pos), torch.zeros(k, qmax, dtype=F64, device=qb.device))
        L = cholesky(S, qmax, "[F⁻¹]_QQ")
        z = torch.cholesky_solve(rhs.unsqueeze(-1), L)
        out[j] = torch.bmm(X, z).squeeze(-1)
        pred += 0.5 * float((rhs.unsqueeze(-1) * z).sum())
    return out, pred, fallback


def _subset_loss(ctx: ScoreContext, st: OBSState) -> float:
    """Mean loss over the Fisher subset (the first N·b examples), eval mode, no grad."""
    o = ctx.options
    want = st.n_grads * o.fisher_batch
    dev = model_device(ctx.model)
    total, got = 0.0, 0
    with scoring_mode(ctx.model, "eval"), torch.no_grad():
        for batch in ctx.data:
            if got >= want:
                break
            x, y = labelled_pair(batch)
            x, y = x[: want - got].to(dev), y[: want - got].to(dev)
            total += float(ctx.loss(call(ctx.model, x), y)) * x.shape[0]
            got += x.shape[0]
    return total / max(1, got)


# ---------------------------------------------------------------------------------------------------- registration

# Experiments feed the whole training split in a seeded order (``samples: all``); the step reads only its first
# fisher_samples × fisher_batch examples, i.e. a seeded random subset without replacement (§1).
_COMMON = dict(family=FAMILY, needs_data="labels", sources=("003",), default_samples="all", dict_batches=True)

register("woodfisher", options=FullOptions, **_COMMON,
         summary="WoodFisher: OBS statistic and update with one damped empirical-Fisher inverse over all weights "
                 "(Gram–Woodbury, never d×d)")(WoodFisher)
register("woodtaylor", options=FullTaylorOptions, **_COMMON,
         summary="WoodTaylor: WoodFisher plus the first-order term (ranks ½(w−F⁻¹∇L)²/[F⁻¹]_qq, gradient step in the "
                 "update)")(WoodTaylor)
register("woodfisherblock", options=OBSOptions, **_COMMON,
         summary="WoodFisher with a block-diagonal Fisher inverse (blocks of block_size inside each layer)")(WoodFisher)
register("woodfisherblockgroup", options=GroupOptions, **_COMMON,
         summary="woodfisherblock with blocks: global (chunks of the concatenated weights, may straddle layers)")(
    WoodFisher)
register("woodtaylorblock", options=TaylorOptions, **_COMMON,
         summary="WoodTaylor with the block-diagonal Fisher inverse")(WoodTaylor)
register("woodfisherblockdynamic", options=OBSOptions, **_COMMON,
         summary="woodfisherblock over active weights only; the block size grows as c0·d_total/d_active")(
    WoodFisherDynamic)
register("woodfisherblock_flops", options=FlopsOptions, **_COMMON,
         summary="woodfisherblock with a FLOPs target: prune_to_flops bisects the sparsity and applies one update")(
    WoodFisher)


# ------------------------------------------------------------------------------------------------------------ FLOPs


def flops_schedule_target(epoch: float, start: float, end: float, phi0: float, target: float,
                          degree: float = 3) -> float:
    """Φ(e) = F + (Φ₀ − F)·(1 − min(1, (e − start)/(end − start)))^degree: the cubic schedule applied to FLOPs."""
    frac = 1.0 if end <= start else min(1.0, max(0.0, (epoch - start) / (end - start)))
    return target + (phi0 - target) * (1.0 - frac) ** degree


__all__ = ["OBSOptions", "FullOptions", "GroupOptions", "TaylorOptions", "FullTaylorOptions", "FlopsOptions",
           "OBSState", "obs_statistics", "obs_update", "flops_schedule_target", "damping",
           "WoodFisher", "WoodTaylor", "WoodFisherDynamic"]
