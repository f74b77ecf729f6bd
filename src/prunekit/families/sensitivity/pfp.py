"""PFP: provable filter pruning (Liebenwein et al., ICLR 2020; seed 002, methods/sensitivity.md §0, 1, 3, 5–7, 10).

PFP prunes the INPUT channels of every layer; a channel that no layer reads any more is removed from the layer
that writes it, so the producer's filters shrink to match. The image channels entering the first layer are never
pruned and the outputs of the network are never removed.

Score (§2–3): the per-weight empirical sensitivities of ``sipp`` with the MAX over conv positions
(:func:`prunekit.families.sensitivity.sipp.sensitivities`), computed on the sample set S (§1: the first |S| examples of
the scoring data, |S| = ⌈C·ln(8·η*·η/δ_S)⌉ unless ``sample_size`` is given). The channel sensitivity of input
channel c of layer ℓ is s_c = max over examples, output neurons i and kernel entries k of channel c of g_{i,(c,k)}:
a max-reduction of the per-weight sensitivities over every dim but the input channel (for a linear layer after a
flatten, over the H·W features the channel owns; :func:`channel_sensitivity`).

Allocation (§5), one ε for every layer ℓ that reads a prunable channel group:

- S_ℓ = Σ_c s_c, p_c = s_c/S_ℓ, K_ℓ = 2·C·ln(8·(P_ℓ+1)·k_ℓ/δ_S)·S_ℓ (P_ℓ output positions, k_ℓ = kh·kw, both 1 for a
  linear layer), m_ℓ(ε) = ⌈3·(6 + 2ε)·K_ℓ/ε²⌉ draws, and u_ℓ(ε) = min(#alive channels, round(Σ_c [1 − (1 −
  p_c)^{m_ℓ}])) kept input channels (at least ``max(1, min_keep_per_layer)``).
- ``det`` keeps the top-u_ℓ channels by s_c (ties: lower index). ``rand`` picks m′ draws with E[unique](m′) = u_ℓ
  (:func:`prunekit.families.sensitivity.sipp.draws_for_unique`), draws counts ~ Multinomial(m′, p) and scales the
  layer's weights of each kept channel by count_c/(m′·p_c), which keeps the layer's pre-activation unbiased.
  ``top``: with m′ as for rand, the channels with p_c ≥ 1/m′ (expected count ≥ 1) are kept unscaled; if there are
  at least u_ℓ of them the top-u_ℓ by s_c are kept and nothing is sampled; otherwise the remaining u_ℓ − |T|
  channels are sampled from the rest R exactly as ``rand`` does, with p restricted to R and renormalized (m′_R
  draws with E[unique] = u_ℓ − |T|, scale count_c/(m′_R·p_c/P_R)). When u_ℓ reaches the number of channels with
  s_c > 0, all of those are kept unscaled (no sampling).
- Propagation (§7): a channel of a group is removed only when every layer reading it drops it (residual-tied
  groups: every member, producers and consumers alike); the producers' rows of a removed channel are masked and
  its producer biases and BatchNorm entries are zeroed by the update hook
  (:func:`prunekit.structured.make_exact`), so it outputs exactly 0 and ``pk.shrink(model, masks)`` returns a
  smaller model with the same outputs. A layer may still drop its input slice of a channel that another reader
  keeps (its own u_ℓ).
- Size: the kept prunable weights after propagation, i.e. the current masks AND
  :func:`prunekit.structured.channel_masks_to_masks` of the removed channels AND each layer's dropped input slices
  (counted with per-layer matrices of alive entries per row and input channel, checked against the final masks).
  The target is round((1 − s)·n) (the ``pk.sparsity`` convention). ε is searched in log ε inside [1e-300, 1e150]
  with the size search of ``sipp`` (:func:`prunekit.families.sensitivity.sipp.search_keep_ratio`: start at the
  predicted ε, a second bracketing point, then Brent's method; at most ``search_iters`` evaluations; stop once
  within ``size_tol``). The prediction is the ``det`` size (no sampling, cheap; for ``det`` it is the size).
- Fill: one channel can carry many weights (a conv channel before a flatten owns H·W columns of every row of the
  linear layer), so the size is a coarse step function of ε and can jump over the ±size_tol window. When no ε
  hits, the selection goes on from the best candidate below the target along the shared-ε path one step at a
  time (u_ℓ → u_ℓ + 1 for det and top; one more draw for rand, so at most one more channel), in the order in which
  a decreasing ε takes them; a layer whose next step would exceed target·(1 + size_tol) is frozen where it is.
  Without a freeze this is the shared-ε selection at a smaller ε; with one, frozen layers keep their larger-ε
  size. The closest candidate is returned (the one below the target on a tie), with a warning if it is still
  outside size_tol.

Choices where methods/sensitivity.md is silent:

- Only channel groups that :func:`prunekit.structured.channel_groups` marks prunable are touched: a layer whose
  input group is not prunable (unsupported operation, the model's output) keeps its input whole. A layer is
  compressed only if its weight is prunable here (in ``ctx.params``), it is a Linear/Conv1d/2d/3d with
  ``groups == 1`` that reads exactly one group; a group loses channels only if all its readers are compressed.
- Unreached bounds: if even the smallest ε-selection (every layer at its minimum of channels) keeps more than
  target·(1 + size_tol), or the largest (every channel with s_c > 0) fewer than target·(1 − size_tol), a
  :class:`PrunekitError` gives the reachable sparsity range. A sparsity that keeps every alive weight returns the
  current masks unchanged.
- The search variable is x ∈ (0, 1], log ε = t_hi − x·(t_hi − t_lo), with [t_lo, t_hi] the part of
  [ln 1e-300, ln 1e150] where the sizes change: at t_hi every m_ℓ = 1, at t_lo every u_ℓ is the number of
  channels with s_c > 0 (one nat of margin each side).
- Sampling is deterministic given the seed (one 62-bit seed drawn from ``ctx.generator`` per selection): each layer
  has its own uniform sequence (``derive_seed(seed, "pfp", param name)``), mapped to channels by the inverse CDF,
  so draw t is the same at every evaluation and the kept set grows with m′ (``rand`` sizes are monotone in ε).
  At most 32·nnz draws per layer, as ``sipp``.
- Channels whose slice is already fully masked are not alive and score 0; masks stay nested. Channels with
  s_c = 0 (never active on S) are dropped even at the smallest ε (§10: pruned first).
- ``max(1, min_keep_per_layer)`` input channels per compressed layer are kept (the best by s_c, unscaled), so no
  layer is emptied. In a group read by several layers (residual stages) each layer keeps its own u_ℓ channels,
  drops its slices of the others, and the group keeps the union.
- ``top`` with its fill steps in u only; ``rand`` draw counts are capped at 32·nnz (then the layer goes full).
- Transformers (BERT family, GPT-2; docs/structured.md): the groups are attention heads and FFN neurons, read
  off the module structure. The layers PFP compresses are those that read a group: the attention output projection
  (a head owns ``head_dim`` input columns, its s_c the max over them) and the second FFN layer; query/key/value and
  the first FFN layer read the hidden state (never pruned) and lose only the rows of removed heads / neurons. Dict
  batches are read through :mod:`prunekit.batches` (``model(**batch)``), GPT-2's ``Conv1D`` weights (in, out) are
  seen transposed, and every token position counts as a position (padded ones included).
- ``PFP.state`` (the method object of the prune call) after a selection: ``search`` (ε, kept, target, hit, evaluations, history, fill, reachable
  range), ``kept_channels`` / ``channels`` per compressed weight, ``group_channels`` per group that may shrink.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from ...errors import PrunekitError
from ...params import PrunableParam, prunable_params
from ...registry import PruningMethod, ScoreContext, register
from ...select import check_sparsity, keep_count
from ...structured.channel_group import ChannelGroup
from ...structured.channel_masks import make_exact
from ...structured.group_cache import groups_by_structure
from ...structured.groups import channel_groups
from ...structured.latency_table import check_round_channels
from ..filters.baselines import why_fixed
from .pfp_plan import LAYERS, Plan, input_group, readers_of
from .scores import (EXAMPLES_PER_FORWARD, KAPPA_MIN, SensitivityOptions, collect, is_conv1d, out_first,
                     sample_inputs, sensitivities)
from .search import search_keep_ratio

log = logging.getLogger("prunekit.pfp")


@dataclass(frozen=True)
class PfpOptions(SensitivityOptions):
    """Options of ``pfp`` (methods/sensitivity.md §0).

    - ``variant``: ``det`` (top-u_ℓ channels by sensitivity), ``rand`` (importance sampling of channels, kept
      channels rescaled) or ``top`` (channels with p_c ≥ 1/m′ kept as they are, the rest sampled).
    - ``delta_s`` δ_S and ``C``: failure probability and constant of the bound; they fix |S| and m_ℓ(ε).
    - ``sample_size``: |S|; None = ⌈C·ln(8·η*·η/δ_S)⌉.
    - ``size_tol``: relative tolerance on the kept count; ``search_iters``: most size evaluations of the ε search.
    - ``round_channels``: every channel group that may shrink (a residual-tied group as a whole, an attention
      layer's heads) keeps a multiple of this many channels, or all its alive channels: after the union of its
      readers' kept channels, the best missing ones (largest sensitivity over the readers) are added back, read
      unscaled by every reader. Applied inside every size evaluation, so the ε search and the fill work on rounded
      sizes. 8 or 16 give SIMD-friendly shrunk widths (16 measured fastest for VGG-16 on a 2-core CPU:
      bench/bench_shrink.py). ``"auto"``: the multiple picked from the cached per-layer latency table
      (:func:`prunekit.structured.latency_table.auto_round_channels`).
    - ``per_weight_scores``: by default the score of a layer whose input channels PFP prunes (a reader) is its
      channel sensitivity s_c on every alive entry of channel c (computed directly, with bounds that skip most
      products: :func:`prunekit.families.sensitivity.channel_bounds.channel_contributions`), and the other layers, which
      PFP never ranks (the first layer, layers reading a group that cannot shrink), score +inf and are not
      measured. True computes every weight's own sensitivity in every layer (the old path: several times slower;
      the same s_c, so the same masks).
    """

    variant: Literal["det", "rand", "top"] = "det"
    round_channels: int | Literal["auto"] = 1
    per_weight_scores: bool | None = None  # None = False (None keeps the ids of runs made before the option)

    def validate(self, path, error) -> None:
        super().validate(path, error)
        check_round_channels(self.round_channels, error)


# ------------------------------------------------------------------------------------ channel sensitivities (§3)


def channel_sensitivity(s: torch.Tensor, channels: int) -> torch.Tensor:
    """s_c for ``channels`` input channels from per-weight sensitivities ``s`` shaped like the weight ((out, C, kh,
    kw) for a conv, (out, C·block) for a linear layer whose input channel owns ``block`` consecutive features):
    the maximum over output neurons and the entries of each channel."""
    return s.reshape(s.shape[0], channels, -1).amax(dim=(0, 2))


def _check_layer(p: PrunableParam) -> None:
    m, w = p.module, p.tensor
    if p.attr == "weight" and w is not None and w.dim() >= 2 and (isinstance(m, LAYERS) or is_conv1d(m)):
        return
    raise PrunekitError(
        f"pfp prunes the weights of Linear, Conv1d and Conv2d layers (and Conv3d, GPT-2's Conv1D); {p.name!r} "
        f"({type(m).__name__}.{p.attr}) is not one: leave it out with exclude=[...] (and do not pass include_bias)")


def _no_reader_message(model: nn.Module, groups: Sequence[ChannelGroup]) -> str:
    fixed = why_fixed(list(groups))
    return ("pfp: no layer reads a prunable channel group, so no channel can be removed (the groups are not prunable "
            "or their layers are excluded" + (f"; not prunable: {fixed}" if fixed else "") + "); use an "
            "unstructured method (sipp is PFP's weight-level counterpart), or change the layers named (e.g. groups=1 "
            "instead of a grouped conv) so their channels can be removed together")


def channel_sensitivities(model: nn.Module, inputs: torch.Tensor, params: Sequence[PrunableParam] | None = None,
                          groups: Sequence[ChannelGroup] | None = None,
                          chunk: int = EXAMPLES_PER_FORWARD) -> dict[str, torch.Tensor]:
    """``{param name: s_c}`` for every prunable weight whose input channels PFP may prune (it reads one prunable
    channel group): the §3 channel sensitivities over the examples ``inputs``. Pure; eval mode."""
    params = list(params) if params is not None else prunable_params(model)
    groups = groups if groups is not None else channel_groups(model, inputs[:2])
    s = sensitivities(model, params, inputs, aggregate="max", chunk=chunk)
    readers = readers_of(groups)
    out = {}
    for p in params:
        ig = input_group(p, readers)
        if ig is not None:
            out[p.name] = channel_sensitivity(out_first(p.module, s[p.name]), ig[0].size)
    return out



# --------------------------------------------------------------------------------------------------- the method


def _select(ctx: ScoreContext, scores: dict, sparsity: float, st: dict) -> dict[str, torch.Tensor]:
    """PFP's selection (§5–7): shared-ε allocation, det/rand/top channels, propagation, size search in log ε.
    ``st``: what the score left (groups, positions); the search and the chosen channels go back into it."""
    o = ctx.options
    s = check_sparsity(sparsity, allow_one=True)
    if "groups" not in st:
        raise RuntimeError("pfp: the selection needs the score of the same round (PFP.score first)")
    st["result"] = None
    names = [p.name for p in ctx.params]
    alive = {n: ctx.masks[n].to(torch.bool) for n in names}
    total = sum(a.numel() for a in alive.values())
    n_alive = sum(int(a.sum()) for a in alive.values())
    target = keep_count(total, s)
    q = ctx.prune_options.min_keep_per_layer if ctx.prune_options is not None else 0
    min_keep = max(1, q)
    if target > n_alive:
        raise PrunekitError(
            f"sparsity {s:g} keeps {target} weights but only {n_alive} are still alive (current sparsity "
            f"{1 - n_alive / total:.4f}); masks are nested, so ask for a sparsity of at least that")
    if target == n_alive:
        return {n: alive[n].clone() for n in names}
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
    plan = Plan(ctx, scores, st, seed, min_keep)
    if not plan.readers:
        raise PrunekitError(_no_reader_message(ctx.model, st["groups"]))
    k_min = plan.evaluate_t(plan.t_of(0.0), "det")[0]
    k_max = plan.evaluate_t(plan.t_of(1.0), "det")[0]
    tol = o.size_tol
    reach = (f"pfp can reach sparsities from {1 - k_max / total:.4f} to {1 - k_min / total:.4f} here "
             f"(keeping {k_max} to {k_min} of {total} prunable weights; size_tol={tol:g})")
    if k_min > target * (1.0 + tol):
        raise PrunekitError(f"sparsity {s:g} (keep {target} weights) is above what channel pruning can reach: "
                            f"{reach}. Every layer already keeps its minimum of max(1, min_keep_per_layer) input "
                            "channels")
    if k_max < target * (1.0 - tol):
        raise PrunekitError(f"sparsity {s:g} (keep {target} weights) is below what channel pruning can reach: "
                            f"{reach}. Input channels with zero sensitivity on S are always removed")
    chosen, history, hit = search_keep_ratio(plan.evaluate, plan.predict, target, o.search_iters, tol)
    kept, result = chosen.kept, chosen.result
    fill = None
    if not hit:  # one channel can carry many weights: continue the ε path channel by channel
        under = [(k, x) for x, k in history if k <= target]
        x_under = max(under)[1] if under else KAPPA_MIN
        k_f, res_f, taken, frozen = plan.fill(plan.t_of(x_under), target, tol)
        fill = {"from_eps": math.exp(plan.t_of(x_under)), "increments": taken, "frozen": frozen, "kept": k_f}
        f_f, f_c = k_f / target - 1.0, kept / target - 1.0
        if abs(f_f) <= tol or (abs(f_f), f_f > 0) < (abs(f_c), f_c > 0):
            kept, result = k_f, res_f
        hit = abs(kept / target - 1.0) <= tol
    masks = plan.masks(result)
    counted = sum(int(m.sum()) for m in masks.values())
    if counted != kept:  # the fast count and the masks must agree
        raise RuntimeError(f"pfp: internal size mismatch ({counted} kept in the masks, {kept} counted)")
    result["masks"] = masks
    st["result"] = result
    eps = math.exp(result["t"])
    st["search"] = {"eps": eps, "kept": kept, "target": target, "hit": hit, "evaluations": len(history),
                    "history": [(math.exp(plan.t_of(x)), k) for x, k in history], "fill": fill,
                    "range": (k_min, k_max)}
    st["kept_channels"] = {r.param.name: int(sel[0].sum()) for r, sel in zip(plan.readers, result["select"])}
    st["channels"] = {r.param.name: r.channels for r in plan.readers}
    st["group_channels"] = {g: int(k.sum()) for g, k in result["groups"].items()}
    st["plan"] = plan
    ratio = kept / target
    if not hit:
        warnings.warn(f"pfp ({o.variant}): no ε keeps the target size within size_tol={tol:g} "
                      f"({len(history)} evaluations and a step-by-step fill); kept {kept} of a target {target} "
                      f"weights ({ratio:.4f} of it, sparsity {1 - kept / total:.4f} instead of {s:.4f})", stacklevel=3)
    log.info("pfp (%s): eps = %.6g keeps %d / target %d (%.4f) after %d evaluations", o.variant, eps, kept, target,
             ratio, len(history))
    return masks


@torch.no_grad()
def _update(ctx: ScoreContext, st: dict) -> None:
    """rand/top: scale each kept channel's input slice by count_c/(m′·p_c); then zero the producer biases and norm
    entries of removed channels (make_exact), so they output exactly 0."""
    result, plan = st.get("result"), st.get("plan")
    if not result or plan is None:
        return
    for r, (keep, scale, _) in zip(plan.readers, result["select"]):
        if scale is None:
            continue
        w = out_first(r.param.module, r.param.tensor)
        view = w.view(w.shape[0], r.channels, -1)
        view.mul_(scale.to(device=w.device, dtype=w.dtype)[None, :, None])
    removed = {g: k for g, k in result["groups"].items() if not bool(k.all())}
    if removed:
        make_exact(ctx.model, plan.groups, removed)


def pfp(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Scores = the per-weight empirical sensitivities (max over conv positions), in [0, 1]; unless
    ``per_weight_scores``, a layer whose input channels PFP prunes gets the channel sensitivity on each alive entry
    and the other layers +inf (see :class:`PfpOptions`). The selection reduces them to channel sensitivities. Also traces the channel groups (one eval forward of two examples, once per architecture)."""
    return pfp_scores(ctx)[0]


def pfp_scores(ctx: ScoreContext) -> tuple[dict[str, torch.Tensor], dict]:
    """(scores, state): the sensitivities and what the selection needs (channel groups, positions, the sample)."""
    o = ctx.options
    if not ctx.params:
        raise PrunekitError("pfp: the model has nothing prunable")
    for p in ctx.params:
        _check_layer(p)
    x, need = sample_inputs(ctx, o, who="pfp")
    groups = groups_by_structure(ctx.model, x[:2], channel_groups)  # traced once per architecture
    readers = readers_of(groups)
    if not any(input_group(p, readers) is not None for p in ctx.params):  # before the sensitivities
        raise PrunekitError(_no_reader_message(ctx.model, groups))
    channels = {}
    if not o.per_weight_scores:  # the readers' channel maxima only (what the selection reads), same values
        for p in ctx.params:
            ig = input_group(p, readers)
            if ig is not None:
                k = out_first(p.module, p.tensor)[0].numel() // ig[0].size  # entries per input channel
                channels[p.name] = (k, ctx.masks[p.name])
    measured = [p for p in ctx.params if p.name in channels] if channels else list(ctx.params)
    run, layers = collect(ctx.model, measured, x, "max", channels=channels)
    out = {}
    for p in ctx.params:
        if p.name not in run:  # not a reader: PFP never ranks its entries (it only loses removed channels' rows)
            out[p.name] = torch.full(p.tensor.shape, math.inf, dtype=torch.float32, device=p.tensor.device)
            continue
        if p.name in channels:  # s_c on every alive entry of channel c
            w = out_first(p.module, p.tensor)
            alive = out_first(p.module, ctx.masks[p.name].to(run[p.name].device)).reshape(w.shape[0], -1)
            sc = run[p.name].repeat_interleave(channels[p.name][0])[None, :] * alive
            out[p.name] = out_first(p.module, sc.reshape(w.shape)).reshape(p.tensor.shape)
            continue
        alive = out_first(p.module, ctx.masks[p.name].to(run[p.name].device)).reshape(run[p.name].shape)
        out[p.name] = out_first(p.module, run[p.name] * alive).reshape(p.tensor.shape)
    state = {"groups": groups, "positions": {lay.param.name: (lay.positions, lay.k) for lay in layers},
             "example": x[:1] if isinstance(x, torch.Tensor) else None,
             "n_samples": int(x.shape[0]), "sample_size": need}
    log.info("pfp: sensitivities from %d examples (|S| = %d)", x.shape[0], need)
    return out, state


@register("pfp", family="sensitivity (provable, filters)", needs_data="inputs", sources=("002",), structured=True,
          options=PfpOptions, dict_batches=True,
          summary="PFP: channel sensitivities on |S| examples; shared-ε input-channel budgets, det top-u or "
                  "importance sampling with rescaling; removed channels propagate to the producing filters")
class PFP(PruningMethod):
    """``pfp`` as a method object: the score's channel groups and statistics (:attr:`state`) feed the selection;
    the selection's channels and rescaling feed the update. ``state['search']`` and ``state['kept_channels']``
    describe the last selection."""

    def __init__(self):
        self.state: dict = {}

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        scores, self.state = pfp_scores(ctx)
        return scores

    def select(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict[str, torch.Tensor]:
        return _select(ctx, scores, sparsity, self.state)

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        _update(ctx, self.state)
