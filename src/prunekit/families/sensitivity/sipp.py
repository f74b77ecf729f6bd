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
- Only Linear and Conv1d/2d/3d weights (groups included) are supported; the scope is always global.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...batches import BatchStream
from ...errors import PrunekitError
from ...modes import model_device, scoring_mode
from ...params import PRUNABLE_TYPES, PrunableParam
from ...registry import PruningMethod, ScoreContext, register
from ...select import check_sparsity, keep_among_alive, keep_count
from ...select import select as select_top
from ...seeding import derive_seed

log = logging.getLogger("prunekit.sipp")

#: |z| at or below this is treated as 0 (the denominator becomes infinite and g = 0), whatever the model's dtype.
EPS = float(torch.finfo(torch.float32).eps)
#: Elements of the temporary tensors formed at once by the sensitivity kernels.
BLOCK_ELEMS = 1 << 22
#: Examples per forward pass while collecting sensitivities.
EXAMPLES_PER_FORWARD = 32
#: A side draws at most DRAW_CAP·nnz_i samples (then E[unique] may fall short of m_i; the size search compensates).
DRAW_CAP = 32
#: Draws per row and block of uniforms (fixed, so that draw t of a side is the same at every evaluation).
DRAW_BLOCK = 128
#: Sides whose summed sensitivity is at most this are left out of the allocation (m_i = 0).
S_ZERO = 1e-12
#: Smallest internal keep ratio tried by the search (every active side then keeps about one weight).
KAPPA_MIN = 1e-12

_LOG2, _LOG3, _LOG9 = math.log(2.0), math.log(3.0), math.log(9.0)


@dataclass(frozen=True)
class SensitivityOptions:
    """Options shared by ``sipp`` and ``pfp`` (methods/sensitivity.md §0): ``delta_s`` δ_S and ``C`` (failure
    probability and constant of the bounds; they fix |S|), ``sample_size`` (|S|; None = ⌈C·ln(8·η*·η/δ_S)⌉, 152 for
    LeNet-300-100), ``size_tol`` (relative tolerance on the kept count) and ``search_iters`` (most evaluations of
    the size search)."""

    delta_s: float = 1e-16
    C: float = 3.0
    sample_size: int | None = None
    size_tol: float = 0.005
    search_iters: int = 20

    def validate(self, path, error) -> None:
        if not (0.0 < self.delta_s < 1.0):
            raise error(f"delta_s must be in (0, 1) (a failure probability), got {self.delta_s}")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise error(f"C must be a positive number, got {self.C}")
        if self.sample_size is not None and self.sample_size < 1:
            raise error(f"sample_size must be >= 1 (or null for the automatic |S|), got {self.sample_size}")
        if not (self.size_tol >= 0 and math.isfinite(self.size_tol)):
            raise error(f"size_tol must be >= 0, got {self.size_tol}")
        if self.search_iters < 1:
            raise error(f"search_iters must be >= 1, got {self.search_iters}")


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


# ------------------------------------------------------------------------------------------------- sample size (§1)


def activation_counts(model: nn.Module, input_shape: Sequence[int],
                      modules: Iterable[nn.Module] | None = None) -> tuple[int, int]:
    """(η, η*): the sum and the maximum over layers of the per-example output count (channels·H·W for a conv) of
    ``modules`` (default: every Conv/Linear of ``model``), from one forward of a zero input of ``input_shape``
    (without the batch dimension) in eval mode. A module called several times counts once per call."""
    mods = list(modules) if modules is not None else [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    if not mods:
        raise PrunekitError(f"{type(model).__name__} has no Conv/Linear layer: SiPP has nothing to count")
    counts: list[int] = []

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] > 0:
            counts.append(out.numel() // out.shape[0])

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros((1, *tuple(int(s) for s in input_shape)), device=model_device(model), dtype=dtype)
    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in mods}.values()]
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise PrunekitError("no prunable layer was called in the forward pass: SiPP cannot count activations")
    return sum(counts), max(counts)


def sample_size(model: nn.Module, input_shape: Sequence[int], delta_s: float = 1e-16, C: float = 3.0,
                modules: Iterable[nn.Module] | None = None) -> int:
    """|S| = ⌈C·ln(8·η*/δ′)⌉ with δ′ = δ_S/η, i.e. ⌈C·ln(8·η*·η/δ_S)⌉ (methods/sensitivity.md §1).

    η and η* come from :func:`activation_counts`. LeNet-300-100 (η = 410, η* = 300) gives 152."""
    eta, eta_star = activation_counts(model, input_shape, modules)
    return int(math.ceil(C * math.log(8.0 * eta_star * eta / delta_s)))


# ---------------------------------------------------------------------------------------------- sensitivities (§2)


@dataclass
class _Layer:
    """A prunable weight seen as a layer: ``out`` = n_ℓ neurons, ``k`` kernel entries, ``positions`` P."""

    param: PrunableParam
    kind: str
    out: int
    groups: int
    k: int
    positions: int = 0


def _layer(p: PrunableParam) -> _Layer:
    m, w = p.module, p.tensor
    if p.attr == "weight" and w is not None and w.dim() >= 2:
        if isinstance(m, nn.Linear):
            return _Layer(p, "linear", w.shape[0], 1, 1)
        for cls, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d"), (nn.Conv3d, "conv3d")):
            if isinstance(m, cls):
                return _Layer(p, kind, w.shape[0], m.groups, math.prod(m.kernel_size))
    raise PrunekitError(
        f"sipp prunes the weights of Linear, Conv1d and Conv2d layers (and Conv3d); {p.name!r} "
        f"({type(m).__name__}.{p.attr}) is not one: leave it out with exclude=[...] (and do not pass include_bias)"
    )


def _patches(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` as patches (n, J, P): J = in·kernel in weight.view(out, -1) order, P positions."""
    m = layer.param.module
    n = x.shape[0]
    if layer.kind == "linear":
        return x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * len(m.kernel_size)
    else:
        pad = tuple(m.padding)
    ks, st, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    if layer.kind == "conv3d":  # no 3-D unfold in torch: a strided window per spatial dim, then (C, k1, k2, k3) rows
        if any(pad):
            x = F.pad(x, [q for p in reversed(pad) for q in (p, p)])
        for i in range(3):
            x = x.unfold(2 + i, dil[i] * (ks[i] - 1) + 1, st[i])[..., ::dil[i]]
        return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, x.shape[1] * math.prod(ks), -1)
    if layer.kind == "conv1d":
        x = x.unsqueeze(-2)
        ks, st, dil, pad = (1, ks[0]), (1, st[0]), (1, dil[0]), (0, pad[-1])
    return F.unfold(x, ks, dilation=dil, padding=pad, stride=st)


def _reciprocal(z: torch.Tensor) -> torch.Tensor:
    """|1/z|, and 0 where |z| ≤ eps (an infinite denominator)."""
    az = z.abs()
    return torch.where(az > EPS, az.clamp(min=EPS).reciprocal(), torch.zeros_like(az))


def _max_product(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """max over rows R of r[R, i]·a[R, j] -> (I, J), for nonnegative r (R, I) and a (R, J), in bounded blocks."""
    R, I = r.shape
    J = a.shape[1]
    out = torch.zeros((I, J), dtype=a.dtype, device=a.device)
    ic = min(I, max(1, BLOCK_ELEMS // max(J, 1)))
    rb = max(1, BLOCK_ELEMS // (ic * max(J, 1)))
    for i0 in range(0, I, ic):
        acc = out[i0:i0 + ic]
        for r0 in range(0, R, rb):
            blk = r[r0:r0 + rb, i0:i0 + ic, None] * a[r0:r0 + rb, None, :]
            torch.maximum(acc, blk.amax(0), out=acc)
    return out


def _max_mean(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """max over examples n of (1/P)·Σ_p r[n, i, p]·a[n, j, p] -> (I, J): one batched matmul per block."""
    n, J, P = a.shape
    I = r.shape[1]
    out = torch.zeros((I, J), dtype=a.dtype, device=a.device)
    nb = max(1, BLOCK_ELEMS // max(I * J, 1))
    for n0 in range(0, n, nb):
        blk = torch.bmm(r[n0:n0 + nb], a[n0:n0 + nb].transpose(1, 2))
        torch.maximum(out, blk.amax(0), out=out)
    return out / P


def relative_contributions(w: torch.Tensor, a: torch.Tensor, aggregate: str) -> torch.Tensor:
    """max over the examples of ``a`` of g_ij aggregated over positions (section 2 fast paths).

    ``w``: (I, J) weights of one group; ``a``: (n, J, P) nonnegative patches. ``aggregate``: ``mean`` or ``max`` over
    the P positions. Result (I, J) in [0, 1]."""
    n, J, P = a.shape
    I = w.shape[0]
    pos, neg = w > 0, w < 0
    rp = _reciprocal(torch.einsum("ij,njp->nip", w.clamp(min=0), a))
    rn = _reciprocal(torch.einsum("ij,njp->nip", w.clamp(max=0), a))
    if aggregate == "mean" and P > 1:
        mp, mn = _max_mean(a, rp), _max_mean(a, rn)
    else:  # max over positions then over examples = max over the n·P rows (MAX fast path; P = 1: mean = max)
        ar = a.permute(0, 2, 1).reshape(n * P, J)
        mp = _max_product(rp.permute(0, 2, 1).reshape(n * P, I), ar)
        mn = _max_product(rn.permute(0, 2, 1).reshape(n * P, I), ar)
    g = w.abs() * torch.where(pos, mp, torch.where(neg, mn, torch.zeros_like(mp)))
    return g.clamp_(max=1.0)


def _collect(model: nn.Module, params: Sequence[PrunableParam], inputs: torch.Tensor, aggregate: str,
             chunk: int = EXAMPLES_PER_FORWARD) -> tuple[dict[str, torch.Tensor], list[_Layer]]:
    """Sensitivities (I, J) of every param over the examples ``inputs``, a running maximum over forward chunks."""
    if aggregate not in ("mean", "max"):
        raise PrunekitError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    layers = [_layer(p) for p in params]
    by_module: dict[int, list[_Layer]] = {}
    for lay in layers:
        by_module.setdefault(id(lay.param.module), []).append(lay)
    run = {}
    for lay in layers:
        w = lay.param.tensor
        run[lay.param.name] = torch.zeros((lay.out, w[0].numel()), device=w.device,
                                          dtype=torch.promote_types(w.dtype, torch.float32))

    def hook(module, args, out):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        for lay in by_module[id(module)]:
            acc = run[lay.param.name]
            w = lay.param.tensor.detach().reshape(lay.out, -1).to(acc.dtype)
            a = _patches(lay, x.to(acc.dtype))
            if bool((a < 0).any()):  # every example becomes the two points max(a, 0) and max(-a, 0)
                a = torch.cat([a.clamp(min=0), (-a).clamp(min=0)])
            lay.positions = max(lay.positions, a.shape[2])
            og, jg = lay.out // lay.groups, w.shape[1]
            for g in range(lay.groups):
                rows = slice(g * og, (g + 1) * og)
                s = relative_contributions(w[rows], a[:, g * jg:(g + 1) * jg], aggregate)
                torch.maximum(acc[rows], s, out=acc[rows])

    handles = [lays[0].param.module.register_forward_hook(hook) for lays in by_module.values()]
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            # DDP: each rank runs every world-size-th chunk; the maxima are taken over the ranks below (exact)
            for i in distributed.mine(range(0, inputs.shape[0], chunk)):
                model(inputs[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    if distributed.active():
        distributed.all_max(*run.values())
        pos = torch.tensor([lay.positions for lay in layers], dtype=torch.int64)
        distributed.all_max(pos)
        for lay, n in zip(layers, pos.tolist()):
            lay.positions = n
    missed = [lay.param.name for lay in layers if lay.positions == 0]
    if missed:
        warnings.warn(f"sipp: {', '.join(missed)} never ran in the forward pass; their sensitivities are 0",
                      stacklevel=3)
        for lay in layers:
            lay.positions = max(lay.positions, 1)
    return run, layers


def sensitivities(model: nn.Module, params: Sequence[PrunableParam], inputs: torch.Tensor,
                  aggregate: str = "max", chunk: int = EXAMPLES_PER_FORWARD) -> dict[str, torch.Tensor]:
    """Empirical sensitivities s (shaped like each weight) over the examples ``inputs``: the maximum over examples
    of g, aggregated over conv positions by ``mean`` (SiPP det) or ``max`` (rand, hybrid). Pure; eval mode."""
    run, _ = _collect(model, params, inputs, aggregate, chunk)
    return {p.name: run[p.name].reshape(p.tensor.shape) for p in params}


# -------------------------------------------------------------------------------------- error bound, allocation (§4–5)


def log_factor(positions: int, k: int, delta_s: float, C: float) -> float:
    """K_i / S_i = 2·C·ln(8·(P+1)·k/δ_S)."""
    return 2.0 * C * math.log(8.0 * (positions + 1) * k / delta_s)


def eps_bound(K: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ε(m) = ½·[K/(3m) + √((K/(3m))² + 2K/m)], the relative-error bound of m samples."""
    u = K / (3.0 * m)
    return 0.5 * (u + torch.sqrt(u * u + 2.0 * K / m))


def _log_h(lt: torch.Tensor) -> torch.Tensor:
    """log h(t) for t = exp(lt), where −ε′(m) = h(K/m)/K and h(t) = (t²/2)·[1/3 + (t/9 + 1)/√(t²/9 + 2t)]."""
    lg = torch.logaddexp(torch.full_like(lt, -_LOG9), -lt) - 0.5 * torch.logaddexp(torch.full_like(lt, -_LOG9),
                                                                                   _LOG2 - lt)
    return 2.0 * lt - _LOG2 + torch.logaddexp(torch.full_like(lt, -_LOG3), lg)


def _dlog_h(lt: torch.Tensor) -> torch.Tensor:
    """d log h / d log t = 2 − t·q^(−3/2)/(1/3 + g), q = t²/9 + 2t, g = (t/9 + 1)/√q; in [1.5, 2]."""
    lg = torch.logaddexp(torch.full_like(lt, -_LOG9), -lt) - 0.5 * torch.logaddexp(torch.full_like(lt, -_LOG9),
                                                                                   _LOG2 - lt)
    la = -0.5 * lt - 1.5 * torch.logaddexp(lt - _LOG9, torch.full_like(lt, _LOG2))
    return 2.0 - torch.exp(la - torch.logaddexp(torch.full_like(lt, -_LOG3), lg))


def _inv_log_h(lc: torch.Tensor, newton: int = 6) -> torch.Tensor:
    """log t solving log h(t) = lc, vectorized: safeguarded Newton in log space inside the bracket given by
    max(t²/3, t^1.5/(2√2)) ≤ h(t) ≤ t²/3 + t^1.5/(2√2)."""
    lo = torch.minimum(0.5 * (math.log(1.5) + lc), (2.0 / 3.0) * (0.5 * _LOG2 + lc))
    hi = torch.minimum(0.5 * (_LOG3 + lc), (2.0 / 3.0) * (1.5 * _LOG2 + lc))
    lt = 0.5 * (lo + hi)
    for _ in range(newton):
        lt = torch.minimum(torch.maximum(lt - (_log_h(lt) - lc) / _dlog_h(lt), lo), hi)
    return lt


class Allocation:
    """The Lagrangian solution of min Σ_i weight_i·ε(K_i, m_i) s.t. 0 ≤ m_i ≤ cap_i, Σ_i m_i ≤ B (all K_i > 0).

    For a multiplier ν the minimizer of the Lagrangian is m_i(ν) = K_i/t_i with h(t_i) = ν·K_i/weight_i (that is,
    −weight_i·ε′(m_i) = ν), clipped to cap_i; Σ_i m_i(ν) decreases in ν, from Σ cap (ν ≤ ν_sat) to 0.
    """

    def __init__(self, K: torch.Tensor, cap: torch.Tensor, weight: torch.Tensor):
        self.K, self.cap, self.weight = K.double(), cap.double(), weight.double()
        self.lK, self.lw = torch.log(self.K), torch.log(self.weight)
        self.total_cap = float(self.cap.sum())
        if self.K.numel():
            lsat = self.lw + _log_h(self.lK - torch.log(self.cap)) - self.lK  # log ν where side i reaches its cap
            self.x_sat = float(lsat.min()) - 1e-9  # every side at its cap
            self._x_top = float(lsat.max())
        else:
            self.x_sat = self._x_top = 0.0

    def m_of(self, lnu: torch.Tensor) -> torch.Tensor:
        """m(ν) for a vector of log ν: (G,) -> (G, sides)."""
        lt = _inv_log_h(lnu[:, None] + (self.lK - self.lw)[None, :])
        return torch.minimum(torch.exp(self.lK[None, :] - lt), self.cap[None, :])

    def _x(self, v: float) -> torch.Tensor:
        return torch.tensor([v], dtype=self.K.dtype, device=self.K.device)

    def bracket(self, stop: Callable[[torch.Tensor], bool]) -> tuple[float, float]:
        """(x_sat, x) with log ν = x the first point of an expanding sequence where ``stop(m(x))`` holds."""
        lo, step = self.x_sat, 1.0
        hi = self._x_top + step
        for _ in range(200):
            if stop(self.m_of(self._x(hi))[0]):
                break
            lo, step = hi, step * 2.0
            hi = hi + step
        return lo, hi

    def refine(self, lo: float, hi: float, over: Callable[[torch.Tensor], torch.Tensor], rounds: int = 10,
               grid: int = 16) -> tuple[float, float]:
        """Shrink [lo, hi] around the switch of the decreasing predicate ``over(m (G, sides)) -> (G,) bool``
        (True at lo, False at hi) by ``grid`` points per round: a factor (grid + 1)^rounds."""
        for _ in range(rounds):
            pts = torch.linspace(lo, hi, grid + 2, dtype=self.K.dtype, device=self.K.device)[1:-1]
            flags = over(self.m_of(pts))
            yes, no = torch.nonzero(flags).flatten(), torch.nonzero(~flags).flatten()
            if yes.numel():
                lo = float(pts[yes[-1]])
            if no.numel():
                hi = float(pts[no[0]])
        return lo, hi

    def solve(self, budget: float) -> torch.Tensor:
        """m* for the budget B: ν by bisection until Σ m(ν) = B; returns m at the upper end, so Σ m* ≤ B."""
        if self.K.numel() == 0 or budget >= self.total_cap:
            return self.cap.clone()
        if budget <= 0:
            return torch.zeros_like(self.cap)
        lo, hi = self.bracket(lambda m: float(m.sum()) <= budget)
        lo, hi = self.refine(lo, hi, lambda m: m.sum(1) > budget)
        return self.m_of(self._x(hi))[0]


def allocate(K: torch.Tensor, cap: torch.Tensor, weight: torch.Tensor, budget: float) -> torch.Tensor:
    """The real m* minimizing Σ_i weight_i·ε(K_i, m_i) s.t. 0 ≤ m_i ≤ cap_i and Σ_i m_i ≤ budget (all K_i > 0), by
    Lagrangian bisection (:class:`Allocation`). SiPP then keeps m_i = ⌈m_i*⌉."""
    return Allocation(K, cap, weight).solve(budget)


def draws_for_unique(p: torch.Tensor, m: torch.Tensor, cap: torch.Tensor | None = None,
                     nearest: bool = True) -> torch.Tensor:
    """Per row, the number of draws n whose expected distinct count E[unique](n) = Σ_j [1 − (1 − p_j)^n] is m: the
    integer n with E[unique](n) closest to m (``nearest``; ties go up), or the smallest with E[unique](n) ≥ m, at
    most ``cap`` (default DRAW_CAP·nnz). Rows: probability vectors (r, J) with nnz ≥ 2 positive entries and
    1 ≤ m < nnz. Integer bisection between the Jensen lower bound ln(1 − m/K)/ln(1 − 1/K) and
    ln(1 − m/K)/ln(1 − p_min)."""
    p, m = p.double(), m.double()
    K = (p > 0).sum(1).double()
    if cap is None:
        cap = DRAW_CAP * K
    cap = torch.maximum(cap.double(), m)
    logq = torch.log1p(-p.clamp(max=1.0 - 1e-16))
    frac = (m / K).clamp(max=1.0 - 1e-12)
    jensen = torch.log1p(-frac) / torch.log1p(-1.0 / K)
    pmin = torch.where(p > 0, p, torch.ones_like(p)).amin(1).clamp(max=1.0 - 1e-16)
    upper = torch.ceil(torch.log1p(-frac) / torch.log1p(-pmin))
    hi = torch.minimum(torch.maximum(upper, m), cap)
    lo = torch.minimum(torch.clamp(torch.floor(jensen) - 1.0, min=0.0), hi - 1.0)
    lo = torch.maximum(lo, torch.minimum(m - 1.0, hi - 1.0))  # E[unique](n) ≤ n, so n ≥ m

    def expected(n):
        return (-torch.expm1(n[:, None] * logq)).sum(1)

    def enough(n):
        return expected(n) >= m * (1.0 - 1e-12)

    for _ in range(80):
        open_ = hi - lo > 1.0
        if not bool(open_.any()):
            break
        mid = torch.floor(0.5 * (lo + hi))
        ok = enough(mid)
        hi = torch.where(open_ & ok, mid, hi)
        lo = torch.where(open_ & ~ok, mid, lo)
    if not nearest:
        return hi
    below = (hi - 1.0).clamp(min=1.0)
    e_hi, e_below = expected(hi), expected(below)
    return torch.where((m - e_below < e_hi - m) & (below < hi), below, hi)


# ------------------------------------------------------------------------------------- per-layer sides, realization


class _Sides:
    """The neuron sides of one layer as rows of a (2I, J) matrix: rows < I positive, rows ≥ I negative weights."""

    def __init__(self, layer: _Layer, s: torch.Tensor, alive: torch.Tensor, o: SippOptions, index: int):
        w = layer.param.tensor.detach().reshape(layer.out, -1).double()
        s = s.reshape(layer.out, -1).double()
        alive = alive.reshape(layer.out, -1).to(w.device, torch.bool)
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


# ----------------------------------------------------------------------------------------------- size search (§6)


@dataclass
class _Candidate:
    kappa: float
    kept: int
    f: float
    result: object


def _brent(fn: Callable[[float], float], a: float, fa: float, b: float, fb: float, evals: int, tol_f: float,
           xtol: float = 1e-12) -> None:
    """Brent's zero finder (inverse quadratic / secant steps, bisection when they do not shrink the bracket) on a
    sign-changing bracket; stops after ``evals`` calls, when |f| ≤ tol_f, or when the bracket collapses."""
    c, fc = a, fa
    d = e = b - a
    for _ in range(evals):
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol1 = 2.0 * 2.2e-16 * abs(b) + 0.5 * xtol * max(abs(b), 1e-300)
        xm = 0.5 * (c - b)
        if abs(xm) <= tol1 or abs(fb) <= tol_f:
            return
        if abs(e) >= tol1 and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:
                p, q = 2.0 * xm * s, 1.0 - s
            else:
                q, r = fa / fc, fb / fc
                p = s * (2.0 * xm * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            p = abs(p)
            if 2.0 * p < min(3.0 * xm * q - abs(tol1 * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = xm
        else:
            d = e = xm
        a, fa = b, fb
        b = b + (d if abs(d) > tol1 else math.copysign(tol1, xm))
        fb = fn(b)
        if abs(fb) <= tol_f:
            return


def search_keep_ratio(evaluate: Callable[[float], tuple[int, object]], predict: Callable[[float], float],
                      target: int, iters: int, tol: float, kappa_max: float = 1.0
                      ) -> tuple[_Candidate, list[tuple[float, int]], bool]:
    """Find κ′ with |kept(κ′)/target − 1| ≤ tol in at most ``iters`` evaluations of ``evaluate(κ′) -> (kept,
    result)``; ``predict(T)`` is the κ′ whose allocation predicts T kept weights (cheap, no sampling).

    Start at predict(target); bracket with predict(target·(1 − 2f)), or with the ends KAPPA_MIN / ``kappa_max`` when
    that does not change sign; then Brent's method. Returns (chosen, [(κ′, kept)] in evaluation order, hit): the
    first candidate within ``tol``, else the closest one below and the closest one above the target, whichever is
    nearer (the one below on a tie)."""
    history: list[tuple[float, int]] = []
    best: dict[str, _Candidate | None] = {"hit": None, "under": None, "over": None}

    def fn(k: float) -> float:
        if len(history) >= iters:
            raise StopIteration
        kept, res = evaluate(k)
        f = kept / target - 1.0
        history.append((k, kept))
        cand = _Candidate(k, kept, f, res)
        if abs(f) <= tol and best["hit"] is None:
            best["hit"] = cand
        if f <= 0 and (best["under"] is None or f > best["under"].f):
            best["under"] = cand
        if f > 0 and (best["over"] is None or f < best["over"].f):
            best["over"] = cand
        return f

    try:
        x0 = min(kappa_max, max(KAPPA_MIN, predict(float(target))))
        f0 = fn(x0)
        if abs(f0) > tol:
            x1 = min(kappa_max, max(KAPPA_MIN, predict(max(1.0, target * (1.0 - 2.0 * f0)))))
            f1 = fn(x1) if x1 != x0 else f0
            if abs(f1) > tol and (f1 > 0) == (f0 > 0):
                x0, f0 = x1, f1
                end = KAPPA_MIN if f0 > 0 else kappa_max
                x1 = end
                f1 = fn(end) if end != x0 else f0
            if abs(f1) > tol and (f1 > 0) != (f0 > 0):
                _brent(fn, x0, f0, x1, f1, iters, tol)
    except StopIteration:
        pass
    hit = best["hit"] is not None
    chosen = best["hit"]
    if chosen is None:  # the closest; on a tie the one that does not exceed the target
        near = [c for c in (best["under"], best["over"]) if c is not None]
        chosen = min(near, key=lambda c: (abs(c.f), c.f > 0))
    return chosen, history, hit


# --------------------------------------------------------------------------------------------------- the method


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def sample_inputs(ctx: ScoreContext, o: SensitivityOptions, who: str = "sipp") -> tuple[torch.Tensor, int]:
    """The first |S| examples of the scoring data, and |S| (auto from §1 unless ``sample_size`` is given); shared
    by ``sipp`` and ``pfp`` (``who`` names the method in messages)."""
    stream = BatchStream(ctx.data, model_device(ctx.model), _dtype(ctx.model), who=who)
    first = stream.peek()
    if first is None:
        raise PrunekitError(f"{who} needs data: the scoring data hold no example (pass batches of inputs)")
    modules = list({id(p.module): p.module for p in ctx.params}.values())
    need = o.sample_size if o.sample_size is not None else sample_size(
        ctx.model, tuple(first.shape[1:]), o.delta_s, o.C, modules=modules)
    x = stream.take(need)[0]
    if x.shape[0] < need:
        warnings.warn(f"{who}: the scoring data hold only {x.shape[0]} examples, fewer than |S| = {need} "
                      f"(δ_S = {o.delta_s:g}, C = {o.C:g}); the sensitivities use all {x.shape[0]}", stacklevel=3)
    return x, need


class _Problem:
    """The rand/hybrid selection of one round: neuron sides of every layer, their allocation and realization."""

    def __init__(self, layers: list[_Layer], scores: dict, alive: dict, o: SippOptions, seed: int, min_keep: int,
                 total: int):
        self.o, self.seed, self.min_keep, self.total = o, seed, min_keep, total
        self.alive = alive
        self.sides = [_Sides(lay, scores[lay.param.name].detach(), alive[lay.param.name], o, i)
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
            masks[name] = mask.reshape(self.alive[name].shape)
            w_hat[name] = wh
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
        _layer(p)
    x, need = sample_inputs(ctx, o)
    aggregate = "mean" if o.variant == "det" else "max"
    run, layers = _collect(ctx.model, ctx.params, x, aggregate)
    out = {}
    for p in ctx.params:
        alive = ctx.masks[p.name].to(run[p.name].device).reshape(run[p.name].shape)
        run[p.name] = run[p.name] * alive
        out[p.name] = run[p.name].reshape(p.tensor.shape)
    state = {"layers": layers, "n_samples": int(x.shape[0]), "sample_size": need, "aggregate": aggregate}
    log.info("sipp: sensitivities from %d examples (|S| = %d, %s over positions)", x.shape[0], need, aggregate)
    return out, state


@register("sipp", family="sensitivity (provable)", needs_data="inputs", sources=("002",), options=SippOptions,
          scope="global",
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
