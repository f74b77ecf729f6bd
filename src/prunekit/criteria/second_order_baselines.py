"""Baselines of the second-order (WoodFisher) family, seed 003: ``magni``, ``globalmagni``, ``naivehess``,
``diagfisher``, ``kfac`` (second_order.md §7).

- ``magni`` / ``globalmagni``: |w| with an exact count per layer / one global count (``globalmagni`` optionally
  FLOPs-weighted, §6).
- ``naivehess``: OBD saliency ½·w²·H_ii with the exact Hessian diagonal (double backprop, batched one-hot tangents)
  or a Hutchinson estimate; no update.
- ``diagfisher``: ½·w²·F_qq with the diagonal empirical Fisher from per-example gradients; no update.
- ``kfac``: the OBS statistic and the summed OBS update with a per-layer Kronecker-factored Fisher Γ ⊗ A (one
  block Γ_g ⊗ A_g per group of a grouped or depthwise Conv1d/2d/3d).

Data (§1): each data method uses the first ``*_samples`` examples of ``data`` (the experiment harness feeds a
freshly drawn, seeded subset at every pruning step); with fewer examples it uses them all and warns. Statistics are
taken in eval mode under :func:`prunekit.modes.scoring_mode`: weights, buffers, ``.grad`` fields, ``requires_grad``
flags, module modes and the RNG state are unchanged by scoring (only ``kfac``'s update moves weights, by design).

Scopes: ``magni`` means layer-wise selection and ``globalmagni`` global selection; both register their scope
(``register(..., scope=...)``), so ``pk.prune`` uses it and rejects the other one.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import PrunekitError
from ..gradstats import grad_stats
from ..modes import model_device, scoring_mode
from ..params import PrunableParam
from ..registry import ScoreContext, register

try:  # torch >= 2.4
    from torch.autograd.graph import get_gradient_edge as _gradient_edge
except ImportError:  # pragma: no cover
    _gradient_edge = None

#: Memory budget for batched tangents / per-chunk tensors (bytes).
MAX_BYTES = 256 * 2**20

#: The selection scope each magnitude code stands for, and what to use instead for the other scope.
# ------------------------------------------------------------------------------------------------------ helpers


def _first_examples(data: Iterable | None, n: int, what: str, option: str, chunk: int,
                    device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` examples of ``data`` as consecutive (x, y) chunks of at most ``chunk`` examples, on
    ``device`` (floating inputs cast to ``dtype``). Warns when the data holds fewer than ``n``; raises when none."""
    if data is None:
        raise PrunekitError(f"{what} needs data: pass data= an iterable of (inputs, targets) batches")
    try:
        it = iter(data)
    except TypeError:
        raise PrunekitError(f"data must be an iterable of (inputs, targets) batches, got "
                            f"{type(data).__name__}") from None
    got = 0
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise PrunekitError(f"each data batch must be a pair (inputs, targets), got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0 \
                or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise PrunekitError("data batches must be (inputs, targets) tensors with the samples along dimension 0")
        k = min(x.shape[0], n - got)
        if k <= 0:
            break
        x, y = x[:k].to(device), y[:k].to(device)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        xs.append(x)
        ys.append(y)
        held += k
        got += k
        while held >= chunk:
            X, Y = torch.cat(xs), torch.cat(ys)
            yield X[:chunk], Y[:chunk]
            xs, ys, held = [X[chunk:]], [Y[chunk:]], held - chunk
        if got >= n:
            break
    if held:
        yield torch.cat(xs), torch.cat(ys)
    if got == 0:
        raise PrunekitError(f"{what} got no samples: data yielded no (inputs, targets) batch with samples")
    if got < n:
        warnings.warn(f"{what}: data holds only {got} examples, fewer than {option}={n}; using all {got}",
                      UserWarning, stacklevel=3)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def _unique(params: list[PrunableParam]) -> list[tuple[torch.Tensor, list[PrunableParam]]]:
    """Distinct tensors (tied tensors once) with the prunable entries that name them."""
    out: dict[int, tuple[torch.Tensor, list[PrunableParam]]] = {}
    for p in params:
        out.setdefault(id(p.tensor), (p.tensor, []))[1].append(p)
    return list(out.values())


def _alive_mask(ctx: ScoreContext, group: list[PrunableParam]) -> torch.Tensor:
    """Entries alive under any of the names of a (possibly tied) tensor."""
    m = ctx.masks[group[0].name].to(torch.bool)
    for p in group[1:]:
        m = m | ctx.masks[p.name].to(torch.bool)
    return m


def _check_positive(error, **values) -> None:
    for k, v in values.items():
        if v < 1:
            raise error(f"{k} must be a positive integer, got {v}")


# -------------------------------------------------------------------------------------------------- magnitude


@dataclass(frozen=True)
class MagniOptions:
    """``magni`` has no options of its own. It means layer-wise selection (exact count per layer):
    :func:`check_scope` turns ``scope='global'`` into an error that points to ``globalmagni``. Until ``pk.prune``
    consults it, pass ``scope='layer'``."""


@register("magni", family="second-order baseline (magnitude)", needs_data="none", options=MagniOptions,
          sources=("003",), scope="layer", summary="|w| with an exact count per layer (every layer gets the sparsity)")
def magni(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |w|, selected per layer: exactly round((1 − s)·n_ℓ) weights kept in each layer (ties by index). The
    reference scores (|w| + 1e-4)·mask; prunekit simply excludes pruned weights from the ranking (same order)."""
    return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}


@dataclass(frozen=True)
class GlobalMagniOptions:
    """FLOPs reweighting (second_order.md §6): ``flops_power`` p (0 = off) divides |w| by φ_ℓ^p, where
    φ_ℓ = nnz_ℓ·P_ℓ (the layer's current MACs per example, P_ℓ its output positions) or, with
    ``flops_per_param``, P_ℓ (the MACs one weight costs); layers with larger φ lose weights first. P_ℓ needs the
    input shape of one example: ``input_shape`` or ``model.input_shape``."""

    flops_power: float = 0.0
    flops_per_param: bool = False
    input_shape: tuple[int, ...] | None = None

    def validate(self, path, error) -> None:
        if not (self.flops_power >= 0 and math.isfinite(self.flops_power)):
            raise error(f"flops_power must be a finite number >= 0, got {self.flops_power}")


@register("globalmagni", family="second-order baseline (magnitude)", needs_data="none", options=GlobalMagniOptions,
          sources=("003",), scope="global", summary="|w| with one global count; optional FLOPs reweighting |w|/φ_ℓ^p")
def globalmagni(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |w| / φ_ℓ^p (p = ``flops_power``; p = 0 gives |w|), selected globally.

    φ_ℓ counts the layer's current nonzero weights (the mask in force) times its output positions. A layer with no
    weight left has φ_ℓ = 0 and no candidates; its scores are |w| = 0.
    """
    o = ctx.options
    if o.flops_power == 0:
        return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}
    from ..flops import layer_positions

    with scoring_mode(ctx.model, "eval"):  # layer_positions runs one forward; restore every module's mode
        layers = layer_positions(ctx.model, o.input_shape)
    out = {}
    for p in ctx.params:
        lf = layers.get(p.module_name)
        if lf is None:
            raise PrunekitError(f"globalmagni with flops_power: module {p.module_name!r} of {p.name!r} is not a "
                                "Conv/Linear layer whose FLOPs prunekit counts; exclude it or set flops_power=0")
        wname = f"{p.module_name}.weight" if p.module_name else "weight"
        wmask = ctx.masks.get(wname)
        nnz = int(wmask.sum()) if wmask is not None else lf.weights
        phi = float(lf.positions) if o.flops_per_param else float(nnz * lf.positions)
        s = p.tensor.detach().abs().double()
        out[p.name] = s / phi ** o.flops_power if phi > 0 else s
    return out


# --------------------------------------------------------------------------------------------------- naivehess


@dataclass(frozen=True)
class NaiveHessOptions:
    """- ``hess_samples``: examples of the (Fisher) subset over which the mean loss L is taken (first ones of
      ``data``); ``hess_batch``: examples per forward graph (L's Hessian is summed over these chunks).
    - ``hessian_diag``: ``exact`` (H_ii = (H e_i)_i for every active weight, double backprop with batched one-hot
      tangents) or ``hutchinson`` (mean of z ⊙ Hz over ``hutchinson_probes`` Rademacher probes z drawn from the
      mask generator; a prunekit addition for larger nets).
    - ``max_exact_hvp``: warn when the exact route needs more Hessian-vector products (one per active weight).
    - ``hvp_chunk``: tangents per batched product (None: sized to a 256 MiB budget).
    """

    hess_samples: int = 1000
    hess_batch: int = 250
    hessian_diag: Literal["exact", "hutchinson"] = "exact"
    hutchinson_probes: int = 100
    max_exact_hvp: int = 50_000
    hvp_chunk: int | None = None

    def validate(self, path, error) -> None:
        _check_positive(error, hess_samples=self.hess_samples, hess_batch=self.hess_batch,
                        hutchinson_probes=self.hutchinson_probes)
        if self.max_exact_hvp < 0:
            raise error(f"max_exact_hvp must be >= 0, got {self.max_exact_hvp}")
        if self.hvp_chunk is not None:
            _check_positive(error, hvp_chunk=self.hvp_chunk)


def _leaf_numel_hooks(model: nn.Module, counter: list[int]):
    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            counter[0] += out.numel()

    return [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]


def _batched_hvp(outputs, inputs, tangents, retain_graph: bool = True):
    """Hessian-vector products for a batch of tangents (leading dim K of each tangent): vmap over the double
    backward; falls back to a loop over the tangents where an op has no batching rule."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=tangents, retain_graph=retain_graph,
                                   is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        K = tangents[0].shape[0]
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=[t[k] for t in tangents], retain_graph=True,
                                    allow_unused=True) for k in range(K)]
        return tuple(None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(inputs)))


def hessian_diagonal(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Diagonal of the Hessian of the mean loss over the first ``hess_samples`` examples w.r.t. every prunable
    tensor (float64, keyed by name; 0 at pruned entries), by the route ``ctx.options.hessian_diag``."""
    o = ctx.options
    model = ctx.model
    uniq = _unique(ctx.params)
    tensors = [t for t, _ in uniq]
    alive = [_alive_mask(ctx, g).reshape(-1) for _, g in uniq]
    idx = [torch.nonzero(a, as_tuple=True)[0] for a in alive]
    n_active = sum(int(i.numel()) for i in idx)
    exact = o.hessian_diag == "exact"
    if exact and n_active > o.max_exact_hvp:
        warnings.warn(f"naivehess: the exact Hessian diagonal needs {n_active} Hessian-vector products (one per "
                      f"active weight, max_exact_hvp={o.max_exact_hvp}), each 2-3x a forward+backward over "
                      f"{o.hess_samples} examples; consider hessian_diag='hutchinson'", UserWarning, stacklevel=3)
    dev = model_device(model)
    diag = [torch.zeros(t.numel(), dtype=torch.float64, device=t.device) for t in tensors]
    chunks = list(_first_examples(ctx.data, o.hess_samples, "naivehess", "hess_samples", o.hess_batch, dev,
                                  _float_dtype(model)))
    n_total = sum(int(x.shape[0]) for x, _ in chunks)
    K_probes = o.hutchinson_probes
    probe_seeds: list[int] = []
    if not exact:  # one seed per probe chunk: the same probes are redrawn for every data chunk
        per = o.hvp_chunk or 32
        n_pc = -(-K_probes // per)
        probe_seeds = [int(s) for s in torch.randint(0, 2**62, (n_pc,), generator=ctx.generator)]
    with scoring_mode(model, "eval", tensors):
        for x, y in distributed.mine(chunks):  # DDP: this rank's chunks; the diagonals are summed below
            counter = [0]
            handles = _leaf_numel_hooks(model, counter)
            try:
                out = model(x)
            finally:
                for h in handles:
                    h.remove()
            L = ctx.loss(out, y) * (x.shape[0] / n_total)  # this chunk's share of the mean over the subset
            grads = torch.autograd.grad(L, tensors, create_graph=True, allow_unused=True)
            es = tensors[0].element_size()
            act = max(1, counter[0])
            if exact:
                for j, (t, g) in enumerate(zip(tensors, grads)):
                    if g is None or not g.requires_grad or idx[j].numel() == 0:
                        continue  # loss does not depend on t (or linearly): zero curvature
                    numel = t.numel()
                    K = o.hvp_chunk or int(min(256, max(1, MAX_BYTES // (es * (3 * numel + 4 * act)))))
                    for a in range(0, idx[j].numel(), K):
                        sel = idx[j][a:a + K]
                        k = sel.numel()
                        V = torch.zeros(k, numel, dtype=t.dtype, device=t.device)
                        rows = torch.arange(k, device=t.device)
                        V[rows, sel] = 1
                        (hv,) = _batched_hvp([g], [t], [V.view(k, *t.shape)])
                        if hv is not None:
                            diag[j][sel] += hv.reshape(k, numel)[rows, sel].double()
            else:
                live = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
                if not live:
                    continue
                per = o.hvp_chunk or 32
                for c, seed in enumerate(probe_seeds):
                    k = min(per, K_probes - c * per)
                    gen = torch.Generator().manual_seed(seed)
                    Z = []
                    for j in range(len(tensors)):
                        z = torch.randint(0, 2, (k, tensors[j].numel()), generator=gen, dtype=torch.int8)
                        z = (2 * z - 1).to(tensors[j].dtype) * alive[j].cpu().to(tensors[j].dtype)
                        Z.append(z.to(tensors[j].device))
                    hvs = _batched_hvp([grads[j] for j in live], [tensors[j] for j in live],
                                       [Z[j].view(k, *tensors[j].shape) for j in live])
                    for j, hv in zip(live, hvs):
                        if hv is not None:
                            diag[j] += (Z[j] * hv.reshape(k, -1)).double().sum(0) / K_probes
            del grads, L, out
    distributed.all_sum(*diag)
    res = {}
    for (t, group), d, a in zip(uniq, diag, alive):
        d = torch.where(a, d, torch.zeros_like(d)).view(t.shape)
        for p in group:
            res[p.name] = d
    return res


@register("naivehess", family="second-order baseline (OBD, Hessian diagonal)", needs_data="labels",
          options=NaiveHessOptions, sources=("003",),
          summary="OBD saliency ½·w²·H_ii, exact Hessian diagonal by double backprop (or Hutchinson)")
def naivehess(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = ½·w_i²·H_ii − min over active entries (≥ 0; pruned entries 0). The shift keeps the reference ordering:
    the most negative curvature terms are pruned first (a constant shift over all candidates changes no ranking, in
    either scope). H is the Hessian of the mean loss over the first ``hess_samples`` examples, true labels, eval
    mode.

    Reference defects fixed: the reference drops the ½ (ranking unchanged) and, as shipped, fails (a missing import
    and an undefined option). The exact route batches the one-hot tangents (vmap over the double backward) instead of
    one backward per weight.
    """
    h = hessian_diagonal(ctx)
    raw = {p.name: 0.5 * p.tensor.detach().double() ** 2 * h[p.name] for p in ctx.params}
    alive_vals = [raw[p.name][ctx.masks[p.name].to(torch.bool)] for p in ctx.params]
    alive_vals = [v for v in alive_vals if v.numel()]
    lo = float(torch.cat(alive_vals).min()) if alive_vals else 0.0
    return {p.name: torch.where(ctx.masks[p.name].to(torch.bool), raw[p.name] - lo, torch.zeros_like(raw[p.name]))
            for p in ctx.params}


# -------------------------------------------------------------------------------------------------- diagfisher


@dataclass(frozen=True)
class DiagFisherOptions:
    """``diag_fisher_samples``: N_d examples (the first ones of ``data``), one per-example gradient each (b = 1);
    this baseline ignores ``fisher_samples``."""

    diag_fisher_samples: int = 4096

    def validate(self, path, error) -> None:
        _check_positive(error, diag_fisher_samples=self.diag_fisher_samples)


@register("diagfisher", family="second-order baseline (diagonal Fisher)", needs_data="labels",
          options=DiagFisherOptions, sources=("003",),
          summary="½·w²·F_qq, diagonal empirical Fisher from per-example gradients (no damping, no update)")
def diagfisher(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = ½·w_q²·F_qq with F_qq = (1/N_d)·Σ_n (m ⊙ g_n)_q², g_n the gradient of example n's loss (true labels, eval
    mode), accumulated on the fly and vectorized (:func:`prunekit.gradstats.grad_stats`, batch_size=1). It is
    WoodFisher's ρ with a diagonal F in the limit λ → 0, without update. The reference adds 1e-4 to the score (a
    constant: no ranking changes); prunekit adds nothing."""
    o = ctx.options
    dev = model_device(ctx.model)
    data = _first_examples(ctx.data, o.diag_fisher_samples, "diagfisher", "diag_fisher_samples", 256, dev,
                           _float_dtype(ctx.model))
    st = grad_stats(ctx.model, ctx.params, data, loss=ctx.loss, batch_size=1, need_sq=True)
    out = {}
    for p in ctx.params:
        m = ctx.masks[p.name].to(torch.bool)
        fq = torch.where(m, st.sq[p.name], torch.zeros_like(st.sq[p.name]))
        out[p.name] = 0.5 * p.tensor.detach().to(fq.dtype) ** 2 * fq
    return out


# -------------------------------------------------------------------------------------------------------- kfac


@dataclass(frozen=True)
class KFACOptions:
    """- ``kfac_samples``: N examples (first ones of ``data``), one example's loss each; ``kfac_batch``: examples per
      forward.
    - ``true_fisher``: sample each label from the model's predictive distribution (mask generator) instead of the
      true label (empirical Fisher, default).
    - ``fisher_damp`` λ with factored damping: A_d = A + √(λπ)·I, Γ_d = Γ + √(λ/π)·I; ``kfac_pi``: π =
      (tr A/dim A)/(tr Γ/dim Γ) instead of 1 (π = 1 when either trace is 0).
    - ``scale_prune_update`` σ: the summed OBS update is scaled by σ (0 = no update, selection unchanged).
    """

    kfac_samples: int = 1000
    kfac_batch: int = 128
    true_fisher: bool = False
    fisher_damp: float = 1e-5
    kfac_pi: bool = False
    scale_prune_update: float = 1.0

    def validate(self, path, error) -> None:
        _check_positive(error, kfac_samples=self.kfac_samples, kfac_batch=self.kfac_batch)
        if not (self.fisher_damp > 0 and math.isfinite(self.fisher_damp)):
            raise error(f"fisher_damp must be a finite number > 0 (it makes the factors invertible), got "
                        f"{self.fisher_damp}")
        if not math.isfinite(self.scale_prune_update):
            raise error(f"scale_prune_update must be finite, got {self.scale_prune_update}")


_KFAC_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kfac_kind(m: nn.Module) -> str | None:
    """"linear" or "conv" (Conv1d/2d/3d, any ``groups``) for a module with its class's standard forward, else None."""
    t = type(m)
    if isinstance(m, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    for base in _KFAC_CONVS:
        if isinstance(m, base) and t.forward is base.forward and t._conv_forward is base._conv_forward:
            return "conv"
    return None


def _kfac_groups(m: nn.Module) -> int:
    """Independent Kronecker blocks of a layer: ``groups`` of a convolution, 1 for Linear."""
    return 1 if _kfac_kind(m) == "linear" else int(m.groups)


def _sample_labels(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """y ~ Categorical(softmax(out)) per example (classes along dimension 1; softmax of log-probabilities gives the
    probabilities back, so NLL models work too), drawn on the CPU from ``gen``."""
    with torch.no_grad():
        logits = out.detach().double().movedim(1, -1)
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).cpu()
        return torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input [n, in·∏k, P] of a Conv1d/2d/3d, rows in the weight's flattening order (channel, k1, k2, ...)
    over all ``in`` input channels (group g owns the rows of its in/groups channels, in order), P output positions.
    Conv2d unfolds with ``F.unfold``; Conv1d/3d take strided windows per spatial dimension (dilation: every
    dilation-th element of a window of span dilation·(k−1)+1)."""
    rp = list(m._reversed_padding_repeated_twice)
    if any(rp):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, rp, mode=mode)
    if isinstance(m, nn.Conv2d):
        return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
    nd = x.dim() - 2
    for i in range(nd):  # appends one window dimension per spatial dimension: [n, c, O1..Ond, k1..knd]
        k, dil, st = m.kernel_size[i], m.dilation[i], m.stride[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, st)[..., ::dil]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    return x.permute(perm).reshape(x.shape[0], x.shape[1] * math.prod(m.kernel_size), -1)


def _factor_sums(m: nn.Module, x: torch.Tensor, d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_n (1/P)·Σ_p a_np a_npᵀ and Σ_n Σ_p δ_np δ_npᵀ over one chunk (float64), from the layer input ``x`` and the
    output gradient ``d`` (None when the output does not reach the loss). Examples go in sub-chunks whose unfolded
    patches fit :data:`MAX_BYTES`; the products run in the activations' dtype and are summed in float64.

    A convolution with ``groups`` = g > 1 gets one pair per group, stacked: A [g, in/g·∏k, in/g·∏k] from the group's
    own patch rows and Γ [g, out/g, out/g] from the group's own output channels (no cross-group terms: group g's
    outputs see only its inputs, so the Fisher has no coupling between groups' weights under K-FAC either)."""
    n = x.shape[0]
    linear = _kfac_kind(m) == "linear"
    gr = _kfac_groups(m)
    dout, din = m.weight.shape[0], m.weight[0].numel()  # din: one group's inputs (in/groups·∏k for a conv)
    dg = dout // gr
    P = x[0].numel() // din if linear else math.prod(d.shape[2:]) if d is not None else 1
    per = 2 * x.element_size() * din * gr * P + (0 if d is None else d[0].numel() * d.element_size())
    sub = max(1, MAX_BYTES // max(1, per))
    shape_a, shape_g = ((din, din), (dout, dout)) if gr == 1 else ((gr, din, din), (gr, dg, dg))
    A = torch.zeros(shape_a, dtype=torch.float64, device=x.device)
    G = None if d is None else torch.zeros(shape_g, dtype=torch.float64, device=x.device)
    for a0 in range(0, n, sub):
        b0 = min(n, a0 + sub)
        if linear:  # rows: (example, position)
            a = x[a0:b0].reshape(-1, din)
            A += (a.t() @ a).double() / P
            if d is not None:
                dd = d[a0:b0].reshape(-1, dout)
                G += (dd.t() @ dd).double()
        elif gr == 1:
            a = _patches(m, x[a0:b0])  # [k, in·∏k, P]
            A += torch.einsum("nip,njp->ij", a, a).double() / a.shape[-1]
            if d is not None:
                dd = d[a0:b0].reshape(b0 - a0, dout, -1)  # [k, out, P]
                G += torch.einsum("nip,njp->ij", dd, dd).double()
        else:
            a = _patches(m, x[a0:b0])
            a = a.reshape(b0 - a0, gr, din, a.shape[-1])  # [k, g, in/g·∏k, P]
            A += torch.einsum("ngip,ngjp->gij", a, a).double() / a.shape[-1]
            if d is not None:
                dd = d[a0:b0].reshape(b0 - a0, gr, dg, -1)  # [k, g, out/g, P]
                G += torch.einsum("ngip,ngjp->gij", dd, dd).double()
    return A, G


@dataclass
class KFACFactors:
    """Per prunable tensor: the undamped factors A, Γ (float64), the damped inverses, and ``inv_diag`` =
    [F⁻¹]_(ij) = [Γ_d⁻¹]_ii·[A_d⁻¹]_jj shaped like the weight flattened to (out, in/groups·∏k).

    For a convolution with ``groups`` = g > 1 the factors are stacked per group: A, A_inv [g, in/g·∏k, in/g·∏k],
    Γ, Γ_inv [g, out/g, out/g] and ``pi`` a float64 tensor [g]; output channel o = g·(out/g) + i is row i of group
    g's block (F = blockdiag_g(Γ_g ⊗ A_g)). With g = 1 they are plain matrices and ``pi`` a float, as before."""

    A: torch.Tensor
    G: torch.Tensor
    A_inv: torch.Tensor
    G_inv: torch.Tensor
    inv_diag: torch.Tensor
    pi: float | torch.Tensor
    groups: int = 1


def _spd_inverse(M: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)  # M may be a stack [g, d, d] (one factor per group)
    if bool((info != 0).any()):
        raise PrunekitError(f"kfac: the damped factor {what} is not positive definite (non-finite statistics?); "
                            "raise fisher_damp")
    return torch.cholesky_inverse(L)


def kfac_factors(ctx: ScoreContext) -> dict[str, KFACFactors]:
    """A (inputs) and Γ (output gradients) of every prunable Linear / Conv1d / Conv2d / Conv3d, and their damped
    inverses.

    A = (1/(N·P))·Σ_n Σ_p a_np a_npᵀ and Γ = (1/N)·Σ_n Σ_p δ_np δ_npᵀ, δ_n the gradient of example n's own loss
    w.r.t. the layer output (the batch-mean loss times the batch size), P output positions. A bias gets A = [[1]]
    (its input is the constant 1) and the Γ of its layer.

    Grouped and depthwise convolutions (``groups`` = g > 1): each group is an independent linear map from its
    in/g·∏k patch features to its out/g outputs, so it gets its own A_g, Γ_g (the formulas above restricted to the
    group's patch rows and output channels), its own π_g (``kfac_pi``) and its own damping √(λπ_g)·I, √(λ/π_g)·I.
    """
    o = ctx.options
    model = ctx.model
    if _gradient_edge is None:  # pragma: no cover
        raise PrunekitError("kfac needs torch >= 2.4 (torch.autograd.graph.get_gradient_edge)")
    seen: dict[int, str] = {}
    for p in ctx.params:
        if _kfac_kind(p.module) is None:
            what = type(p.module).__name__
            if isinstance(p.module, (nn.Linear, *_KFAC_CONVS)):
                what += " with an overridden forward (its input → output map is unknown to kfac)"
            raise PrunekitError(f"kfac supports nn.Linear and nn.Conv1d/2d/3d (any groups) with their standard "
                                f"forward only; {p.name!r} belongs to {what}: exclude that module "
                                f"(exclude=[{p.module_name!r}]) or use another method")
        if p.attr not in ("weight", "bias"):
            raise PrunekitError(f"kfac prunes layer weights and biases only, not {p.name!r}")
        if id(p.tensor) in seen and seen[id(p.tensor)] != p.module_name:
            raise PrunekitError(f"kfac: {p.name!r} is tied to a tensor of another module; tied weights are not "
                                "supported")
        seen[id(p.tensor)] = p.module_name
    modules: dict[nn.Module, str] = {}
    for p in ctx.params:
        modules.setdefault(p.module, p.module_name)
    dev = model_device(model)
    A_sum = {m: None for m in modules}
    G_sum = {m: None for m in modules}
    n_total = 0
    records: dict[nn.Module, list] = {m: [] for m in modules}

    def hook(mod, args, out):
        records[mod].append((args[0], args[0]._version, _gradient_edge(out)) if out.grad_fn is not None else None)

    chunks = _first_examples(ctx.data, o.kfac_samples, "kfac", "kfac_samples", o.kfac_batch, dev,
                             _float_dtype(model))
    with scoring_mode(model, "eval", [p.tensor for p in ctx.params]):
        for index, (x, y) in enumerate(chunks):
            n = x.shape[0]
            if not distributed.owns(index):  # DDP: another rank's chunk (its sums are added below)
                if o.true_fisher:  # draw its labels all the same: the generator stays in step on every rank
                    with torch.no_grad():
                        _sample_labels(model(x), ctx.generator)
                n_total += n
                continue
            for r in records.values():
                r.clear()
            handles = [m.register_forward_hook(hook) for m in modules]
            try:
                out = model(x)
            finally:
                for h in handles:
                    h.remove()
            if o.true_fisher:
                y = _sample_labels(out, ctx.generator).to(y.device)
            for m, rec in records.items():
                if len(rec) > 1:
                    raise PrunekitError(f"kfac: module {modules[m]!r} is called {len(rec)} times per forward; shared "
                                        "modules are not supported")
                if rec and (rec[0] is None or rec[0][0]._version != rec[0][1]):
                    raise PrunekitError(f"kfac: the input of module {modules[m]!r} is modified in place during the "
                                        "forward (or its output does not require grad)")
            live = [m for m, rec in records.items() if rec]
            total = ctx.loss(out, y) * n  # each example's own loss: δ of the batch mean times the batch size
            grads = torch.autograd.grad(total, [records[m][0][2] for m in live], allow_unused=True) if live else []
            dout = dict(zip(live, grads))
            for m in modules:
                if not records[m]:
                    continue
                At, Gt = _factor_sums(m, records[m][0][0].detach(), dout.get(m))
                A_sum[m] = At if A_sum[m] is None else A_sum[m] + At
                if Gt is not None:
                    G_sum[m] = Gt if G_sum[m] is None else G_sum[m] + Gt
            n_total += n
            del out, total, grads, dout
            for r in records.values():
                r.clear()
    names = list(modules)
    summed = distributed.all_sum_optional([A_sum[m] for m in names] + [G_sum[m] for m in names])
    A_sum = dict(zip(names, summed[: len(names)]))
    G_sum = dict(zip(names, summed[len(names):]))
    lam = o.fisher_damp
    res: dict[str, KFACFactors] = {}
    for m, mname in modules.items():
        if _kfac_groups(m) > 1:
            res.update(_grouped_factors(ctx, m, mname, A_sum[m], G_sum[m], n_total, dev))
            continue
        w = m.weight
        din = w[0].numel()
        dout_ = w.shape[0]
        A = (A_sum[m] / n_total) if A_sum[m] is not None else torch.zeros(din, din, dtype=torch.float64, device=dev)
        G = (G_sum[m] / n_total) if G_sum[m] is not None else torch.zeros(dout_, dout_, dtype=torch.float64,
                                                                           device=dev)
        pi = 1.0
        if o.kfac_pi:
            ta, tg = float(torch.trace(A)) / din, float(torch.trace(G)) / dout_
            pi = ta / tg if ta > 0 and tg > 0 else 1.0
        eye_a = torch.eye(din, dtype=torch.float64, device=A.device)
        eye_g = torch.eye(dout_, dtype=torch.float64, device=G.device)
        A_inv = _spd_inverse(A + math.sqrt(lam * pi) * eye_a, f"A of {mname!r}")
        G_inv = _spd_inverse(G + math.sqrt(lam / pi) * eye_g, f"Γ of {mname!r}")
        gd = torch.diagonal(G_inv)
        for p in ctx.params:
            if p.module is not m:
                continue
            if p.attr == "weight":
                res[p.name] = KFACFactors(A, G, A_inv, G_inv, torch.outer(gd, torch.diagonal(A_inv)), pi)
            else:  # bias: input 1, A = [[1]]
                one = torch.ones(1, 1, dtype=torch.float64, device=A.device)
                a_inv = 1.0 / (1.0 + math.sqrt(lam * pi)) * one
                res[p.name] = KFACFactors(one, G, a_inv, G_inv, gd.unsqueeze(1) * a_inv, pi)
    return res


def _grouped_factors(ctx: ScoreContext, m: nn.Module, mname: str, A_sum: torch.Tensor | None,
                     G_sum: torch.Tensor | None, n_total: int, dev) -> dict[str, KFACFactors]:
    """The factors of a convolution with groups = g > 1: the groups=1 conventions of :func:`kfac_factors` applied to
    each group's stacked A_g [din, din], Γ_g [dg, dg] (din = in/g·∏k, dg = out/g)."""
    lam = ctx.options.fisher_damp
    gr = m.groups
    din, dg = m.weight[0].numel(), m.weight.shape[0] // gr
    A = A_sum / n_total if A_sum is not None else torch.zeros(gr, din, din, dtype=torch.float64, device=dev)
    G = G_sum / n_total if G_sum is not None else torch.zeros(gr, dg, dg, dtype=torch.float64, device=dev)
    pi = torch.ones(gr, dtype=torch.float64, device=A.device)
    if ctx.options.kfac_pi:
        ta = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) / din
        tg = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1) / dg
        pi = torch.where((ta > 0) & (tg > 0), ta / torch.where(tg > 0, tg, 1.0), pi)
    eye_a = torch.eye(din, dtype=torch.float64, device=A.device)
    eye_g = torch.eye(dg, dtype=torch.float64, device=G.device)
    A_inv = _spd_inverse(A + torch.sqrt(lam * pi)[:, None, None] * eye_a, f"A of {mname!r} (one per group)")
    G_inv = _spd_inverse(G + torch.sqrt(lam / pi)[:, None, None] * eye_g, f"Γ of {mname!r} (one per group)")
    gd = torch.diagonal(G_inv, dim1=-2, dim2=-1)  # [g, dg]
    res = {}
    for p in ctx.params:
        if p.module is not m:
            continue
        if p.attr == "weight":
            inv_diag = (gd[:, :, None] * torch.diagonal(A_inv, dim1=-2, dim2=-1)[:, None, :]).reshape(gr * dg, din)
            res[p.name] = KFACFactors(A, G, A_inv, G_inv, inv_diag, pi, gr)
        else:  # bias: input 1, A_g = [[1]]
            one = torch.ones(gr, 1, 1, dtype=torch.float64, device=A.device)
            a_inv = 1.0 / (1.0 + torch.sqrt(lam * pi))[:, None, None] * one
            res[p.name] = KFACFactors(one, G, a_inv, G_inv, (gd[:, :, None] * a_inv).reshape(gr * dg, 1), pi, gr)
    return res


def kfac_update(ctx: ScoreContext, before: dict, after: dict) -> None:
    """Summed OBS update (§2) per tensor: U = w / [F⁻¹] on the newly pruned entries (0 elsewhere) and
    δW = −σ·Γ_d⁻¹·U·A_d⁻¹, i.e. −σ·F⁻¹·vec(U) for F⁻¹ = Γ_d⁻¹ ⊗ A_d⁻¹ (row-major out × in·kh·kw). A grouped
    convolution does this per group (U_g: the group's out/g rows; F⁻¹ is block-diagonal over groups). Applied in
    place before the new masks zero the pruned entries. σ = 0 leaves every weight unchanged."""
    sigma = float(ctx.options.scale_prune_update)
    factors: dict[str, KFACFactors] = ctx.state.get("kfac", {})
    if sigma == 0 or not factors:
        return
    done: set[int] = set()
    for p in ctx.params:
        f = factors.get(p.name)
        t = p.tensor
        if f is None or id(t) in done:
            continue
        done.add(id(t))
        new = (before[p.name].to(torch.bool) & ~after[p.name].to(torch.bool)).reshape(f.inv_diag.shape)
        if not bool(new.any()):
            continue
        w = t.detach().double().reshape(f.inv_diag.shape)
        U = torch.where(new, w / f.inv_diag, torch.zeros_like(w))
        if f.groups > 1:  # [g, out/g, din] per group, batched
            dW = -sigma * (f.G_inv @ U.reshape(f.groups, -1, U.shape[-1]) @ f.A_inv)
        else:
            dW = -sigma * (f.G_inv @ U @ f.A_inv)
        t.add_(dW.reshape(t.shape).to(t.dtype))


@register("kfac", family="second-order (OBS, K-FAC)", needs_data="labels", options=KFACOptions, sources=("003",),
          update=kfac_update,
          summary="OBS statistic and summed OBS update with a per-layer Kronecker-factored Fisher Γ ⊗ A")
def kfac(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """ρ_ij = w_ij² / (2·[Γ_d⁻¹]_ii·[A_d⁻¹]_jj) per prunable Linear / Conv1d / Conv2d / Conv3d weight; the factors
    go to ``ctx.state['kfac']`` for :func:`kfac_update`. Factors and inverses are float64 (Cholesky); the Kronecker
    product is never formed (memory O(in² + out²) per layer). The factors ignore the mask (Γ ⊗ A cannot express it),
    so the update may move previously pruned coordinates, which the mask zeroes again.

    Grouped and depthwise convolutions get one Kronecker block Γ_g ⊗ A_g per group (each group is an independent
    linear map; memory O(g·((in/g·∏k)² + (out/g)²))), with the same damping, π and update per group. Earlier
    versions refused them and Conv1d/Conv3d; a groups=1 Conv2d and Linear give the same factors as before.

    Reference defect fixed: the reference assembles a dense d_ℓ × d_ℓ block per layer (memory-bound and slow).
    """
    factors = kfac_factors(ctx)
    ctx.state["kfac"] = factors
    out = {}
    for p in ctx.params:
        f = factors[p.name]
        w = p.tensor.detach().double().reshape(f.inv_diag.shape)
        out[p.name] = (w * w / (2.0 * f.inv_diag)).reshape(p.tensor.shape)
    return out
