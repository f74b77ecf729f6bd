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

Modules: :mod:`.options` (the codes' options), :mod:`.statistics` (pass 1 with a stored G), :mod:`.streamed` (pass 1
with the Fisher streamed into the block inverses), :mod:`.state` (what pass 1 hands to pass 2), :mod:`.update`
(pass 2) and :mod:`.joint` (the exact joint solve); this module holds the scores, the method classes and the
registration of the codes, and re-exports the option classes, :class:`OBSState`, :func:`obs_statistics`,
:func:`damping` and :func:`obs_update` (``prunekit.criteria.obs`` is this module).
"""
from __future__ import annotations

import torch

from ...batches import labelled_pair
from ...errors import PrunekitError
from ...flops import layer_positions
from ...registry import PruningMethod, ScoreContext, register
from .blocks import make_layout  # noqa: F401  (bench/bench_woodfisher.py reads it from this module)
from .options import FlopsOptions, FullOptions, FullTaylorOptions, GroupOptions, OBSOptions, TaylorOptions
from .state import F64, OBSState
from .statistics import damping, obs_statistics
from .update import obs_update

FAMILY = "second order (OBS)"


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
