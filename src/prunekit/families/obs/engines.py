"""Inverse engines for blocks of the damped empirical Fisher F = λ·I + (1/N)·GᵀG (second_order.md §3).

Nothing forms F⁻¹ unless it has to: the OBS family needs only diag(F⁻¹) and products F⁻¹V. Every engine works on a
BATCH of equal-size blocks at once, G of shape [nb, N, c] (one batched matmul / Cholesky / triangular solve per
batch, never a Python loop per block), and returns float64 results:

- :class:`GramFactor` (Woodbury, for N < c): K = NλI + GGᵀ (N×N, float64, accumulated over column chunks of G),
  L = chol(K); diag(F⁻¹) = (1/λ)(1 − Σ_n Z_nq²) with Z = L⁻¹G; F⁻¹V = (1/λ)(V − Gᵀ K⁻¹ (G V)).
  O(N²c + N³) time, O(N² + N·chunk) memory; no c×c matrix.
- :class:`DirectFactor` (for N ≥ c): F (c×c, float64), L = chol(F); diag from L⁻¹; F⁻¹V by two triangular solves.
- :class:`ShermanMorrisonFactor`: the reference's N sequential rank-1 updates of an explicit F⁻¹ (the slow
  baseline, exact), optionally tiled into ``parts`` row slices.

``engine='auto'`` picks Gram when N < c and direct otherwise (the exact cost rule of §3). Numerics: float64 for
K / F, their Cholesky factors and the diagonal reduction; the diagonal is clamped to
[1/(λ + ‖G_B‖_F²/N), 1/λ], valid bounds of [F⁻¹]_qq; a failed Cholesky is retried once with jitter
1e-10·trace/size (logged). ``center`` subtracts the block's column means from every gradient (F − ḡḡᵀ) on the fly.

The factor objects do not keep G (it may be a gathered copy): pass the same G (same block batch) to
:meth:`diag` and :meth:`apply`.
"""
from __future__ import annotations

import logging

import torch

from ...errors import PrunekitError

log = logging.getLogger("prunekit.second_order")

ENGINES = ("auto", "gram", "direct", "sherman_morrison")
F64 = torch.float64
#: Column chunk of G cast to float64 at once (elements per block row), bounding the float64 temporaries.
DEFAULT_COL_CHUNK = 4096


def choose_route(n_grads: int, c: int, engine: str = "auto") -> str:
    """'gram' when N < c, 'direct' otherwise (engine='auto'); the named engine otherwise."""
    if engine not in ENGINES:
        raise PrunekitError(f"unknown inverse engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "gram" if n_grads < c else "direct"
    return engine


def _check(G: torch.Tensor, lam: float) -> torch.Tensor:
    if not lam > 0:
        raise PrunekitError(f"the Fisher damping must be > 0 (it makes F invertible), got {lam!r}")
    if G.dim() == 2:
        G = G.unsqueeze(0)
    if G.dim() != 3:
        raise PrunekitError(f"expected G of shape [blocks, N, c] or [N, c], got {tuple(G.shape)}")
    return G


def cholesky(A: torch.Tensor, size_for_jitter: int, what: str) -> torch.Tensor:
    """Batched Cholesky in place of A's storage where possible; on failure add 1e-10·trace/size to the failing
    matrices and retry once."""
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if bool(bad.any()):
        if not bool(torch.isfinite(A).all()):
            raise PrunekitError(f"{what} has NaN or infinite entries: the gradients are not finite (NaN or infinite "
                                "data inputs, or a model/loss that produces NaN); raising fisher_damp does not help")
        tr = A.diagonal(dim1=-2, dim2=-1).sum(-1)
        jitter = 1e-10 * tr / size_for_jitter
        log.warning("Cholesky of %s failed for %d of %d block(s); retrying with jitter 1e-10·trace/%d",
                    what, int(bad.sum()), A.shape[0], size_for_jitter)
        A2 = A[bad].clone()
        A2.diagonal(dim1=-2, dim2=-1).add_(jitter[bad, None])
        L2, info2 = torch.linalg.cholesky_ex(A2)
        if bool((info2 != 0).any()):
            raise PrunekitError(f"the Cholesky factorization of {what} failed even with jitter: the Fisher is not "
                                "numerically positive definite; raise fisher_damp")
        L[bad] = L2
    return L


def _rebuild(cls, **attrs):
    """A factor object from its stored tensors (device moves, block subsets, caches)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def _col_mean(G: torch.Tensor, chunk: int) -> torch.Tensor:
    """Column means of G [nb, N, c] in float64, [nb, 1, c], chunk by chunk (no float64 copy of G)."""
    nb, N, c = G.shape
    out = torch.empty(nb, 1, c, dtype=F64, device=G.device)
    for a, b in _col_chunks(c, chunk):
        out[:, :, a:b] = G[:, :, a:b].to(F64).mean(1, keepdim=True)
    return out


def _col_chunks(c: int, chunk: int):
    chunk = max(1, int(chunk))
    return [(a, min(c, a + chunk)) for a in range(0, c, chunk)]


class BlockFactor:
    """Common interface: ``diag(G) -> [nb, c]`` and ``apply(G, V [nb, c, r]) -> [nb, c, r]``, float64."""

    route: str = ""
    lam: float
    n: int
    c: int

    def diag(self, G: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _map(self, f) -> "BlockFactor":  # pragma: no cover - interface
        """The same factor with ``f`` applied to each of its tensors."""
        raise NotImplementedError

    def to(self, device) -> "BlockFactor":
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def select(self, idx: torch.Tensor) -> "BlockFactor":
        """The factor of a subset of the blocks of the batch."""
        return self._map(lambda t: t[idx])

    def _floor(self) -> torch.Tensor:
        # [F⁻¹]_qq ≥ 1/λ_max(F) ≥ 1/(λ + ‖G_B‖_F²/N)
        return 1.0 / (self.lam + self.fro2 / self.n)


class GramFactor(BlockFactor):
    """Woodbury route: L = chol(NλI + G_c G_cᵀ) per block, G_c the (optionally centred) gradients."""

    route = "gram"

    def __init__(self, G: torch.Tensor, lam: float, *, center: bool = False, col_chunk: int = DEFAULT_COL_CHUNK):
        G = _check(G, lam)
        nb, N, c = G.shape
        self.lam, self.n, self.c, self.col_chunk = float(lam), N, c, col_chunk
        dev = G.device
        self.mean = _col_mean(G, col_chunk) if center else None  # [nb, 1, c]
        K = torch.zeros(nb, N, N, dtype=F64, device=dev)
        for a, b in _col_chunks(c, col_chunk):
            Gc = self._g64(G, a, b)
            K.baddbmm_(Gc, Gc.transpose(1, 2))
        self.fro2 = K.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖G_B‖_F², [nb]
        K.diagonal(dim1=-2, dim2=-1).add_(N * self.lam)
        self.L = cholesky(K, N, f"the {N}x{N} Gram matrix")
        del K

    def _g64(self, G, a, b):
        Gc = G[:, :, a:b].to(F64)
        if self.mean is not None:
            Gc = Gc - self.mean[:, :, a:b]
        return Gc

    def diag(self, G: torch.Tensor) -> torch.Tensor:
        G = _check(G, self.lam)
        nb, N, c = G.shape
        out = torch.empty(nb, c, dtype=F64, device=G.device)
        # Z = L⁻¹G: with N ≤ c one triangular solve for the N×N L⁻¹ and batched products beat a solve with c
        # right-hand sides (on the CPU a batched solve of many small blocks costs ~8× more: MiniLM, blocks of 50)
        Linv = None
        if N <= c:
            eye = torch.eye(N, dtype=F64, device=G.device).expand(nb, N, N)
            Linv = torch.linalg.solve_triangular(self.L, eye, upper=False)
        for a, b in _col_chunks(c, self.col_chunk):
            Gc = self._g64(G, a, b)
            Z = torch.bmm(Linv, Gc) if Linv is not None else torch.linalg.solve_triangular(self.L, Gc, upper=False)
            out[:, a:b] = (1.0 - Z.square_().sum(1)) / self.lam
        return torch.maximum(out, self._floor()[:, None]).clamp_(max=1.0 / self.lam)

    def apply(self, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        G = _check(G, self.lam)
        V = V.to(F64)
        nb, N, c = G.shape
        GV = torch.zeros(nb, N, V.shape[-1], dtype=F64, device=G.device)
        for a, b in _col_chunks(c, self.col_chunk):
            GV.baddbmm_(self._g64(G, a, b), V[:, a:b])
        if GV.shape[-1] >= N:
            T = torch.cholesky_solve(GV, self.L)  # K⁻¹ G V
        else:  # few right-hand sides on many small blocks: the explicit K⁻¹ and a batched product are faster
            T = torch.bmm(torch.cholesky_inverse(self.L), GV)
        out = V.clone()
        for a, b in _col_chunks(c, self.col_chunk):
            out[:, a:b].baddbmm_(self._g64(G, a, b).transpose(1, 2), T, alpha=-1.0)
        return out.div_(self.lam)

    def _map(self, f) -> "GramFactor":
        return _rebuild(GramFactor, lam=self.lam, n=self.n, c=self.c, col_chunk=self.col_chunk, L=f(self.L),
                        mean=None if self.mean is None else f(self.mean), fro2=f(self.fro2))

    @property
    def nbytes(self) -> int:
        return self.L.numel() * 8 + (0 if self.mean is None else self.mean.numel() * 8)


class DirectFactor(BlockFactor):
    """Direct route: L = chol(λI + G_cᵀG_c/N) per block (c×c, float64)."""

    route = "direct"

    def __init__(self, G: torch.Tensor, lam: float, *, center: bool = False, row_chunk: int = 1024):
        G = _check(G, lam)
        nb, N, c = G.shape
        self.lam, self.n, self.c = float(lam), N, c
        mean = _col_mean(G, DEFAULT_COL_CHUNK) if center else None
        Fm = torch.zeros(nb, c, c, dtype=F64, device=G.device)
        for a, b in _col_chunks(N, row_chunk):
            Gr = G[:, a:b].to(F64)
            if mean is not None:
                Gr = Gr - mean
            Fm.baddbmm_(Gr.transpose(1, 2), Gr, alpha=1.0 / N)
        self.fro2 = Fm.diagonal(dim1=-2, dim2=-1).sum(-1) * N
        Fm.diagonal(dim1=-2, dim2=-1).add_(self.lam)
        self.L = cholesky(Fm, c, f"the {c}x{c} Fisher block")

    def diag(self, G: torch.Tensor | None = None) -> torch.Tensor:
        nb, c = self.L.shape[0], self.c
        eye = torch.eye(c, dtype=F64, device=self.L.device).expand(nb, c, c)
        Linv = torch.linalg.solve_triangular(self.L, eye, upper=False)
        out = Linv.square_().sum(-2)  # [F⁻¹]_qq = Σ_k (L⁻¹)_kq²
        return torch.maximum(out, self._floor()[:, None]).clamp_(max=1.0 / self.lam)

    def apply(self, G: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(V.to(F64), self.L)

    def _map(self, f) -> "DirectFactor":
        return _rebuild(DirectFactor, lam=self.lam, n=self.n, c=self.c, L=f(self.L), fro2=f(self.fro2))

    @property
    def nbytes(self) -> int:
        return self.L.numel() * 8


class ShermanMorrisonFactor(BlockFactor):
    """The reference's engine: F⁻¹ ← F⁻¹ − v vᵀ/(N + gᵀv), v = F⁻¹g, for g = g_1..g_N, from F⁻¹ = I/λ.

    Exact (not an approximation) but O(N·c²) in N sequential memory-bound rank-1 updates, with an explicit c×c
    inverse per block. ``parts`` k updates the inverse in k row slices (the reference's ``--fisher-parts``);
    ``dtype`` float64 (default) or float32 (the reference's precision). ``n_steps`` stops after the first rows of G
    (benchmarks time a prefix and extrapolate); the normalisation still uses N = G.shape[1].
    """

    route = "sherman_morrison"

    def __init__(self, G: torch.Tensor, lam: float, *, center: bool = False, parts: int = 1,
                 dtype: torch.dtype = F64, n_steps: int | None = None):
        G = _check(G, lam)
        nb, N, c = G.shape
        self.lam, self.n, self.c = float(lam), N, c
        mean = G.to(dtype).mean(1) if center else None  # [nb, c]
        Finv = torch.zeros(nb, c, c, dtype=dtype, device=G.device)
        Finv.diagonal(dim1=-2, dim2=-1).fill_(1.0 / self.lam)
        parts = max(1, int(parts))
        rows = _col_chunks(c, -(-c // parts))
        steps = N if n_steps is None else min(N, int(n_steps))
        fro2 = torch.zeros(nb, dtype=F64, device=G.device)
        for i in range(steps):
            g = G[:, i, :].to(dtype)
            if mean is not None:
                g = g - mean
            fro2 += g.double().square().sum(-1)
            v = torch.bmm(Finv, g.unsqueeze(-1))  # [nb, c, 1]
            denom = N + (g.unsqueeze(1) @ v).reshape(nb)
            vs = v / denom.reshape(nb, 1, 1)
            vt = v.transpose(1, 2)
            for a, b in rows:  # tiled rank-1 update: a temporary of (b - a)·c per block
                Finv[:, a:b].baddbmm_(vs[:, a:b], vt, alpha=-1.0)
        self.Finv, self.fro2 = Finv, fro2

    @classmethod
    def from_inverse(cls, Finv: torch.Tensor, fro2: torch.Tensor, lam: float, n: int) -> "ShermanMorrisonFactor":
        """The factor of inverses computed elsewhere (the streamed Fisher): ``Finv`` [nb, c, c] = (λI + GᵀG/n)⁻¹
        per block and ``fro2`` [nb] = ‖G_B‖_F² (for the lower bound of the diagonal)."""
        return _rebuild(cls, lam=float(lam), n=int(n), c=Finv.shape[-1], Finv=Finv, fro2=fro2)

    def diag(self, G: torch.Tensor | None = None) -> torch.Tensor:
        out = self.Finv.diagonal(dim1=-2, dim2=-1).to(F64)
        return torch.maximum(out, self._floor()[:, None]).clamp_(max=1.0 / self.lam)

    def apply(self, G: torch.Tensor | None, V: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.Finv.to(F64) if self.Finv.dtype != F64 else self.Finv, V.to(F64))

    def _map(self, f) -> "ShermanMorrisonFactor":
        return _rebuild(ShermanMorrisonFactor, lam=self.lam, n=self.n, c=self.c, Finv=f(self.Finv), fro2=f(self.fro2))

    @property
    def nbytes(self) -> int:
        return self.Finv.numel() * self.Finv.element_size()


def block_factor(G: torch.Tensor, lam: float, engine: str = "auto", *, center: bool = False,
                 col_chunk: int = DEFAULT_COL_CHUNK, sm_parts: int = 1, sm_dtype: torch.dtype = F64) -> BlockFactor:
    """Factor a batch of equal-size blocks G [nb, N, c] (or one block [N, c]) with the chosen route."""
    G = _check(G, lam)
    route = choose_route(G.shape[1], G.shape[2], engine)
    if route == "gram":
        return GramFactor(G, lam, center=center, col_chunk=col_chunk)
    if route == "direct":
        return DirectFactor(G, lam, center=center)
    return ShermanMorrisonFactor(G, lam, center=center, parts=sm_parts, dtype=sm_dtype)


def block_diag_inv(G: torch.Tensor, lam: float, engine: str = "auto", *, center: bool = False) -> torch.Tensor:
    """diag(F⁻¹) of F = λI + GᵀG/N for a block G [N, c] (-> [c]) or a batch [nb, N, c] (-> [nb, c]), float64."""
    single = G.dim() == 2
    Gb = _check(G, lam)
    d = block_factor(Gb, lam, engine, center=center).diag(Gb)
    return d[0] if single else d


def block_apply(G: torch.Tensor, lam: float, V: torch.Tensor, engine: str = "auto", *,
                center: bool = False) -> torch.Tensor:
    """F⁻¹V for a block G [N, c] and V [c] or [c, r] (or batched G [nb, N, c], V [nb, c, r]), float64."""
    single = G.dim() == 2
    Gb = _check(G, lam)
    vec = V.dim() == (1 if single else 2)
    Vb = V
    if single:
        Vb = Vb.unsqueeze(0)
    if vec:
        Vb = Vb.unsqueeze(-1)
    out = block_factor(Gb, lam, engine, center=center).apply(Gb, Vb)
    if vec:
        out = out.squeeze(-1)
    return out[0] if single else out


def dense_fisher(G: torch.Tensor, lam: float, center: bool = False) -> torch.Tensor:
    """The explicit damped Fisher λI + GᵀG/N of one block G [N, c], float64 (tests and tiny blocks only)."""
    G = G.to(F64)
    if center:
        G = G - G.mean(0, keepdim=True)
    return lam * torch.eye(G.shape[1], dtype=F64, device=G.device) + G.T @ G / G.shape[0]


__all__ = ["BlockFactor", "GramFactor", "DirectFactor", "ShermanMorrisonFactor", "block_factor", "block_diag_inv",
           "block_apply", "choose_route", "dense_fisher", "ENGINES"]
