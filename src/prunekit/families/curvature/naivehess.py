"""``naivehess`` (seed 003, second_order.md §7): OBD saliency ½·w²·H_ii with the exact Hessian diagonal
(double backprop, batched one-hot tangents) or a Hutchinson estimate; no update. Scoring is pure (eval mode under
:func:`prunekit.modes.scoring_mode`)."""
from __future__ import annotations


import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ... import distributed
from ...batches import call
from ...gradstats.attention import twice_differentiable
from ...modes import model_device, scoring_mode
from ...registry import ScoreContext, register


from .common import (
    MAX_BYTES,
    alive_mask,
    check_positive,
    first_examples,
    float_dtype,
    unique_tensors,
)

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
        check_positive(error, hess_samples=self.hess_samples, hess_batch=self.hess_batch,
                        hutchinson_probes=self.hutchinson_probes)
        if self.max_exact_hvp < 0:
            raise error(f"max_exact_hvp must be >= 0, got {self.max_exact_hvp}")
        if self.hvp_chunk is not None:
            check_positive(error, hvp_chunk=self.hvp_chunk)


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
    uniq = unique_tensors(ctx.params)
    tensors = [t for t, _ in uniq]
    alive = [alive_mask(ctx, g).reshape(-1) for _, g in uniq]
    idx = [torch.nonzero(a, as_tuple=True)[0] for a in alive]
    n_active = sum(int(i.numel()) for i in idx)
    exact = o.hessian_diag == "exact"
    if exact and n_active > o.max_exact_hvp:
        warnings.warn(f"naivehess: the exact Hessian diagonal needs {n_active} Hessian-vector products (one per "
                      f"active weight, max_exact_hvp={o.max_exact_hvp}), each 2-3x a forward+backward over "
                      f"{o.hess_samples} examples; consider hessian_diag='hutchinson'", UserWarning, stacklevel=3)
    dev = model_device(model)
    diag = [torch.zeros(t.numel(), dtype=torch.float64, device=t.device) for t in tensors]
    chunks = list(first_examples(ctx.data, o.hess_samples, "naivehess", "hess_samples", o.hess_batch, dev,
                                  float_dtype(model)))
    n_total = sum(int(x.shape[0]) for x, _ in chunks)
    K_probes = o.hutchinson_probes
    probe_seeds: list[int] = []
    if not exact:  # one seed per probe chunk: the same probes are redrawn for every data chunk
        per = o.hvp_chunk or 32
        n_pc = -(-K_probes // per)
        probe_seeds = [int(s) for s in torch.randint(0, 2**62, (n_pc,), generator=ctx.generator)]
    with scoring_mode(model, "eval", tensors), twice_differentiable(model):
        for x, y in distributed.mine(chunks):  # DDP: this rank's chunks; the diagonals are summed below
            counter = [0]
            handles = _leaf_numel_hooks(model, counter)
            try:
                out = call(model, x)
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
          options=NaiveHessOptions, sources=("003",), dict_batches=True,
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
