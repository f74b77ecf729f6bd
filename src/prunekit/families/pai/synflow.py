"""``synflow`` (pai.md 6.11, seed 004): data-free path scores on a copy of the current masked model.

On the network with every floating parameter and buffer replaced by its absolute value, feed an all-ones input,
R = sum of the outputs, S = abs(θ ⊙ ∂R/∂θ). float64 by default. The copy and the activation interception come
from :mod:`.path_copies`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import PrunekitError
from ...registry import ScoreContext, register
from .path_copies import (DTYPES, Activations, alive_mask, batch_inputs, check_path_model, copy_tensor, net_device,
                          scoring_copy)


@dataclass(frozen=True)
class SynflowOptions:
    """``dtype``: scoring precision. float64 (default) keeps products of abs(θ) over depth finite; float32
    reproduces the reference code, which overflows to inf or underflows to 0 in deep or wide nets."""

    dtype: Literal["float64", "float32"] = "float64"


def _input_shape(ctx: ScoreContext, method: str) -> tuple[int, ...]:
    shape = getattr(ctx.model, "input_shape", None)
    if shape is not None:
        try:
            return tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise PrunekitError(
                f"{method}: model.input_shape must be a tuple of ints (one sample, no batch dimension), got {shape!r}"
            ) from None
    if ctx.data is not None:
        for batch in ctx.data:
            return tuple(batch_inputs(batch, method).shape[1:])
    raise PrunekitError(
        f"{method} needs the input shape: set model.input_shape = (C, H, W) (one sample, no batch dimension) "
        "or pass data= with at least one batch"
    )


@register("synflow", family="pruning at init (data-free, iterative)", needs_data="none", default_rounds=100,
          sources=("004",), options=SynflowOptions,
          summary="Iterative Synaptic Flow: abs(θ·∂R/∂θ) on the abs-valued network with an all-ones input")
def synflow(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """SynFlow score S = abs(θ' ⊙ ∂R/∂θ'), θ' = abs(θ) masked, R = sum of f(1) on the abs-valued network.

    On a deep copy in ``dtype``, eval mode: every floating parameter and buffer (weights, biases, normalization
    γ, β and running statistics) is replaced by its absolute value, the current mask is applied, the input is
    ones of shape [1, *input_shape] (``model.input_shape``, else the first batch of ``data``).

    Final softmax: when the model's output is produced directly by a ``softmax``/``log_softmax`` (functional or
    ``nn.Softmax``/``nn.LogSoftmax``; e.g. ``mlpnet``), R is computed on that call's input, the logits. SynFlow's R is
    defined for the positively homogeneous network (sums of path products); a final log_softmax would make
    ∂R/∂logit = 1 − C·softmax, signed and not conserved. Stripping it gives the same scores as the model without
    the normalization. A softmax anywhere else is left in place.

    Checks: in float64 an inf or NaN score among alive entries raises (float32 warns). When more than 1 % of the
    alive entries score exactly 0, a second pass with every alive prunable weight set to 1 tells underflow from
    disconnection: alive weights cut off from the input or output (common after many rounds) score 0 by definition
    and are not counted; if more than 1 % of the alive entries are connected yet score 0, it warns (underflow).
    Pruned entries score exactly 0.

    Activations: ReLU and LeakyReLU run as they are; ReLU6 and Hardtanh run without their upper bound (the
    abs-valued network's positive activations would saturate at 6 and cut every path through the unit), so R is the
    path sum of the network with those units unsaturated. Other activations (GELU, SiLU, tanh, Hardswish) run as
    they are: R is then no longer a sum over paths and the scores have no conservation property (no error: the
    reference code behaves the same). Transformers (token embeddings, LayerNorm, softmax attention) are refused,
    naming the modules found (:func:`.path_copies.check_path_model`).
    """
    check_path_model(ctx.model, "synflow")
    dtype = DTYPES[ctx.options.dtype]
    shape = _input_shape(ctx, "synflow")
    masks = [alive_mask(ctx, p) for p in ctx.params]
    raw = _synflow_scores(ctx, shape, dtype, masks, ones=False)

    scores: dict[str, torch.Tensor] = {}
    n_alive = n_zero = 0
    bad: list[str] = []
    for p, s, m in zip(ctx.params, raw, masks):
        s = s.to(p.tensor.device, torch.float64)
        vals = s[m]
        nonfinite = int((~torch.isfinite(vals)).sum())
        if nonfinite:
            bad.append(f"{p.name} ({nonfinite} of {vals.numel()})")
        n_alive += vals.numel()
        n_zero += int((vals == 0).sum())
        scores[p.name] = s
    if bad:
        if dtype == torch.float64:
            raise PrunekitError(
                f"synflow scores overflow in float64: non-finite values in {', '.join(bad)}; the product of "
                "abs(weights) over depth exceeds the float64 range (rescale the weights or check the model)"
            )
        warnings.warn(f"synflow scores in float32 are not finite in {', '.join(bad)}; use dtype='float64'",
                      stacklevel=2)
    if n_alive and n_zero > 0.01 * n_alive:
        # Alive weights cut off from the input or the output score exactly 0 by definition (common after many
        # rounds); only zeros of weights that are connected count as underflow. Connectivity: the same pass with
        # every alive prunable weight set to 1.
        conn = _synflow_scores(ctx, shape, dtype, masks, ones=True)
        under = sum(int(((s == 0) & (c.to(s.device) != 0))[m].sum()) for s, c, m in zip(scores.values(), conn, masks))
        if under > 0.01 * n_alive:
            warnings.warn(
                f"synflow: {under} of {n_alive} alive, connected entries score exactly 0 (underflow in "
                f"{ctx.options.dtype})" + ("; use dtype='float64'" if dtype != torch.float64 else ""),
                stacklevel=2,
            )
    return scores


def _synflow_scores(ctx: ScoreContext, shape, dtype, masks, ones: bool) -> list[torch.Tensor]:
    """abs(θ'·∂R/∂θ') on a copy with abs-valued tensors (``ones``: alive prunable weights set to 1); 0 where pruned."""
    net = scoring_copy(ctx.model, dtype)
    net.eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    leaves = []
    for p, m in zip(ctx.params, masks):
        t = copy_tensor(net, p)
        with torch.no_grad():
            if ones:
                t.fill_(1.0)
            t.mul_(m.to(t.device, dtype))
        t.requires_grad_(True)
        leaves.append(t)
    x = torch.ones((1, *shape), dtype=dtype, device=net_device(net))
    mode = Activations("unsaturated", strict=False, method="synflow")
    with torch.enable_grad():
        with mode:
            out = net(x)
        out = mode.logits(out)
        outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            raise PrunekitError(f"synflow needs a model that returns a tensor, got {type(out).__name__}")
        r = sum(o.sum() for o in outs)
        grads = torch.autograd.grad(r, leaves, allow_unused=True)
    res = []
    for t, g, m in zip(leaves, grads, masks):
        s = torch.zeros_like(t) if g is None else (t.detach() * g).abs()
        res.append(torch.where(m.to(s.device), s, torch.zeros_like(s)))
    return res
