"""Gradient statistics shared by the Fisher/Taylor criteria: the mean mini-batch gradient and its mean square.

Definitions (docs: pai.md sections 1 and 4.2). The scoring samples, in their given order, are split into
N_b = ceil(n/B) consecutive mini-batches of B samples (the last may be smaller). For each mini-batch b, L_b is the
MEAN loss over b and g_b = dL_b/dθ for every prunable tensor θ, taken at θ as it is (already masked; gradients at
pruned entries are computed normally). :func:`grad_stats` returns, from one pass over the data,

    mean = ḡ = (1/N_b) Σ_b g_b          sq = F̂ = (1/N_b) Σ_b g_b ⊙ g_b

B = 1 gives per-sample gradients: ḡ is the full-data mean gradient and F̂ the empirical Fisher diagonal.

Engines (``engine=``):

- ``'hooks'``: one batched forward and backward per chunk of up to ``max_chunk`` samples. Forward hooks capture the
  input of every prunable ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` and the gradient edge of its output (taken
  at forward time, so in-place ops that later modify the output, such as ``ReLU(inplace=True)``, do not disturb
  it); one ``torch.autograd.grad`` of the SUM of the per-sample losses w.r.t. those edges gives
  δ_n = ∂ℓ_n/∂out_n. The
  per-sample weight gradient is G_n = Σ_positions δ_n x_nᵀ (conv: on the unfolded input, per group), and
  g_b = (1/|b|) Σ_{n∈b} G_n. For B = 1 on a Linear without positions, Σ_n G_n⊙G_n = (δ⊙δ)ᵀ(x⊙x), one matmul
  and no per-sample tensor. Otherwise per-sample (B = 1) or per-mini-batch (B > 1) gradients are materialized in
  sub-chunks that stay within ``max_bytes``. No weight gradient and no input gradient is ever computed.
- ``'vmap'``: ``torch.func.vmap`` over mini-batches of ``grad`` of the mean mini-batch loss through
  ``functional_call`` (B = 1: per-sample gradients), in chunks sized to ``max_bytes``. Works for any module type
  and any mean loss that vmap can trace.
- ``'loop'``: one ``torch.autograd.grad`` of the mean loss per mini-batch: the reference, and the only engine for
  ``mode='train'`` (batch statistics make per-sample gradients depend on the other samples of the mini-batch).
- ``'auto'``: ``'loop'`` for ``mode='train'``; in eval mode ``'hooks'`` for the tensors it supports and ``'vmap'``
  for the others (a prunable tensor of a custom module, a Conv3d, a module called more than once per forward,
  tensors tied across modules); ``'vmap'`` for everything when the loss is a user function without a per-sample
  form; ``'loop'`` for tensors on which vmap fails. ``GradStats.engine`` says what ran, e.g. ``'hooks+vmap'``.

When B > ``max_chunk`` (eval mode) every mini-batch is processed as consecutive micro-batches of at most
``max_chunk`` samples whose summed-loss gradients are added and divided by |b| (pai.md 4.2); ``engine`` is then
``'batched'``. In train mode a mini-batch is always one forward of its |b| samples, whatever ``max_chunk``.

Dict batches (``{"input_ids": ..., "labels": ...}``, :mod:`prunekit.batches`) call the model as ``model(**batch)`` and
always run on the 'loop' engine (one forward and backward per mini-batch); the default loss is then the output's own
``.loss`` when it has one, else cross-entropy on its ``.logits`` (:func:`prunekit.registry.default_loss`).

Losses: the default cross-entropy runs in per-sample form (sum reduction). A user ``loss`` is taken as a MEAN over
the batch; 'vmap' and 'loop' call it on whole mini-batches, so any mean loss works there. The hooks engine needs the
sum of per-sample losses: pass ``per_sample_loss`` (per-sample values whose mean is ``loss``); with an explicit
``engine='hooks'`` and no ``per_sample_loss`` it uses ``loss × batch size``, exact only for a mean of per-sample terms.

Purity: weights, buffers (BN running statistics included), every ``.grad`` (None-ness too), ``requires_grad``
flags, the train/eval flag of every module and the CPU/CUDA RNG state are the same after the call, also when it
raises. Nothing is accumulated into ``.grad``.

Limits of the hooks engine: a prunable module's first positional argument must be its input with the samples along
dimension 0 (positions of a Linear are the dimensions between the first and the last); a tensor used outside its
module (e.g. ``F.linear(x, self.fc.weight)`` elsewhere) is not seen and gives a wrong result: use ``engine='vmap'``
for such models.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .batches import BatchStream, DictInputs, call
from .errors import PrunekitError, is_count
from .modes import scoring_mode
from .params import PrunableParam
from .registry import default_loss

try:  # torch >= 2.4
    from torch.autograd.graph import get_gradient_edge as gradient_edge
except ImportError:  # pragma: no cover - old torch: the hooks engine is not available
    gradient_edge = None

ENGINES = ("auto", "hooks", "vmap", "loop")
MODES = ("eval", "train")
#: Memory budget for per-sample / per-mini-batch tensors materialized at once (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
#: Per-sample gradients are formed in blocks of about this size (summed and squared while in cache).
BLOCK_BYTES = 8 * 2**20

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GradStats:
    """Result of :func:`grad_stats`. ``mean`` = ḡ and ``sq`` = F̂ (None with ``need_sq=False``), keyed by name."""

    mean: dict[str, torch.Tensor]
    sq: dict[str, torch.Tensor] | None
    n_samples: int
    n_batches: int
    batch_size: int
    passes: int
    engine: str


# --------------------------------------------------------------------------------------------------------- helpers


@contextmanager
def twice_differentiable(model: nn.Module):
    """Second-order scoring (Hessian-vector products: grasp, naivehess) on a transformers model, or a module that
    wraps one: its attention runs as ``"eager"`` (plain matmul + softmax, differentiable twice) while scoring, since
    PyTorch's fused scaled-dot-product attention kernels have no double backward; each model's own setting is
    restored after. The eager and fused kernels compute the same function (to float rounding). Models without a
    transformers attention setting are left as they are."""
    switched = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        before = getattr(cfg, "_attn_implementation", None)
        setter = getattr(m, "set_attn_implementation", None)
        if callable(setter) and before not in (None, "eager") and not any(m is s for s, _ in switched):
            if any(any(m is c for c in s.modules()) for s, _ in switched):
                continue  # inside a model already switched
            setter("eager")
            switched.append((m, before))
    try:
        yield
    finally:
        for m, before in reversed(switched):
            m.set_attn_implementation(before)


def batch_coupled(model: nn.Module) -> bool:
    """True when a BatchNorm without running statistics normalizes with batch statistics even in eval mode: the
    examples of a batch then depend on each other, so per-example gradients cannot come from batched hooks."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


def is_default_ce(loss) -> bool:
    return loss is None or loss is default_loss or loss is F.cross_entropy


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_n of the per-sample mean cross-entropy (outputs [n, C, d...] average over the d positions per sample)."""
    if not isinstance(out, torch.Tensor):  # a transformers ModelOutput from tuple batches (no labels given to it)
        out = out.logits
    per_class = out[0, 0].numel() if out.dim() > 2 else 1
    total = F.cross_entropy(out, y, reduction="sum")
    return total / per_class if per_class != 1 else total


def hook_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'conv2d' for the stock modules (subclasses that keep the stock forward), else None."""
    t = type(module)
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    for cls, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d")):
        if isinstance(module, cls) and t.forward is cls.forward and t._conv_forward is cls._conv_forward:
            return kind
    return None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Unsupported(Exception):
    """Internal: the hooks engine cannot handle a module in this forward."""


# ------------------------------------------------------------------------------------------------------------ run


def capture_io(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor, total_loss
               ) -> tuple[dict[nn.Module, torch.Tensor], dict[nn.Module, torch.Tensor]]:
    """One forward of ``x`` with hooks on ``modules`` and one backward of ``total_loss(output)`` (a sum over
    examples) to the modules' outputs only (no weight or input gradients): returns ``({module: d total/d output},
    {module: detached input})`` for the modules that were called and reach the loss.

    The output gradient is captured at the output's creation, so a later in-place op (``ReLU(inplace=True)``) does
    not corrupt it. Raises :class:`Unsupported` naming the modules called more than once, whose first input is not
    per-example, or whose input was modified in place.
    """
    records: dict[nn.Module, list] = {m: [] for m in modules}

    def hook(module, args, out):
        rec = records[module]
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor) \
                or out.grad_fn is None:
            rec.append(None)
        else:
            rec.append((args[0], args[0]._version, gradient_edge(out)))

    handles = [m.register_forward_hook(hook, prepend=True) for m in modules]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    bad = [m for m, rec in records.items()
           if len(rec) > 1 or (rec and (rec[0] is None or rec[0][0].shape[0] != n
                                         or rec[0][0]._version != rec[0][1]))]
    if bad:
        raise Unsupported(bad)
    live = [m for m, rec in records.items() if rec]
    grads = torch.autograd.grad(total_loss(out), [records[m][0][2] for m in live], allow_unused=True) if live else []
    dout = {m: g for m, g in zip(live, grads) if g is not None}
    return dout, {m: records[m][0][0].detach() for m in live}


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


def unfolder(m: nn.Module, x: torch.Tensor, kind: str, gr: int):
    """Function (a, b) -> unfolded input of samples [a, b) as [b-a, gr, (C/gr)*prod(k), P] for a Conv1d/2d.

    Row order (channel, kernel offsets) matches the weight's flattening. Built as a strided window view of the
    padded input and one reshape copy (faster than F.unfold on CPU; no copy at all for a 1x1 kernel, stride 1).
    """
    conv1d = kind == "conv1d"
    k, dil, st = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":  # 'same'/'valid', non-zero modes: as the module
        rp = list(m._reversed_padding_repeated_twice)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    else:  # F.pad order: last dimension first
        rp = [q for pad in reversed(m.padding) for q in (pad, pad)]
        mode = "constant"
    padded = any(rp)
    C = x.shape[1]
    rows = (C // gr) * math.prod(k)

    def unfold(a: int, b: int) -> torch.Tensor:
        xs = x[a:b]
        if padded:
            xs = F.pad(xs, rp, mode=mode)
        if conv1d:
            xs = xs.unsqueeze(2)  # [m, C, 1, L]
        kk, dd, ss = ((1,) + k, (1,) + dil, (1,) + st) if conv1d else (k, dil, st)
        N, _, H, W = xs.shape
        Ho = (H - dd[0] * (kk[0] - 1) - 1) // ss[0] + 1
        Wo = (W - dd[1] * (kk[1] - 1) - 1) // ss[1] + 1
        sn, sc, sh, sw = xs.stride()
        win = xs.as_strided((N, C, kk[0], kk[1], Ho, Wo),
                            (sn, sc, sh * dd[0], sw * dd[1], sh * ss[0], sw * ss[1]), xs.storage_offset())
        return win.reshape(N, gr, rows, Ho * Wo)

    return unfold


def _unique(params: Sequence[PrunableParam]) -> list[tuple[torch.Tensor, list[str]]]:
    """Distinct tensors with the names under which they are prunable (tied tensors appear once)."""
    out: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for p in params:
        t = p.tensor
        out.setdefault(id(t), (t, []))[1].append(p.name)
    return list(out.values())


# ------------------------------------------------------------------------------------------------------ front end


def grad_stats(
    model: nn.Module,
    params: Sequence[PrunableParam],
    data: Iterable,
    *,
    loss: LossFn | None = None,
    batch_size: int = 1,
    need_sq: bool = True,
    engine: str = "auto",
    max_chunk: int = 256,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> GradStats:
    """ḡ and F̂ of the prunable tensors ``params`` over ``data`` in mini-batches of ``batch_size`` (module docs).

    - ``data``: iterable of ``(inputs, targets)`` batches of any sizes; samples are taken in order and re-chunked.
      Each batch is moved to the device of the model's first parameter (floating inputs to its dtype).
    - ``loss(outputs, targets)``: a MEAN loss over the batch (cross-entropy by default). ``per_sample_loss``
      (optional) returns the per-sample terms whose mean is ``loss``; without it a user loss runs on 'vmap'.
    - ``mode``: 'eval' (running statistics, no dropout) or 'train' (batch statistics; loop engine only; B = 1 with
      BatchNorm is an error). The previous modes and all buffers are restored.
    - ``engine``: 'auto', 'hooks', 'vmap' or 'loop'; ``max_chunk``: samples per batched forward;
      ``max_bytes``: budget for materialized per-sample / per-mini-batch gradients.
    - ``dtype``: accumulation precision; default float32 (float64 for a float64 model).
    """
    params = _checked_params(model, params)
    _check_options(batch_size, max_chunk, engine, mode, params)
    device, fdtype, acc = _devices_and_precision(model, params, dtype)
    B = batch_size
    if mode == "train" and B == 1 and _has_batchnorm(model):
        raise PrunekitError("mode='train' with batch_size=1 on a model with BatchNorm: a normalization layer would "
                            "see a single sample; use batch_size > 1 or mode='eval'")

    run = _Run(model, params, loss, per_sample_loss, B, need_sq, acc, int(max_bytes))
    stream = BatchStream(data, device, fdtype, who="grad_stats")
    assign = _assign_engines(model, params, engine, mode, run.sum_loss is not None)
    with scoring_mode(model, mode, [p.tensor for p in params]):
        if mode == "eval" and B > max_chunk:
            n_samples, n_batches = _accumulate_micro_batches(run, stream, max_chunk)
        else:
            n_samples, n_batches = _accumulate_pieces(run, stream, assign, engine, mode, max_chunk)
    return _reduce_and_finish(run, n_samples, n_batches)


def _checked_params(model, params) -> list[PrunableParam]:
    """The model is a module and ``params`` a non-empty list of distinct PrunableParams (as a list)."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(params)
    if not params:
        raise PrunekitError("grad_stats needs at least one prunable parameter")
    if not all(isinstance(p, PrunableParam) for p in params):
        raise PrunekitError("params must be PrunableParam objects (see prunekit.params.prunable_params)")
    if len({p.name for p in params}) != len(params):
        raise PrunekitError("params name the same tensor twice")
    return params


def _check_options(batch_size, max_chunk, engine: str, mode: str, params: list[PrunableParam]) -> None:
    """Counts, engine and mode are valid together, and every prunable tensor is floating point."""
    if not is_count(batch_size):
        raise PrunekitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not is_count(max_chunk):
        raise PrunekitError(f"max_chunk must be a positive integer, got {max_chunk!r}")
    if engine not in ENGINES:
        raise PrunekitError(f"unknown gradient engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise PrunekitError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode == "train" and engine in ("hooks", "vmap"):
        raise PrunekitError(f"engine {engine!r} needs mode='eval': with batch statistics per-sample gradients depend "
                            "on the whole mini-batch; use engine='loop' (or 'auto') for mode='train'")
    for p in params:
        if not isinstance(p.tensor, torch.Tensor) or not p.tensor.is_floating_point():
            raise PrunekitError(f"prunable tensor {p.name!r} is not a floating-point tensor")


def _devices_and_precision(model: nn.Module, params: list[PrunableParam], dtype):
    """(device of the data, floating dtype of the model, accumulation dtype) for :func:`grad_stats`."""
    first = next(model.parameters(), None)
    if first is None:
        first = params[0].tensor
    device = first.device
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    # DDP adds the ranks' partial sums in another order than one process: float64 keeps that out of the ranking
    acc = dtype if dtype is not None else (
        torch.float64 if fdtype == torch.float64 or distributed.active() else torch.float32)
    if not isinstance(acc, torch.dtype) or not acc.is_floating_point:
        raise PrunekitError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    return device, fdtype, acc


def _assign_engines(model: nn.Module, params: list[PrunableParam], engine: str, mode: str,
                    has_sum_loss: bool) -> dict[str, str]:
    """Which engine ('hooks', 'vmap' or 'loop') handles which tensor, by name, before any fallback."""
    if mode == "train" or engine == "loop":
        return {p.name: "loop" for p in params}
    if engine == "vmap":
        return {p.name: "vmap" for p in params}
    assign: dict[str, str] = {}
    tied = {id(t) for t, names in _unique(params) if len(names) > 1}
    hookable = (gradient_edge is not None and not batch_coupled(model) and (has_sum_loss or engine == "hooks"))
    unsupported = []
    for p in params:
        ok = hookable and hook_kind(p.module) is not None and p.attr in ("weight", "bias") \
            and id(p.tensor) not in tied
        if not ok:
            unsupported.append(p.name)
        assign[p.name] = "hooks" if ok else "vmap"
    if engine == "hooks" and unsupported:
        raise PrunekitError(f"the hooks engine does not support {unsupported[0]!r} (only weights and biases of "
                            "nn.Linear, nn.Conv1d and nn.Conv2d, each used once per forward); use engine='auto' "
                            "or 'vmap'")
    return assign


# DDP, both streams below: every rank reads the same data and handles every world-size-th mini-batch (or piece of
# whole mini-batches); the sums and counts are then added over the ranks (prunekit.distributed)


def _accumulate_micro_batches(run: _Run, stream: BatchStream, max_chunk: int) -> tuple[int, int]:
    """Eval mode with B > max_chunk: each mini-batch as micro-batches of at most ``max_chunk`` samples whose
    summed-loss gradients are added and divided by |b|. Returns (samples, mini-batches) read."""
    B = run.B
    n_samples = n_batches = 0
    index = 0
    while True:
        carry, got, ours = None, 0, distributed.owns(index)
        while got < B:
            piece = stream.take(min(max_chunk, B - got))
            if piece is None:
                break
            if ours:
                s = run.summed(*piece)
                carry = s if carry is None else {k: carry[k] + s[k] for k in carry}
            got += piece[0].shape[0]
        if got == 0:
            break
        if ours:
            for name, v in carry.items():
                run._add(name, (v / got).unsqueeze(0))
        n_samples += got
        n_batches += 1
        index += 1
        if got < B:
            break
    run.used = ["batched"]
    return n_samples, n_batches


def _accumulate_pieces(run: _Run, stream: BatchStream, assign: dict[str, str], engine: str, mode: str,
                       max_chunk: int) -> tuple[int, int]:
    """Pieces of whole mini-batches (one mini-batch in train mode, up to ``max_chunk`` samples in eval mode), each
    through the assigned engines. Returns (samples, mini-batches) read."""
    B = run.B
    size = B if mode == "train" else B * max(1, max_chunk // B)
    n_samples = n_batches = 0
    index = 0
    while (piece := stream.take(size)) is not None:
        x, y = piece
        n = x.shape[0]
        if mode == "train" and n % B == 1 and _has_batchnorm(run.model):
            raise PrunekitError(f"mode='train': the last mini-batch holds a single sample ({n_samples + n} "
                                f"samples, batch_size={B}) and BatchNorm would see one value per channel; "
                                "use a sample count that leaves no mini-batch of one, or mode='eval'")
        if distributed.owns(index):
            _piece(run, x, y, run.params, assign, engine)
        index += 1
        n_samples += n
        n_batches += -(-n // B)
    return n_samples, n_batches


def _reduce_and_finish(run: _Run, n_samples: int, n_batches: int) -> GradStats:
    """Sums over the DDP ranks, then divides by the number of mini-batches."""
    distributed.all_sum(*run.sum.values(), *(run.sq.values() if run.need_sq else ()))
    run.passes = distributed.sum_int(run.passes)
    if n_samples == 0:
        raise PrunekitError("grad_stats got no samples: data yielded no (inputs, targets) batch with samples")
    mean = {k: v.div_(n_batches) for k, v in run.sum.items()}
    sq = {k: v.div_(n_batches) for k, v in run.sq.items()} if run.need_sq else None
    order = [e for e in ("batched", "hooks", "vmap", "loop") if e in run.used]
    return GradStats(mean, sq, n_samples, n_batches, run.B, run.passes, "+".join(order))


def _piece(run: _Run, x, y, params, assign: dict[str, str], engine: str) -> None:
    """Processes one piece of whole mini-batches with the assigned engines, moving tensors to a fallback on need.
    Dict batches (transformers models called as ``model(**batch)``) always take the loop engine."""
    if isinstance(x, DictInputs):
        run.loop(x, y, params)
        return
    hooks = [p for p in params if assign[p.name] == "hooks"]
    if hooks:
        try:
            run.hooks(x, y, hooks)
        except Unsupported as e:
            mods = e.args[0]
            if engine == "hooks":
                raise PrunekitError(f"the hooks engine cannot handle module {type(mods[0]).__name__} in this model "
                                    "(called more than once per forward, an input modified in place, or samples not "
                                    "along dimension 0); use engine='auto' or 'vmap'") from None
            for p in hooks:
                if p.module in mods:
                    assign[p.name] = "vmap"
            hooks = [p for p in params if assign[p.name] == "hooks"]
            if hooks:
                run.hooks(x, y, hooks)
    vm = [p for p in params if assign[p.name] == "vmap"]
    if vm:
        try:
            run.vmap(x, y, vm)
        except Exception:
            if engine != "auto":
                raise
            for p in vm:
                assign[p.name] = "loop"
    lp = [p for p in params if assign[p.name] == "loop"]
    if lp:
        run.loop(x, y, lp)
