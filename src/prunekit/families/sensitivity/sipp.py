"""SiPP: sensitivity-informed provable pruning of single weights (seed 002; methods/sensitivity.md §0–2, 4–6, 10).

Score (§2): the empirical sensitivity s_ij = max over the sample set S of g_ij(x), the relative contribution of edge
j → i to the positive (W_ij > 0) or negative (W_ij < 0) part of neuron i's bias-free pre-activation, in [0, 1].
Convolutions are unfolded into patches; output channel i is the neuron and the positions are aggregated by MEAN
(``det``) or MAX (``rand``, ``hybrid``) before the maximum over examples. A layer input with a negative entry is
split into the two points max(a, 0) and max(−a, 0). |z| ≤ float32 eps gives g = 0. The model runs in eval mode and
is left unchanged.

Sample set (§1): the first |S| examples of the scoring data, |S| = ⌈C·ln(8·η*·η/δ_S)⌉ (:func:`sample_size`), with η
and η* the summed and the largest per-example output counts of the prunable layers.

Selection (§4–6):

- ``det``: the global top-B sensitivities, B = round((1 − s)·n) exact, nested, one weight reserved per tensor.
- ``rand``: every neuron side i gets an expected number m_i = ⌈m_i*⌉ of distinct kept weights from the convex
  allocation min Σ_ℓ (1/n_ℓ)·Σ_i ε_i(m_i) s.t. 0 ≤ m_i ≤ nnz_i, Σ m_i ≤ B, solved exactly by Lagrangian bisection
  (:class:`Allocation`); m_i becomes n_i draws (E[unique](n_i) = m_i), counts ~ Multinomial(n_i, p_i) with
  p_i ∝ s_i, and survivors are reweighted to W_ij·count_ij/(n_i·p_ij) (unbiased), written into the model by the
  method's update hook. A side whose draws cover all its nnz_i entries, or with m_i ≥ nnz_i, stays unchanged.
- ``hybrid``: per side, the deterministic top-m_i when C·Σ_dropped s ≤ ε_i(m_i), sampling otherwise.
- Size search: the internal budget ratio κ′ (B = κ′·n) is found by Brent's method on f(κ′) = kept(κ′)/target − 1
  until the kept count is within ``size_tol`` of round((1 − s)·n), at most ``search_iters`` evaluations.
  Sensitivities are computed once. The draws reuse one seed (taken from ``ctx.generator``) at every evaluation and
  are nested in n (draw t of a side is the same whatever n), so f is deterministic and, for ``rand``, monotone.

Choices where methods/sensitivity.md is silent:

- |S| counts the prunable layers only (η, η* over ``ctx.params``); S is the first |S| examples of ``ctx.data`` (a
  warning when fewer are available).
- Linear inputs with extra dimensions: those are positions, like a conv's. Computation in float32 (float64 for
  float64 models).
- nnz_i counts the entries with s_ij > 0 (the support of p_i); an unchanged side keeps all its alive weights.
- m_i is at least 1 for every side with S_i > 1e-12 (so the smallest reachable size is about the number of sides);
  n_i is the integer whose E[unique] is closest to m_i, at most 32·nnz_i.
- The search starts at the κ′ whose allocation predicts the target (E[unique] = m_i, no sampling) and brackets
  with the prediction corrected by the observed error, or with the ends of (0, 1]. Without a hit it returns the
  candidate closest to the target (the one below on a tie) and warns with the achieved ratio.
- ``max(1, min_keep_per_layer)`` weights per tensor are reserved (§10's default is 1), except when the target is
  smaller than that many weights over all tensors.
- Only Linear and Conv1d/2d/3d weights (groups included) and GPT-2's ``Conv1D`` (weight stored (in, out), seen
  transposed) are supported; the scope is always global.
- Dict batches (Hugging Face style, ``model(**batch)``) are read through :mod:`prunekit.batches`; |S| is then
  counted on one forward of the first example, and the positions of a linear layer over a sequence are its tokens
  (padded ones included).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import PrunekitError
from ...registry import PruningMethod, ScoreContext, register
from ...select import check_sparsity, keep_among_alive, keep_count
from ...select import select as select_top
from ...seeding import derive_seed

log = logging.getLogger("prunekit.sipp")

from .budget import (Allocation, allocate, draws_for_unique, eps_bound, inv_log_h, log_factor, log_h)
from .scores import (DRAW_BLOCK, DRAW_CAP, EXAMPLES_PER_FORWARD, Layer, S_ZERO, SensitivityOptions, activation_counts,
                     collect, layer_view, out_first, patches, relative_contributions, sample_inputs, sample_size,
                     sensitivities)
from .search import search_keep_ratio


@dataclass(frozen=True)
class SippOptions(SensitivityOptions):
    """Options of ``sipp`` (methods/sensitivity.md §0).

    - ``variant``: ``det`` (global top-k of the sensitivities), ``rand`` (importance sampling with reweighting) or
      ``hybrid`` (per neuron side, deterministic or sampled, whichever error bound is smaller).
    - ``delta_s`` δ_S and ``C``: failure probability and constant of the bounds; they fix |S| and the ε_i(m).
    - ``sample_size``: |S|; None = ⌈C·ln(8·η*·η/δ_S)⌉ (152 for LeNet-300-100).
    - ``size_tol``: relative tolerance on the kept count of ``rand``/``hybrid``; ``search_iters``: most evaluations
      of the keep-ratio search.
    """

    variant: Literal["det", "rand", "hybrid"] = "det"



# ------------------------------------------------------------------------------------- per-layer sides, realization


class Sides:
    """The neuron sides of one layer as rows of a (2I, J) matrix: rows < I positive, rows ≥ I negative weights."""

    def __init__(self, layer: Layer, s: torch.Tensor, alive: torch.Tensor, o: SippOptions, index: int):
        mod = layer.param.module
        w = out_first(mod, layer.param.tensor.detach()).reshape(layer.out, -1).double()
        s = out_first(mod, s).reshape(layer.out, -1).double()
        alive = out_first(mod, alive).reshape(layer.out, -1).to(w.device, torch.bool)
        self.layer, self.index, self.I = layer, index, layer.out
        self.w2 = torch.cat([w, w])
        self.s2d = s * alive
        pos, neg = (w > 0) & alive, (w < 0) & alive
        self.alive = alive
        self.member = torch.cat([pos, neg])
        sv = torch.cat([s * pos, s * neg])
        self.S = sv.sum(1)
        self.nnz = (sv > 0).sum(1).double()
        self.members = self.member.sum(1).double()
        self.active = (self.S > S_ZERO) & (self.nnz > 0)
        self.p = sv / torch.where(self.active, self.S, torch.ones_like(self.S))[:, None]
        self.K = log_factor(layer.positions, layer.k, o.delta_s, o.C) * self.S
        self.weight = torch.full_like(self.S, 1.0 / layer.out)
        self.cdf = torch.cumsum(self.p, 1)
        ar = torch.arange(sv.shape[1], device=sv.device).expand_as(sv)
        self.last = torch.where(self.p > 0, ar, torch.zeros_like(ar)).amax(1)
        self.block = DRAW_BLOCK
        if o.variant == "hybrid":  # per-side ranking (ties: lower index first) and the running sums of sorted s
            vals, order = torch.sort(sv, dim=1, descending=True, stable=True)
            self.rank = torch.empty_like(order).scatter_(1, order, ar.contiguous())
            self.cum = torch.cumsum(vals, 1)

    def draw(self, rows: torch.Tensor, n: torch.Tensor, seed: int) -> torch.Tensor:
        """Multinomial(n_r, p_r) counts of ``rows``. Draw t of a row is the same whatever n and whatever other rows
        draw: uniform blocks of fixed shape for all 2I rows come from one generator seeded per layer."""
        dev = self.p.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(derive_seed(seed, "sipp", str(self.index)))
        counts = torch.zeros((rows.numel(), self.p.shape[1]), dtype=torch.float64, device=dev)
        if rows.numel() == 0:
            return counts
        cdf, last = self.cdf[rows].contiguous(), self.last[rows][:, None]
        nmax = int(n.max())
        for b0 in range(0, nmax, self.block):
            u = torch.rand((2 * self.I, self.block), generator=gen, dtype=torch.float64, device=dev)
            live = torch.nonzero(n > b0).flatten()  # rows that still draw in this block
            t = b0 + torch.arange(self.block, device=dev, dtype=torch.float64)
            valid = (t[None, :] < n[live, None]).double()
            j = torch.minimum(torch.searchsorted(cdf[live], u[rows[live]], right=True), last[live])
            counts[live] = counts[live].scatter_add_(1, j, valid)
        return counts

    def realize(self, m: torch.Tensor, variant: str, C: float, seed: int, min_keep: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (I, J), Ŵ (I, J) float64) for per-side kept counts ``m`` (2I,)."""
        keep = torch.zeros_like(self.member)
        val = torch.zeros_like(self.w2)
        unchanged = self.active & (m >= self.nnz)
        rest = self.active & (m > 0) & ~unchanged
        det = torch.zeros_like(rest)
        if variant == "hybrid" and bool(rest.any()):
            mi = m.clamp(min=1).long() - 1
            dropped = (self.S - self.cum.gather(1, mi[:, None])[:, 0]).clamp(min=0)
            det = rest & (C * dropped <= eps_bound(self.K, m.clamp(min=1)))
        rows = torch.nonzero(rest & ~det).flatten()
        if rows.numel():
            n = draws_for_unique(self.p[rows], m[rows])
            counts = self.draw(rows, n, seed)
            full = (counts > 0).sum(1).double() >= self.nnz[rows]
            unchanged[rows[full]] = True  # every entry drawn: the side stays as it is
            part, c, n = rows[~full], counts[~full], n[~full]
            drawn = c > 0
            keep[part] = drawn
            val[part] = torch.where(drawn, self.w2[part] * c / (n[:, None] * self.p[part].clamp(min=1e-300)),
                                    torch.zeros_like(c))
        if bool(det.any()):
            top = self.rank[det] < m[det][:, None]
            keep[det] = top
            val[det] = torch.where(top, self.w2[det], torch.zeros_like(self.w2[det]))
        if bool(unchanged.any()):
            keep[unchanged] = self.member[unchanged]
            val[unchanged] = torch.where(self.member[unchanged], self.w2[unchanged],
                                         torch.zeros_like(self.w2[unchanged]))
        mask = keep[:self.I] | keep[self.I:]
        w_hat = val[:self.I] + val[self.I:]
        short = min_keep - int(mask.sum())
        if short > 0:  # layer-collapse guard: the best alive weights by sensitivity, unscaled
            extra = keep_among_alive(self.s2d.reshape(-1), (self.alive & ~mask).reshape(-1), short)
            extra = extra.reshape(mask.shape)
            mask |= extra
            w_hat = torch.where(extra, self.w2[:self.I], w_hat)
        return mask, w_hat




class _Problem:
    """The rand/hybrid selection of one round: neuron sides of every layer, their allocation and realization."""

    def __init__(self, layers: list[Layer], scores: dict, alive: dict, o: SippOptions, seed: int, min_keep: int,
                 total: int):
        self.o, self.seed, self.min_keep, self.total = o, seed, min_keep, total
        self.alive = alive
        self.sides = [Sides(lay, scores[lay.param.name].detach(), alive[lay.param.name], o, i)
                      for i, lay in enumerate(layers)]
        self.splits = [2 * sd.I for sd in self.sides]
        self.active = torch.cat([sd.active for sd in self.sides])
        self.cap = torch.cat([sd.nnz for sd in self.sides])
        self.members = torch.cat([sd.members for sd in self.sides])[self.active]
        K, weight = torch.cat([sd.K for sd in self.sides]), torch.cat([sd.weight for sd in self.sides])
        self.alloc = Allocation(K[self.active], self.cap[self.active], weight[self.active])

    def _ceil(self, m_star: torch.Tensor) -> torch.Tensor:
        """m_i = ⌈m_i*⌉, at least 1 for an active side (B > 0), at most nnz_i."""
        cap = self.alloc.cap
        return torch.minimum(torch.ceil(m_star - 1e-9).clamp(min=1.0), cap.expand_as(m_star))

    def _predicted(self, m_star: torch.Tensor) -> torch.Tensor:
        """Kept count predicted by the allocation alone (E[unique] = m_i; a full side keeps all its weights)."""
        m = self._ceil(m_star)
        return torch.where(m >= self.alloc.cap, self.members.expand_as(m), m).sum(-1)

    def predict(self, count: float) -> float:
        """κ′ whose allocation predicts ``count`` kept weights (no sampling)."""
        al = self.alloc
        if al.K.numel() == 0 or count >= float(self.members.sum()):
            return 1.0
        lo, hi = al.bracket(lambda m: float(self._predicted(m)) <= count or float(m.max()) < 1e-12)
        lo, hi = al.refine(lo, hi, lambda m: self._predicted(m) > count)
        pts = torch.tensor([lo, hi], dtype=al.K.dtype, device=al.K.device)
        ms = al.m_of(pts)
        err = (self._predicted(ms) - count).abs()
        i = int(torch.argmin(err))
        return float(ms[i].sum()) / self.total

    def evaluate(self, kappa: float) -> tuple[int, tuple[dict, dict]]:
        """Allocation for B = κ′·n, then per-layer realization: (kept count, (masks, Ŵ))."""
        m = torch.zeros_like(self.cap)
        if bool(self.active.any()):
            m[self.active] = self._ceil(self.alloc.solve(kappa * self.total))
        masks, w_hat, kept = {}, {}, 0
        for sd, mm in zip(self.sides, torch.split(m, self.splits)):
            mask, wh = sd.realize(mm, self.o.variant, self.o.C, self.seed, self.min_keep)
            name = sd.layer.param.name
            masks[name] = out_first(sd.layer.param.module, mask).reshape(self.alive[name].shape)
            w_hat[name] = out_first(sd.layer.param.module, wh)
            kept += int(mask.sum())
        return kept, (masks, w_hat)


def _select(ctx: ScoreContext, scores: dict, sparsity: float, st: dict) -> dict[str, torch.Tensor]:
    """SiPP's selection (§4–6): det = exact global top-k; rand/hybrid = allocation, sampling and size search.
    ``st``: what the round's score left (its layers); the reweighted survivors and the search go back into it."""
    o = ctx.options
    s = check_sparsity(sparsity, allow_one=True)
    names = [p.name for p in ctx.params]
    alive = {n: ctx.masks[n].to(torch.bool) for n in names}
    total = sum(a.numel() for a in alive.values())
    n_alive = sum(int(a.sum()) for a in alive.values())
    target = keep_count(total, s)
    want = max(1, ctx.prune_options.min_keep_per_layer if ctx.prune_options is not None else 1)
    min_keep = want if target >= want * len(names) else (1 if target >= len(names) else 0)
    st["w_hat"] = None
    if o.variant == "det":
        return select_top(scores, alive, s, "global", min_keep_per_layer=min_keep)
    if target > n_alive:
        raise PrunekitError(
            f"sparsity {s:g} keeps {target} entries but only {n_alive} are still alive (current sparsity "
            f"{1 - n_alive / total:.4f}); masks are nested, so ask for a sparsity of at least that")
    if target == n_alive or s == 0.0:
        return {n: alive[n].clone() for n in names}
    if target == 0:
        return {n: torch.zeros_like(alive[n]) for n in names}
    layers = st.get("layers")
    if layers is None:
        raise RuntimeError("sipp: the selection needs the score of the same round (SiPP.score first)")
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
    problem = _Problem(layers, scores, alive, o, seed, min_keep, total)
    chosen, history, hit = search_keep_ratio(problem.evaluate, problem.predict, target, o.search_iters, o.size_tol)
    masks, w_hat = chosen.result
    st["w_hat"] = w_hat
    st["search"] = {"kappa": chosen.kappa, "kept": chosen.kept, "target": target, "hit": hit,
                    "evaluations": len(history), "history": history}
    ratio = chosen.kept / target
    if not hit:
        warnings.warn(f"sipp ({o.variant}): the keep-ratio search did not reach the target size within size_tol="
                      f"{o.size_tol:g} in {len(history)} evaluations; kept {chosen.kept} of a target {target} "
                      f"weights ({ratio:.4f} of it, sparsity {1 - chosen.kept / total:.4f} instead of {s:.4f})",
                      stacklevel=3)
    log.info("sipp (%s): kappa' = %.6g keeps %d / target %d (%.4f) after %d evaluations", o.variant, chosen.kappa,
             chosen.kept, target, ratio, len(history))
    return masks


def _update(ctx: ScoreContext, st: dict) -> None:
    """rand/hybrid: write the reweighted survivors Ŵ into the model (the masks zero the rest)."""
    w_hat = st.get("w_hat")
    if not w_hat:
        return
    with torch.no_grad():
        for p in ctx.params:
            t = p.tensor
            t.copy_(w_hat[p.name].reshape(t.shape).to(t.dtype))


def sipp(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Scores = the empirical sensitivities s ∈ [0, 1] (conv positions: mean for det, max for rand/hybrid)."""
    return sipp_scores(ctx)[0]


def sipp_scores(ctx: ScoreContext) -> tuple[dict[str, torch.Tensor], dict]:
    """(scores, state): the sensitivities and what the selection needs (the layers' statistics, the sample)."""
    o = ctx.options
    if not ctx.params:
        raise PrunekitError("sipp: the model has nothing prunable")
    for p in ctx.params:  # a clear error before any forward pass
        layer_view(p)
    x, need = sample_inputs(ctx, o)
    aggregate = "mean" if o.variant == "det" else "max"
    run, layers = collect(ctx.model, ctx.params, x, aggregate)
    out = {}
    for p in ctx.params:
        alive = out_first(p.module, ctx.masks[p.name].to(run[p.name].device)).reshape(run[p.name].shape)
        run[p.name] = run[p.name] * alive
        out[p.name] = out_first(p.module, run[p.name]).reshape(p.tensor.shape)
    state = {"layers": layers, "n_samples": int(x.shape[0]), "sample_size": need, "aggregate": aggregate}
    log.info("sipp: sensitivities from %d examples (|S| = %d, %s over positions)", x.shape[0], need, aggregate)
    return out, state


@register("sipp", family="sensitivity (provable)", needs_data="inputs", sources=("002",), options=SippOptions,
          scope="global", dict_batches=True,
          summary="SiPP: empirical sensitivities on |S| examples; det top-k, or importance sampling with reweighting")
class SiPP(PruningMethod):
    """``sipp`` as a method object: the score's statistics (:attr:`state`) feed the selection of the same round,
    whose reweighted survivors (rand/hybrid) the update writes."""

    def __init__(self):
        self.state: dict = {}

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        scores, self.state = sipp_scores(ctx)
        return scores

    def select(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict[str, torch.Tensor]:
        return _select(ctx, scores, sparsity, self.state)

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        _update(ctx, self.state)


__all__ = ['Allocation', 'DRAW_BLOCK', 'DRAW_CAP', 'EXAMPLES_PER_FORWARD', 'Layer', 'S_ZERO', 'SensitivityOptions',
    'activation_counts', 'allocate', 'collect', 'draws_for_unique', 'eps_bound', 'inv_log_h', 'layer_view',
    'log_factor', 'log_h', 'patches', 'relative_contributions', 'sample_inputs', 'sample_size', 'search_keep_ratio',
    'sensitivities', 'SippOptions', 'Sides', 'SiPP', 'sipp', 'sipp_scores']
