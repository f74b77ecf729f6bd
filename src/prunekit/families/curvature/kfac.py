"""``kfac`` (seed 003, second_order.md §7): the OBS statistic and the summed OBS update with a per-layer
Kronecker-factored Fisher Γ ⊗ A (one block Γ_g ⊗ A_g per group of a grouped or depthwise Conv1d/2d/3d). Each
data method uses the first ``kfac_samples`` examples of ``data``; statistics in eval mode under
:func:`prunekit.modes.scoring_mode` (only the update moves weights, by design)."""
from __future__ import annotations


import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...errors import PrunekitError
from ...batches import DictInputs, call
from ...modes import model_device, scoring_mode
from ...params import hf_conv1d
from ...registry import PruningMethod, ScoreContext, register

try:  # torch >= 2.4
    from torch.autograd.graph import get_gradient_edge as gradient_edge
except ImportError:  # pragma: no cover
    gradient_edge = None

from .common import MAX_BYTES, check_positive, first_examples, float_dtype

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
        check_positive(error, kfac_samples=self.kfac_samples, kfac_batch=self.kfac_batch)
        if not (self.fisher_damp > 0 and math.isfinite(self.fisher_damp)):
            raise error(f"fisher_damp must be a finite number > 0 (it makes the factors invertible), got "
                        f"{self.fisher_damp}")
        if not math.isfinite(self.scale_prune_update):
            raise error(f"scale_prune_update must be finite, got {self.scale_prune_update}")


_KFAC_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _kfac_kind(m: nn.Module) -> str | None:
    """"linear" or "conv" (Conv1d/2d/3d, any ``groups``) for a module with its class's standard forward, "conv1d_hf"
    for GPT-2's ``transformers.pytorch_utils.Conv1D`` (y = x·W + b with W stored (in, out): a Linear with the weight
    transposed), else None."""
    t = type(m)
    if isinstance(m, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    hf = hf_conv1d()
    if hf is not None and isinstance(m, hf) and t.forward is hf.forward:
        return "conv1d_hf"
    for base in _KFAC_CONVS:
        if isinstance(m, base) and t.forward is base.forward and t._conv_forward is base._conv_forward:
            return "conv"
    return None


def _kfac_groups(m: nn.Module) -> int:
    """Independent Kronecker blocks of a layer: ``groups`` of a convolution, 1 for Linear (and Conv1D)."""
    return int(m.groups) if _kfac_kind(m) == "conv" else 1


def _out_in(m: nn.Module) -> tuple[int, int]:
    """(outputs, inputs of one group) of a layer, whatever the weight's storage order."""
    if _kfac_kind(m) == "conv1d_hf":
        return m.weight.shape[1], m.weight.shape[0]
    return m.weight.shape[0], m.weight[0].numel()


def _as_out_in(p, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``p`` in the (out, in) orientation of the factors (Conv1D's (in, out) transposed)."""
    return t.t() if p.attr == "weight" and _kfac_kind(p.module) == "conv1d_hf" else t


def _from_out_in(p, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_as_out_in`."""
    return _as_out_in(p, t)


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
    linear = _kfac_kind(m) != "conv"
    gr = _kfac_groups(m)
    dout, din = _out_in(m)  # din: one group's inputs (in/groups·∏k for a conv)
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


def _check_params(ctx: ScoreContext) -> None:
    """Refuse what the Kronecker factors cannot express: layers other than standard Linear / Conv1d/2d/3d, tensors
    other than weight and bias, and tensors tied across modules."""
    seen: dict[int, str] = {}
    for p in ctx.params:
        if _kfac_kind(p.module) is None:
            what = type(p.module).__name__
            if isinstance(p.module, (nn.Linear, *_KFAC_CONVS)):
                what += " with an overridden forward (its input → output map is unknown to kfac)"
            raise PrunekitError(f"kfac supports nn.Linear, nn.Conv1d/2d/3d (any groups) and transformers' Conv1D "
                                f"with their standard forward only; {p.name!r} belongs to {what}: exclude that module "
                                f"(exclude=[{p.module_name!r}]) or use another method")
        if p.attr not in ("weight", "bias"):
            raise PrunekitError(f"kfac prunes layer weights and biases only, not {p.name!r}")
        if id(p.tensor) in seen and seen[id(p.tensor)] != p.module_name:
            raise PrunekitError(f"kfac: {p.name!r} is tied to a tensor of another module; tied weights are not "
                                "supported")
        seen[id(p.tensor)] = p.module_name


def _recorded_forward(model: nn.Module, modules: dict[nn.Module, str], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``model(x)`` and, per layer of ``modules``, its calls: (input, the input's version, the output's gradient
    edge), or None for a call whose output does not require grad."""
    records: dict[nn.Module, list] = {m: [] for m in modules}

    def hook(mod, args, out):
        records[mod].append((args[0], args[0]._version, gradient_edge(out)) if out.grad_fn is not None else None)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        out = call(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, records


def _check_records(records: dict[nn.Module, list], modules: dict[nn.Module, str]) -> None:
    """Each layer is called at most once per forward, on an input nothing modifies in place, with a differentiable
    output."""
    for m, rec in records.items():
        if len(rec) > 1:
            raise PrunekitError(f"kfac: module {modules[m]!r} is called {len(rec)} times per forward; shared "
                                "modules are not supported")
        if rec and (rec[0] is None or rec[0][0]._version != rec[0][1]):
            raise PrunekitError(f"kfac: the input of module {modules[m]!r} is modified in place during the "
                                "forward (or its output does not require grad)")


def _add_chunk_sums(ctx: ScoreContext, modules: dict[nn.Module, str], x: torch.Tensor, y: torch.Tensor,
                    A_sum: dict, G_sum: dict) -> None:
    """Add one chunk's factor sums (:func:`_factor_sums`) of every layer called in its forward to ``A_sum`` and
    ``G_sum`` (None until a layer's first sum); the loss of each example is its own (true Fisher: on labels drawn
    from ``ctx.generator``)."""
    out, records = _recorded_forward(ctx.model, modules, x)
    if ctx.options.true_fisher and isinstance(x, DictInputs):
        raise PrunekitError("kfac: true_fisher is not supported with dict batches (model(**batch)): the labels drawn "
                            "from the outputs would have to match the model's own loss; use true_fisher=False")
    if ctx.options.true_fisher:
        y = _sample_labels(out, ctx.generator).to(y.device)
    _check_records(records, modules)
    live = [m for m, rec in records.items() if rec]
    total = ctx.loss(out, y) * x.shape[0]  # each example's own loss: δ of the batch mean times the batch size
    grads = torch.autograd.grad(total, [records[m][0][2] for m in live], allow_unused=True) if live else []
    dout = dict(zip(live, grads))
    for m in modules:
        if not records[m]:
            continue
        At, Gt = _factor_sums(m, records[m][0][0].detach(), dout.get(m))
        A_sum[m] = At if A_sum[m] is None else A_sum[m] + At
        if Gt is not None:
            G_sum[m] = Gt if G_sum[m] is None else G_sum[m] + Gt


def _summed_statistics(ctx: ScoreContext, modules: dict[nn.Module, str], dev: torch.device) -> tuple[dict, dict, int]:
    """(Σ a aᵀ per layer, Σ δ δᵀ per layer, N) over the first ``kfac_samples`` examples of ``ctx.data``, summed over
    the DDP ranks (each rank takes every world-size-th chunk); a layer no chunk reached has None."""
    o = ctx.options
    model = ctx.model
    A_sum = {m: None for m in modules}
    G_sum = {m: None for m in modules}
    n_total = 0
    chunks = first_examples(ctx.data, o.kfac_samples, "kfac", "kfac_samples", o.kfac_batch, dev,
                             float_dtype(model))
    with scoring_mode(model, "eval", [p.tensor for p in ctx.params]):
        for index, (x, y) in enumerate(chunks):
            if not distributed.owns(index):  # DDP: another rank's chunk (its sums are added below)
                if o.true_fisher:  # draw its labels all the same: the generator stays in step on every rank
                    with torch.no_grad():
                        _sample_labels(call(model, x), ctx.generator)
            else:
                _add_chunk_sums(ctx, modules, x, y, A_sum, G_sum)
            n_total += x.shape[0]
    names = list(modules)
    summed = distributed.all_sum_optional([A_sum[m] for m in names] + [G_sum[m] for m in names])
    return dict(zip(names, summed[: len(names)])), dict(zip(names, summed[len(names):])), n_total


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
    if gradient_edge is None:  # pragma: no cover
        raise PrunekitError("kfac needs torch >= 2.4 (torch.autograd.graph.get_gradient_edge)")
    _check_params(ctx)
    modules: dict[nn.Module, str] = {}
    for p in ctx.params:
        modules.setdefault(p.module, p.module_name)
    dev = model_device(ctx.model)
    A_sum, G_sum, n_total = _summed_statistics(ctx, modules, dev)
    res: dict[str, KFACFactors] = {}
    for m, mname in modules.items():
        layer_factors = _grouped_factors if _kfac_groups(m) > 1 else _dense_factors
        res.update(layer_factors(ctx, m, mname, A_sum[m], G_sum[m], n_total, dev))
    return res


def _dense_factors(ctx: ScoreContext, m: nn.Module, mname: str, A_sum: torch.Tensor | None,
                   G_sum: torch.Tensor | None, n_total: int, dev) -> dict[str, KFACFactors]:
    """The factors of a Linear or a convolution with groups = 1: A [din, din], Γ [dout, dout] and their damped
    inverses, for the layer's weight and (A = [[1]]) bias."""
    lam = ctx.options.fisher_damp
    dout, din = _out_in(m)
    A = (A_sum / n_total) if A_sum is not None else torch.zeros(din, din, dtype=torch.float64, device=dev)
    G = (G_sum / n_total) if G_sum is not None else torch.zeros(dout, dout, dtype=torch.float64, device=dev)
    pi = 1.0
    if ctx.options.kfac_pi:
        ta, tg = float(torch.trace(A)) / din, float(torch.trace(G)) / dout
        pi = ta / tg if ta > 0 and tg > 0 else 1.0
    eye_a = torch.eye(din, dtype=torch.float64, device=A.device)
    eye_g = torch.eye(dout, dtype=torch.float64, device=G.device)
    A_inv = _spd_inverse(A + math.sqrt(lam * pi) * eye_a, f"A of {mname!r}")
    G_inv = _spd_inverse(G + math.sqrt(lam / pi) * eye_g, f"Γ of {mname!r}")
    gd = torch.diagonal(G_inv)
    res = {}
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


def kfac_update(ctx: ScoreContext, before: dict, after: dict, factors: dict[str, KFACFactors] | None = None) -> None:
    """Summed OBS update (§2) per tensor: U = w / [F⁻¹] on the newly pruned entries (0 elsewhere) and
    δW = −σ·Γ_d⁻¹·U·A_d⁻¹, i.e. −σ·F⁻¹·vec(U) for F⁻¹ = Γ_d⁻¹ ⊗ A_d⁻¹ (row-major out × in·kh·kw). A grouped
    convolution does this per group (U_g: the group's out/g rows; F⁻¹ is block-diagonal over groups). Applied in
    place before the new masks zero the pruned entries. σ = 0 leaves every weight unchanged."""
    sigma = float(ctx.options.scale_prune_update)
    factors = factors or {}
    if sigma == 0 or not factors:
        return
    done: set[int] = set()
    for p in ctx.params:
        f = factors.get(p.name)
        t = p.tensor
        if f is None or id(t) in done:
            continue
        done.add(id(t))
        w = _as_out_in(p, t.detach().double()).reshape(f.inv_diag.shape)
        new = _as_out_in(p, (before[p.name].to(torch.bool) & ~after[p.name].to(torch.bool))).reshape(
            f.inv_diag.shape)
        if not bool(new.any()):
            continue
        U = torch.where(new, w / f.inv_diag, torch.zeros_like(w))
        if f.groups > 1:  # [g, out/g, din] per group, batched
            dW = -sigma * (f.G_inv @ U.reshape(f.groups, -1, U.shape[-1]) @ f.A_inv)
        else:
            dW = -sigma * (f.G_inv @ U @ f.A_inv)
        t.add_(_from_out_in(p, dW.reshape(_as_out_in(p, t).shape)).to(t.dtype))


def kfac(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """ρ_ij = w_ij² / (2·[Γ_d⁻¹]_ii·[A_d⁻¹]_jj) per prunable Linear / Conv1d / Conv2d / Conv3d weight; the factors
    are what :func:`kfac_update` needs (the :class:`KFAC` method object keeps them between the two). Factors and
    inverses are float64 (Cholesky); the Kronecker product is never formed (memory O(in² + out²) per layer). The
    factors ignore the mask (Γ ⊗ A cannot express it), so the update may move previously pruned coordinates, which
    the mask zeroes again.

    Grouped and depthwise convolutions get one Kronecker block Γ_g ⊗ A_g per group (each group is an independent
    linear map; memory O(g·((in/g·∏k)² + (out/g)²))), with the same damping, π and update per group. Earlier
    versions refused them and Conv1d/Conv3d; a groups=1 Conv2d and Linear give the same factors as before.

    Reference defect fixed: the reference assembles a dense d_ℓ × d_ℓ block per layer (memory-bound and slow).
    """
    return kfac_scores(ctx, kfac_factors(ctx))


def kfac_scores(ctx: ScoreContext, factors: dict[str, KFACFactors]) -> dict[str, torch.Tensor]:
    """ρ_ij = w_ij² / (2·[Γ_d⁻¹]_ii·[A_d⁻¹]_jj) from the factors of :func:`kfac_factors`."""
    out = {}
    for p in ctx.params:
        f = factors[p.name]
        w = _as_out_in(p, p.tensor.detach().double())
        rho = (w * w).reshape(f.inv_diag.shape) / (2.0 * f.inv_diag)
        out[p.name] = _from_out_in(p, rho.reshape(w.shape))
    return out


@register("kfac", family="second-order (OBS, K-FAC)", needs_data="labels", options=KFACOptions, sources=("003",),
          dict_batches=True,
          summary="OBS statistic and summed OBS update with a per-layer Kronecker-factored Fisher Γ ⊗ A")
class KFAC(PruningMethod):
    """``kfac`` as a method object: the score's factors stay on it for the update of the same round."""

    def __init__(self):
        self.factors: dict[str, KFACFactors] = {}

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        self.factors = kfac_factors(ctx)
        return kfac_scores(ctx, self.factors)

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        kfac_update(ctx, before, after, self.factors)
