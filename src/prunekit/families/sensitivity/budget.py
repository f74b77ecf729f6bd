"""Error bounds and budget allocation of sensitivity sampling (seed 002; methods/sensitivity.md §4–5): the
log factor and ε bound, the convex allocation of kept weights over neuron sides (Lagrangian bisection), and the
number of draws whose expected count of distinct entries is a given m."""
from __future__ import annotations

import math
from typing import Callable

import torch


from .scores import DRAW_CAP

_LOG2, _LOG3, _LOG9 = math.log(2.0), math.log(3.0), math.log(9.0)

# -------------------------------------------------------------------------------------- error bound, allocation (§4–5)


def log_factor(positions: int, k: int, delta_s: float, C: float) -> float:
    """K_i / S_i = 2·C·ln(8·(P+1)·k/δ_S)."""
    return 2.0 * C * math.log(8.0 * (positions + 1) * k / delta_s)


def eps_bound(K: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ε(m) = ½·[K/(3m) + √((K/(3m))² + 2K/m)], the relative-error bound of m samples."""
    u = K / (3.0 * m)
    return 0.5 * (u + torch.sqrt(u * u + 2.0 * K / m))


def log_h(lt: torch.Tensor) -> torch.Tensor:
    """log h(t) for t = exp(lt), where −ε′(m) = h(K/m)/K and h(t) = (t²/2)·[1/3 + (t/9 + 1)/√(t²/9 + 2t)]."""
    lg = torch.logaddexp(torch.full_like(lt, -_LOG9), -lt) - 0.5 * torch.logaddexp(torch.full_like(lt, -_LOG9),
                                                                                   _LOG2 - lt)
    return 2.0 * lt - _LOG2 + torch.logaddexp(torch.full_like(lt, -_LOG3), lg)


def dlog_h(lt: torch.Tensor) -> torch.Tensor:
    """d log h / d log t = 2 − t·q^(−3/2)/(1/3 + g), q = t²/9 + 2t, g = (t/9 + 1)/√q; in [1.5, 2]."""
    lg = torch.logaddexp(torch.full_like(lt, -_LOG9), -lt) - 0.5 * torch.logaddexp(torch.full_like(lt, -_LOG9),
                                                                                   _LOG2 - lt)
    la = -0.5 * lt - 1.5 * torch.logaddexp(lt - _LOG9, torch.full_like(lt, _LOG2))
    return 2.0 - torch.exp(la - torch.logaddexp(torch.full_like(lt, -_LOG3), lg))


def inv_log_h(lc: torch.Tensor, newton: int = 6) -> torch.Tensor:
    """log t solving log h(t) = lc, vectorized: safeguarded Newton in log space inside the bracket given by
    max(t²/3, t^1.5/(2√2)) ≤ h(t) ≤ t²/3 + t^1.5/(2√2)."""
    lo = torch.minimum(0.5 * (math.log(1.5) + lc), (2.0 / 3.0) * (0.5 * _LOG2 + lc))
    hi = torch.minimum(0.5 * (_LOG3 + lc), (2.0 / 3.0) * (1.5 * _LOG2 + lc))
    lt = 0.5 * (lo + hi)
    for _ in range(newton):
        lt = torch.minimum(torch.maximum(lt - (log_h(lt) - lc) / dlog_h(lt), lo), hi)
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
            lsat = self.lw + log_h(self.lK - torch.log(self.cap)) - self.lK  # log ν where side i reaches its cap
            self.x_sat = float(lsat.min()) - 1e-9  # every side at its cap
            self._x_top = float(lsat.max())
        else:
            self.x_sat = self._x_top = 0.0

    def m_of(self, lnu: torch.Tensor) -> torch.Tensor:
        """m(ν) for a vector of log ν: (G,) -> (G, sides)."""
        lt = inv_log_h(lnu[:, None] + (self.lK - self.lw)[None, :])
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
