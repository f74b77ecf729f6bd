"""PFP's per-layer budget (seed 002, methods/sensitivity.md §5): one compressed layer (a *reader* of a prunable
channel group) with its channel sensitivities, the ε rule m_ℓ(ε) and u_ℓ(ε), and its channel selection at u_ℓ for
the ``det``, ``rand`` and ``top`` variants (see :mod:`prunekit.families.sensitivity.pfp`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...params import PrunableParam
from ...seeding import derive_seed
from .budget import draws_for_unique, log_factor
from .scores import DRAW_CAP, S_ZERO

#: Bisection steps of the (cheap, deterministic) det prediction and of a reader's entry point.
PREDICT_STEPS = 64


@dataclass
class Reader:
    """One compressed layer: the channel sensitivities of its input group and its sampling state."""

    param: PrunableParam
    group: str
    block: int
    s: torch.Tensor          # (C,) float64 channel sensitivities (0 for dead channels)
    alive: torch.Tensor      # (C,) bool: the layer still reads the channel
    positions: int
    k: int
    delta_s: float
    C_const: float
    min_keep: int
    S: float = 0.0
    p: torch.Tensor = field(default=None)
    K: float = 0.0
    nnz: int = 0
    n_alive: int = 0
    order: torch.Tensor = field(default=None)  # channels by (alive, s) descending, lower index first on ties
    uniforms: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # selections by (u, variant, draws)

    def __post_init__(self):
        self.n_alive = int(self.alive.sum())
        self.S = float(self.s.sum())
        pos = self.s > 0
        self.nnz = int(pos.sum())
        self.p = self.s / self.S if self.S > S_ZERO else torch.zeros_like(self.s)
        if self.S <= S_ZERO:
            self.nnz = 0
        self.K = log_factor(self.positions, self.k, self.delta_s, self.C_const) * self.S
        key = self.s + self.alive.double()  # s ∈ [0, 1]: alive channels first
        self.order = torch.sort(key, descending=True, stable=True).indices
        self.floor = min(self.min_keep, self.n_alive)

    @property
    def channels(self) -> int:
        return self.s.numel()

    # -- the ε rule
    def draws(self, t: float) -> float:
        """m_ℓ(ε) = ⌈3·(6 + 2ε)·K/ε²⌉ at log ε = t (inf when it overflows)."""
        lm = math.log(3.0 * (6.0 + 2.0 * math.exp(t)) * self.K) - 2.0 * t
        return math.ceil(math.exp(lm)) if lm < 700.0 else math.inf

    def unique(self, t: float) -> int:
        """u_ℓ(ε) = min(#alive, round(Σ_c [1 − (1 − p_c)^m])), before the min-keep floor."""
        if self.nnz == 0:
            return 0
        m = self.draws(t)
        e = self.expected_unique(m) if math.isfinite(m) else float(self.nnz)
        return min(self.n_alive, int(math.floor(e + 0.5)))

    def t_single(self) -> float:
        """log ε above which m_ℓ = 1: ε² − 6Kε − 18K ≥ 0."""
        K = self.K
        return math.log(3.0 * K + math.sqrt(9.0 * K * K + 18.0 * K))

    def t_full(self) -> float:
        """log ε below which u_ℓ = nnz: m ≥ ln(4·nnz)/(−ln(1 − p_min)) makes Σ_c (1 − p_c)^m ≤ 1/4."""
        pmin = float(self.p[self.p > 0].min())
        M = math.log(4.0 * self.nnz) / max(-math.log1p(-min(pmin, 1.0 - 1e-16)), 1e-300) + 1.0
        K = self.K
        return math.log((6.0 * K + math.sqrt(36.0 * K * K + 72.0 * K * M)) / (2.0 * M))

    # -- selection at u
    def _top(self, u: int) -> torch.Tensor:
        keep = torch.zeros(self.channels, dtype=torch.bool)
        keep[self.order[:u]] = True
        return keep & self.alive

    def _pad(self, keep: torch.Tensor) -> torch.Tensor:
        """The min-keep floor: the best alive channels not yet kept, unscaled."""
        short = self.floor - int(keep.sum())
        if short > 0:
            extra = self.order[~keep[self.order] & self.alive[self.order]][:short]
            keep = keep.clone()
            keep[extra] = True
        return keep

    def _uniforms(self, seed: int) -> torch.Tensor:
        if self.uniforms is None:
            gen = torch.Generator().manual_seed(derive_seed(seed, "pfp", self.param.name))
            self.uniforms = torch.rand(DRAW_CAP * max(self.nnz, 1), generator=gen, dtype=torch.float64)
        return self.uniforms

    def draws_for(self, p: torch.Tensor, u: int) -> int:
        """m′: the draw count whose E[unique] is closest to ``u`` (1 ≤ u < nnz of ``p``)."""
        return int(draws_for_unique(p[None], torch.tensor([float(u)], dtype=torch.float64))[0])

    def expected_unique(self, m: int) -> float:
        q = self.p[self.p > 0]
        return float((-torch.expm1(m * torch.log1p(-q.clamp(max=1.0)))).sum())

    def _sample(self, p: torch.Tensor, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``m`` draws of Multinomial(·, p) from the layer's fixed uniforms: (kept, scale)."""
        cdf = torch.cumsum(p, 0)
        last = int(torch.nonzero(p > 0).max())
        u = self._uniforms(seed)
        if m > u.numel():  # beyond the cap (only reachable through an explicit draw count)
            m = u.numel()
        j = torch.searchsorted(cdf, u[:m], right=True).clamp(max=last)
        counts = torch.bincount(j, minlength=p.numel()).double()
        kept = counts > 0
        scale = torch.where(kept, counts / (m * p.clamp(min=1e-300)), torch.ones_like(counts))
        return kept, scale

    def select(self, u: int, variant: str, seed: int, m: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(kept channels, per-channel scale or None, draws m′) for u_ℓ = ``u`` kept channels (before the floor);
        ``m`` overrides rand's draw count (the fill's draw-by-draw steps)."""
        key = (u, variant, m)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self._select(u, variant, seed, m)
        return hit

    def _select(self, u: int, variant: str, seed: int, m: int | None):
        if variant == "det" or u >= self.nnz or u == 0:
            return self._pad(self._top(min(u, self.nnz))), None, 0
        if variant == "rand":
            m = m if m is not None else self.draws_for(self.p, u)
            keep, scale = self._sample(self.p, m, seed)
            keep = self._pad(keep)
            return keep, torch.where(keep, scale, torch.ones_like(scale)), m
        # top
        m = self.draws_for(self.p, u)
        fixed = self.p >= 1.0 / m
        if int(fixed.sum()) >= u:
            return self._pad(self._top(u)), None, m
        rest = (self.p > 0) & ~fixed
        u_r, n_r = u - int(fixed.sum()), int(rest.sum())
        if u_r >= n_r:
            return self._pad(fixed | rest), None, m
        pr = torch.where(rest, self.p, torch.zeros_like(self.p))
        pr = pr / pr.sum()
        m_r = self.draws_for(pr, u_r)
        drawn, scale = self._sample(pr, m_r, seed)
        keep = self._pad(fixed | drawn)
        return keep, torch.where(drawn & ~fixed, scale, torch.ones_like(scale)), m_r

    def entry(self, v: int, t_lo: float, t_hi: float) -> float:
        """The largest log ε in [t_lo, t_hi] at which u_ℓ ≥ v (u_ℓ does not increase with ε); t_lo if none."""
        if self.unique(t_hi) >= v:
            return t_hi
        lo, hi = t_lo, t_hi  # unique(lo) >= v > unique(hi)
        for _ in range(PREDICT_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if self.unique(mid) >= v:
                lo = mid
            else:
                hi = mid
        return lo
