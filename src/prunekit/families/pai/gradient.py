"""First-order and Hessian-gradient criteria for pruning at initialization: ``grad_norm``, ``snip``, ``grasp``.

ḡ is the mean over scoring mini-batches of the gradient of each mini-batch's MEAN loss (METHODS.md, pai.md §1),
computed by :func:`prunekit.gradstats.grad_stats` in one pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from ... import distributed
from ...batches import DictInputs, call, rebatch
from ...errors import PrunekitError
from ...gradstats.attention import twice_differentiable
from ...gradstats.frontend import grad_stats
from ...modes import model_device, scoring_mode
from ...registry import ScoreContext, register


@dataclass(frozen=True)
class GradOptions:
    """``batch_size``: B, samples per scoring mini-batch (1 = per-sample gradients); ``score_bn``: normalization
    layers use running statistics (``eval``, default) or batch statistics (``train``) while scoring."""

    batch_size: int = 1
    score_bn: Literal["eval", "train"] = "eval"

    def validate(self, path, error) -> None:
        if self.batch_size < 1:
            raise error(f"batch_size must be >= 1, got {self.batch_size}")


def mean_gradient(ctx: ScoreContext, need_sq: bool = False):
    o = ctx.options
    return grad_stats(ctx.model, ctx.params, ctx.data, loss=ctx.loss, batch_size=o.batch_size, need_sq=need_sq,
                      mode=o.score_bn)


@register("grad_norm", family="pruning at init (first order)", needs_data="labels", options=GradOptions,
          sources=("000",), dict_batches=True,
          summary="|mean gradient| (GN): abs of ḡ, not a norm")
def grad_norm(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    st = mean_gradient(ctx)
    return {p.name: st.mean[p.name].abs() for p in ctx.params}


@register("snip", family="pruning at init (first order)", needs_data="labels", options=GradOptions,
          sources=("000", "004"), dict_batches=True,
          summary="connection sensitivity |θ·ḡ| (Lee et al. 2019)")
def snip(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = |θ ⊙ ḡ|, SNIP's |∂L/∂c| at c = 1 up to a positive factor (its normalization does not change ranks)."""
    st = mean_gradient(ctx)
    return {p.name: (p.tensor.detach() * st.mean[p.name]).abs() for p in ctx.params}


@dataclass(frozen=True)
class GraspOptions:
    """``grasp_temperature``: T dividing the logits (official GraSP: 200); ``batch_size``: chunk size of the two
    passes (B only rescales the GraSP score, pai.md §6.6); ``score_bn`` as for the other gradient criteria."""

    grasp_temperature: float = 200.0
    batch_size: int = 256
    score_bn: Literal["eval", "train"] = "eval"

    def validate(self, path, error) -> None:
        if self.grasp_temperature <= 0:
            raise error(f"grasp_temperature must be > 0, got {self.grasp_temperature}")
        if self.batch_size < 1:
            raise error(f"batch_size must be >= 1, got {self.batch_size}")


def _logits(model, x, T: float):
    """``model(x) / T`` for tensor inputs; for dict inputs the model's output (tempered inside, see _tempered)."""
    return call(model, x) if isinstance(x, DictInputs) else model(x) / T


def _logits_module(model: torch.nn.Module, x: DictInputs) -> torch.nn.Module:
    """The module whose output IS the model output's ``.logits`` (a transformers head: ``classifier``, ``lm_head``),
    found by one forward of the first example without gradients; a PrunekitError when no module returns it."""
    outputs: dict[int, torch.nn.Module] = {}

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = mod

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            res = call(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    logits = getattr(res, "logits", None)
    mod = outputs.get(id(logits)) if isinstance(logits, torch.Tensor) else None
    if mod is None:
        raise PrunekitError(f"grasp on dict batches divides the logits by grasp_temperature inside the model, but no "
                            f"submodule of {type(model).__name__} returns the output's .logits: wrap the model so "
                            "that it takes one tensor and returns logits, and pass (inputs, targets) batches")
    return mod


@contextmanager
def _tempered(model: torch.nn.Module, batches: list, T: float):
    """Dict batches: the output of the logits module divided by T while scoring, so that the model's own loss
    (``.loss``) is taken on logits / T (exactly what the tensor path does with ``model(x) / T``)."""
    if not batches or not isinstance(batches[0][0], DictInputs):
        yield
        return
    handle = _logits_module(model, batches[0][0]).register_forward_hook(lambda mod, args, out: out / T)
    try:
        yield
    finally:
        handle.remove()


@register("grasp", family="pruning at init (Hessian-gradient)", needs_data="labels", options=GraspOptions,
          sources=("000", "004"), dict_batches=True, summary="GraSP: keep the largest θ·(Hg) (gradient-flow preservation, Wang et al. 2020)")
def grasp(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """S = θ ⊙ (H v) with v = Σ_b ∇L_b^T (temperature-scaled loss), H the Hessian of Σ_b L_b^T restricted to the
    prunable tensors (other parameters held fixed); keep the k largest.

    This equals official GraSP, which scores −θ⊙Hv and removes the largest. Reference defect fixed: seed 000 keeps
    the largest −θ⊙Hv (the sign inverted) and uses T = 1; prunekit uses the official sign and T = 200.

    Dict batches (``model(**batch)``, a transformers model): the temperature divides the output of the module that
    returns ``.logits`` (a forward hook), so the loss (the model's own ``.loss`` under the default) is taken on the
    tempered logits; ``batch_size`` re-batching concatenates dict batches (same sequence length needed).
    """
    o = ctx.options
    T = o.grasp_temperature
    tensors = [p.tensor for p in ctx.params]
    # DDP: each rank takes every world-size-th mini-batch; v and Hv are summed over the ranks
    batches = distributed.mine(list(rebatch(ctx.data, o.batch_size, model_device(ctx.model), who="grasp")))
    with scoring_mode(ctx.model, o.score_bn, tensors), _tempered(ctx.model, batches, T), \
            twice_differentiable(ctx.model):
        v = [torch.zeros_like(t) for t in tensors]
        for x, y in batches:
            loss = ctx.loss(_logits(ctx.model, x, T), y)
            for acc, g in zip(v, torch.autograd.grad(loss, tensors, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
        distributed.all_sum(*v)
        hv = [torch.zeros_like(t) for t in tensors]
        for x, y in batches:
            loss = ctx.loss(_logits(ctx.model, x, T), y)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None)
            if not torch.is_tensor(dot) or not dot.requires_grad:
                continue
            for acc, h in zip(hv, torch.autograd.grad(dot, tensors, allow_unused=True)):
                if h is not None:
                    acc.add_(h)
    distributed.all_sum(*hv)
    return {p.name: (p.tensor.detach() * h) for p, h in zip(ctx.params, hv)}
