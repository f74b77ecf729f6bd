"""The gradient engines of :func:`prunekit.gradstats.grad_stats` (package docs): :class:`_Run` accumulates Σ_b g_b
and Σ_b g_b⊙g_b over mini-batches through the 'loop', 'vmap' and 'hooks' engines (and the micro-batch sums of
``engine='batched'``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..batches import DictInputs, call
from ..params import PrunableParam
from ..registry import default_loss
from .capture import capture_io, hook_kind, unfolder
from .losses import LossFn, _ce_sum, is_default_ce

#: Per-sample gradients are formed in blocks of about this size (summed and squared while in cache).
BLOCK_BYTES = 8 * 2**20


class _Run:
    def __init__(self, model, params, loss, per_sample_loss, B, need_sq, acc, max_bytes):
        self.model, self.B, self.need_sq, self.acc, self.max_bytes = model, B, need_sq, acc, max_bytes
        self.params = params
        self.esize = torch.empty((), dtype=acc).element_size()
        if is_default_ce(loss):
            self.mean_loss: LossFn = default_loss  # cross-entropy; a transformers output's own .loss
            self.sum_loss: LossFn | None = _ce_sum
        else:
            self.mean_loss = loss
            self.sum_loss = (lambda out, y: per_sample_loss(out, y).sum()) if per_sample_loss is not None else None
        self.sum = {p.name: torch.zeros(p.tensor.shape, dtype=acc, device=p.tensor.device) for p in params}
        self.sq = ({p.name: torch.zeros(p.tensor.shape, dtype=acc, device=p.tensor.device) for p in params}
                   if need_sq else None)
        self.passes = 0
        self.used: list[str] = []

    def _used(self, engine: str) -> None:
        if engine not in self.used:
            self.used.append(engine)

    def _add(self, name: str, g: torch.Tensor) -> None:
        """Adds mini-batch gradients g [K, *shape] (already divided by |b|)."""
        g = g.to(self.acc)
        self.sum[name] += g.sum(0).view_as(self.sum[name])
        if self.need_sq:
            self.sq[name] += (g * g).sum(0).view_as(self.sq[name])

    def _add_sums(self, name: str, gsum: torch.Tensor, gsq: torch.Tensor | None) -> None:
        self.sum[name] += gsum.to(self.acc).view_as(self.sum[name])
        if self.need_sq:
            self.sq[name] += gsq.to(self.acc).view_as(self.sq[name])

    def _groups(self, n: int) -> tuple[int, int]:
        """(number of full mini-batches, size of the short last one or 0) in a piece of n samples."""
        return n // self.B, n % self.B

    # ---------------------------------------------------------------------------------------------------- loop

    def loop(self, x, y, params: list[PrunableParam]) -> None:
        """One autograd.grad of the mean loss per mini-batch of the piece."""
        self._used("loop")
        uniq = _unique(params)
        tensors = [t for t, _ in uniq]
        n = x.shape[0]
        for a in range(0, n, self.B):
            b = min(n, a + self.B)
            out = call(self.model, x[a:b])
            grads = torch.autograd.grad(self.mean_loss(out, y[a:b]), tensors, allow_unused=True)
            self.passes += 1
            for (t, names), g in zip(uniq, grads):
                g = torch.zeros_like(t) if g is None else g.detach()
                for name in names:
                    self._add(name, g.unsqueeze(0))

    def summed(self, x, y) -> list[torch.Tensor]:
        """Σ_n ∇ℓ_n over the piece for every prunable tensor (a micro-batch of a mini-batch over max_chunk)."""
        uniq = _unique(self.params)
        out = call(self.model, x)
        if self.sum_loss is not None and not isinstance(x, DictInputs):
            total = self.sum_loss(out, y)
        else:
            total = self.mean_loss(out, y) * x.shape[0]
        grads = torch.autograd.grad(total, [t for t, _ in uniq], allow_unused=True)
        self.passes += 1
        res = {}
        for (t, names), g in zip(uniq, grads):
            g = torch.zeros_like(t) if g is None else g.detach()
            for name in names:
                res[name] = g.to(self.acc)
        return res

    # ---------------------------------------------------------------------------------------------------- vmap

    def vmap(self, x, y, params: list[PrunableParam]) -> None:
        """vmap over the mini-batches of the piece of grad(mean mini-batch loss) w.r.t. ``params``."""
        from torch.func import functional_call, grad, vmap

        uniq = _unique(params)
        keys = [names[0] for _, names in uniq]
        model, mean_loss = self.model, self.mean_loss

        def f(ps, xb, yb):
            return mean_loss(functional_call(model, ps, (xb,)), yb)

        gfn = vmap(grad(f), in_dims=(None, 0, 0))
        ps = {k: t.detach() for k, (t, _) in zip(keys, uniq)}
        numel = sum(t.numel() for t, _ in uniq)
        # per mini-batch: its gradient, a cast / square copy, and autograd temporaries of about the same size
        per_group = max(1, self.max_bytes // max(1, 3 * self.esize * numel))
        n = x.shape[0]
        full, tail = self._groups(n)
        B = self.B
        chunks = [(a * B, min(full, a + per_group) * B, B) for a in range(0, full, per_group)]
        if tail:
            chunks.append((full * B, n, tail))
        gsum = {k: torch.zeros(t.shape, dtype=self.acc, device=t.device) for k, (t, _) in zip(keys, uniq)}
        gsq = {k: torch.zeros_like(v) for k, v in gsum.items()} if self.need_sq else None
        for a, b, size in chunks:
            k = (b - a) // size
            xs = x[a:b].reshape(k, size, *x.shape[1:])
            ys = y[a:b].reshape(k, size, *y.shape[1:])
            gs = gfn(ps, xs, ys)
            for key in keys:  # accumulate locally: a failure leaves the run untouched (fallback to 'loop')
                g = gs[key].detach().to(self.acc)
                gsum[key] += g.sum(0)
                if gsq is not None:
                    gsq[key] += (g * g).sum(0)
        self.passes += len(chunks)
        for key, (_, names) in zip(keys, uniq):
            for name in names:
                self._add_sums(name, gsum[key], gsq[key] if gsq is not None else None)
        self._used("vmap")

    # --------------------------------------------------------------------------------------------------- hooks

    def hooks(self, x, y, params: list[PrunableParam]) -> None:
        """One batched forward + backward; per-mini-batch gradients from module inputs and output gradients."""
        by_module: dict[nn.Module, list[PrunableParam]] = {}
        for p in params:
            by_module.setdefault(p.module, []).append(p)
        total_loss = (lambda out: self.sum_loss(out, y)) if self.sum_loss is not None else (
            lambda out: self.mean_loss(out, y) * x.shape[0])
        dout, inputs = capture_io(self.model, list(by_module), x, total_loss)
        self.passes += 1
        self._used("hooks")
        for m, ps in by_module.items():
            d = dout.get(m)
            if d is None:  # module not called, or its output does not reach the loss: zero gradient
                continue
            self._hooks_module(m, inputs[m], d.detach(), ps)

    def _hooks_module(self, m: nn.Module, x: torch.Tensor, d: torch.Tensor, ps: list[PrunableParam]) -> None:
        kind = hook_kind(m)
        n = x.shape[0]
        acc = self.acc
        if kind == "linear":
            gr = 1
            D = d.to(acc).reshape(n, -1, d.shape[-1]).transpose(1, 2).unsqueeze(1)  # [n, 1, out, P]
            Xl = x.to(acc).reshape(n, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)  # [n, 1, in, P]
            X = lambda a, b: Xl[a:b]  # noqa: E731
            unfold_bytes = 0  # views
        else:
            gr = m.groups
            D = d.to(acc).reshape(n, gr, m.out_channels // gr, -1)  # [n, gr, og, P]
            xin = x.to(acc)
            X = unfolder(m, xin, kind, gr)
            unfold_bytes = self.esize * m.in_channels * math.prod(m.kernel_size) * D.shape[-1]
        P = D.shape[-1]
        og, ig = D.shape[2], m.weight.shape[1] * (math.prod(m.weight.shape[2:]) if kind != "linear" else 1)
        B = self.B
        full, tail = self._groups(n)
        for p in ps:
            if p.attr == "bias":
                bvec = D.sum(-1).reshape(n, -1)  # [n, out]
                if full:
                    self._add(p.name, bvec[: full * B].reshape(full, B, -1).sum(1) / B)
                if tail:
                    self._add(p.name, bvec[full * B:].sum(0, keepdim=True) / tail)
                continue
            name = p.name
            if kind == "linear" and P == 1 and B == 1:  # fast path: no per-sample tensor
                D2, X2 = D.reshape(n, og), Xl.reshape(n, ig)
                gsq = (D2 * D2).t() @ (X2 * X2) if self.need_sq else None
                self._add_sums(name, D2.t() @ X2, gsq)
                continue
            if B == 1:
                self._per_sample(name, D, X, ig, unfold_bytes)
                continue
            # B > 1: per-mini-batch sums of per-sample gradients, contracted over (samples of b) x positions
            per_group = B * (2 * unfold_bytes + self.esize * (og * gr + ig * gr) * P) + 2 * self.esize * og * gr * ig
            k_max = self.max_bytes // max(1, per_group)
            if k_max >= 1:
                for a in range(0, full, k_max):
                    b = min(full, a + k_max)
                    k = b - a
                    Dk = D[a * B: b * B].reshape(k, B, gr, og, P)
                    Xk = X(a * B, b * B).reshape(k, B, gr, ig, P)
                    S = torch.einsum("kbgop,kbgip->kgoi", Dk, Xk)
                    self._add(name, S.reshape(k, -1) / B)
            else:  # one mini-batch alone is over budget: sum it over sample sub-chunks
                for a in range(full):
                    self._add(name, self._group_total(D, X, a * B, (a + 1) * B, unfold_bytes).unsqueeze(0) / B)
            if tail:
                self._add(name, self._group_total(D, X, full * B, n, unfold_bytes).unsqueeze(0) / tail)

    def _per_sample(self, name: str, D, X, ig: int, unfold_bytes: int) -> None:
        """B = 1: Σ_n G_n and Σ_n G_n⊙G_n with G_n = D_n X_nᵀ per group, materialized block by block.

        Samples go in sub-chunks whose unfolded input fits ``max_bytes``; within one, per-sample gradients are formed
        for a few output channels at a time (blocks of about BLOCK_BYTES, so that summing and squaring them runs in
        cache) and added straight into the accumulators.
        """
        n, gr, og, P = D.shape
        acc_sum = self.sum[name].view(gr, og, ig)
        acc_sq = self.sq[name].view(gr, og, ig) if self.need_sq else None
        m = max(1, min(n, self.max_bytes // max(1, unfold_bytes)))
        for a in range(0, n, m):
            b = min(n, a + m)
            Xt = X(a, b).transpose(-1, -2)  # [m, gr, P, ig]
            Ds = D[a:b]
            ob = max(1, min(og, BLOCK_BYTES // max(1, (b - a) * gr * ig * self.esize)))
            for o in range(0, og, ob):
                G = torch.matmul(Ds[:, :, o: o + ob], Xt)  # [m, gr, ob, ig]
                acc_sum[:, o: o + ob] += G.sum(0)
                if acc_sq is not None:
                    acc_sq[:, o: o + ob] += G.square_().sum(0)

    def _group_total(self, D, X, a: int, b: int, unfold_bytes: int) -> torch.Tensor:
        """Σ_{n in [a, b)} G_n, flattened, in sub-chunks within the memory budget."""
        per_sample = 2 * unfold_bytes + self.esize * (D.shape[1] * D.shape[2]) * D.shape[3] * 2
        s = max(1, self.max_bytes // max(1, per_sample))
        total = None
        for c in range(a, b, s):
            e = min(b, c + s)
            S = torch.einsum("ngop,ngip->goi", D[c:e], X(c, e)).reshape(-1)
            total = S if total is None else total + S
        return total


def _unique(params: Sequence[PrunableParam]) -> list[tuple[torch.Tensor, list[str]]]:
    """Distinct tensors with the names under which they are prunable (tied tensors appear once)."""
    out: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for p in params:
        t = p.tensor
        out.setdefault(id(t), (t, []))[1].append(p.name)
    return list(out.values())
