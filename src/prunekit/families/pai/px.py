"""``px`` (Path eXclusion, pai.md 6.12, seed 004): data-dependent path scores on three copies of the current
masked model (gates A, path activation J, path kernel P), R = Σ_b Σ_i z1(x_i)·z2_i, S = θ²·abs(∂R/∂u) with u = θ²
the variable of P (the output layer's variable is its weight). The copies and the activation interception come
from :mod:`.path_copies`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ... import distributed
from ...errors import PrunekitError
from ...params import is_prunable_type
from ...registry import ScoreContext, register
from .path_copies import (DTYPES, Activations, alive_mask, batch_inputs, check_path_model, check_relu_modules,
                          copy_tensor, net_device, scoring_copy)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _norm_train(net: nn.Module) -> None:
    """Normalization layers use batch statistics; everything else (dropout) stays in eval mode."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train()


def _single_value_error(method: str, e: Exception) -> PrunekitError | None:
    if "Expected more than 1 value per channel" in str(e):
        return PrunekitError(
            f"{method} runs normalization layers with batch statistics and a batch gave a single value per channel: "
            "use scoring batches of at least 2 samples"
        )
    return None

@dataclass(frozen=True)
class PXOptions:
    """``px_variant``: ``head`` (iurada/px-ntk-pruning ed6c40e, the paper's formula, default) or ``release``
    (the first public code, 82ce2bf). ``dtype``: scoring precision (float32 as the reference). ``batch_size``: the
    scoring batch size B. PX scores the batches exactly as given, since its copies use batch statistics; experiments
    feed it batches of this size. With ``pk.prune``, pass ``data`` already batched as you want it."""

    px_variant: Literal["head", "release"] = "head"
    dtype: Literal["float32", "float64"] = "float32"
    batch_size: int = 128

    def validate(self, path, error) -> None:
        if self.batch_size < 1:
            raise error(f"batch_size must be >= 1, got {self.batch_size}")


def _path_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if is_prunable_type(m)]


class _Masks:
    """Float masks of the copies' tensors by (module name, attribute); all ones for tensors that are not prunable."""

    def __init__(self, ctx: ScoreContext, dtype: torch.dtype):
        self.by_key = {(p.module_name, p.attr): alive_mask(ctx, p) for p in ctx.params}
        self.dtype = dtype

    def get(self, module_name: str, attr: str, like: torch.Tensor) -> torch.Tensor:
        m = self.by_key.get((module_name, attr))
        if m is None:
            return torch.ones_like(like)
        return m.to(like.device, like.dtype)

    def prunable(self, module_name: str, attr: str) -> bool:
        return (module_name, attr) in self.by_key


def _path_copy(model: nn.Module, dtype) -> tuple[nn.Module, set[str]]:
    """A scoring copy whose normalization layers use batch statistics, and the names of its Conv/Linear modules."""
    net = scoring_copy(model, dtype)
    _norm_train(net)
    return net, {n for n, _ in _path_layers(net)}


def _mask_off_path(net: nn.Module, masks: _Masks, path: set[str]) -> None:
    """Multiply the prunable tensors of modules outside ``path`` by their masks (in place, under no_grad)."""
    for (mn, attr) in masks.by_key:
        if mn not in path:
            t = getattr(net.get_submodule(mn) if mn else net, attr)
            t.mul_(masks.get(mn, attr, t))


def _build_j(model: nn.Module, dtype, masks: _Masks, out_name: str, variant: str) -> nn.Module:
    """Path-activation copy J: weights = mask (head: except the output layer), biases 1 (head) or raw (release)."""
    net, path = _path_copy(model, dtype)
    with torch.no_grad():
        for n, m in _path_layers(net):
            w, b = m.weight, getattr(m, "bias", None)
            if variant == "head" and n == out_name:
                w.mul_(masks.get(n, "weight", w))
                if isinstance(b, torch.Tensor):
                    b.mul_(masks.get(n, "bias", b))
                continue
            w.copy_(masks.get(n, "weight", w))
            if isinstance(b, torch.Tensor):
                if variant == "head":
                    b.copy_(masks.get(n, "bias", b))
                else:
                    b.mul_(masks.get(n, "bias", b))
        _mask_off_path(net, masks, path)
    return net


def _build_p(model: nn.Module, dtype, masks: _Masks, out_name: str, variant: str) -> nn.Module:
    """Path-kernel copy P: weights u = m⊙θ², biases squared (head: except the output layer, kept masked raw)."""
    net, path = _path_copy(model, dtype)
    with torch.no_grad():
        for n, m in _path_layers(net):
            square = not (variant == "head" and n == out_name)
            for attr in ("weight", "bias"):
                t = getattr(m, attr, None)
                if not isinstance(t, torch.Tensor):
                    continue
                t.mul_(masks.get(n, attr, t))
                if square:
                    t.mul_(t)
        _mask_off_path(net, masks, path)
        if variant == "release":  # every other non-normalization tensor is squared too
            for mn, mod in net.named_modules():
                if mn in path or isinstance(mod, _NORM_TYPES):
                    continue
                for attr, t in mod.named_parameters(recurse=False):
                    if (mn, attr) not in masks.by_key:
                        t.mul_(t)
    return net


def _forward(net: nn.Module, x: torch.Tensor, mode: Activations, method: str = "px") -> torch.Tensor:
    try:
        with mode:
            out = net(x)
    except ValueError as e:
        err = _single_value_error(method, e)
        if err is not None:
            raise err from e
        raise
    if not isinstance(out, torch.Tensor):
        raise PrunekitError(f"{method} needs a model that returns a tensor, got {type(out).__name__}")
    if mode.other_softmax(out):
        raise PrunekitError(
            f"{method} supports ReLU networks only: the forward applies a softmax that does not produce the output"
        )
    return mode.logits(out)



def _gate_copy(model: nn.Module, dtype: torch.dtype, variant: str) -> nn.Module:
    """Gate copy A: eval mode (``release``: normalization layers use batch statistics)."""
    net = scoring_copy(model, dtype)
    if variant == "head":
        net.eval()
    else:
        _norm_train(net)
    return net


def _record_gates(gate_net: nn.Module, x: torch.Tensor, find_output: bool) -> tuple[list[torch.Tensor], str | None]:
    """A's forward of ``x``: the gate 1[a > 0] of every ReLU call, in execution order, and with ``find_output`` the
    output layer's name (the last Conv/Linear module called), else None."""
    gates: list[torch.Tensor] = []
    calls: list[str] = []
    handles = []
    if find_output:
        for n, m in _path_layers(gate_net):
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n)))
    try:
        with torch.no_grad():
            _forward(gate_net, x, Activations("record", gates, strict=True, method="px"), "px")
    finally:
        for h in handles:
            h.remove()
    if not find_output:
        return gates, None
    if not calls:
        raise PrunekitError("px found no Conv/Linear layer called in the model's forward pass")
    return gates, calls[-1]


class _PathNets:
    """The path-activation copy J and the path-kernel copy P of one scoring call, and P's variables u (one leaf per
    prunable tensor, in the order of ``ctx.params``)."""

    def __init__(self, ctx: ScoreContext, dtype: torch.dtype, masks: _Masks, out_name: str, variant: str):
        self.variant = variant
        self.j_net = _build_j(ctx.model, dtype, masks, out_name, variant)
        self.p_net = _build_p(ctx.model, dtype, masks, out_name, variant)
        self.leaves = [copy_tensor(self.p_net, p) for p in ctx.params]
        for t in self.leaves:
            t.requires_grad_(True)

    def gradients(self, x: torch.Tensor, gates: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """∂R_b/∂u of the batch ``x`` (None for a variable R_b does not reach), J's ReLUs gated by A's ``gates``."""
        head = self.variant == "head"
        j_mode = Activations("gate", gates, strict=True, method="px")
        with torch.no_grad():
            z1 = _forward(self.j_net, x * x if head else x, j_mode, "px")
        if j_mode.pos != len(gates):
            raise PrunekitError(
                f"px: the gate copy recorded {len(gates)} ReLU calls but the path-activation copy made {j_mode.pos}; "
                "the model's forward must apply the same ReLUs on every call"
            )
        with torch.enable_grad():
            z2 = _forward(self.p_net, torch.ones_like(x) if head else x,
                          Activations("identity", strict=True, method="px"), "px")
            if z1.shape != z2.shape:
                raise PrunekitError(f"px: path-activation output {tuple(z1.shape)} and path-kernel output "
                                    f"{tuple(z2.shape)} differ")
            r = (z1.detach() * z2).sum()
            return torch.autograd.grad(r, self.leaves, allow_unused=True)


def _summed_gradients(ctx: ScoreContext, dtype: torch.dtype, variant: str) -> list[torch.Tensor | None]:
    """Σ_b ∂R_b/∂u over the scoring batches per prunable tensor (None where no R_b reaches it), summed over the DDP
    ranks. J and P are built on the first batch, once A's forward has shown the output layer."""
    model = ctx.model
    masks = _Masks(ctx, dtype)
    device = net_device(model)
    gate_net = _gate_copy(model, dtype, variant)
    nets: _PathNets | None = None
    acc: list[torch.Tensor | None] = []
    n_batches = 0
    for index, batch in enumerate(ctx.data):
        # DDP: each rank accumulates every world-size-th batch (summed over the ranks below); every rank builds the
        # path networks from the first batch
        n_batches += 1
        ours = distributed.owns(index)
        if not ours and nets is not None:
            continue
        x = batch_inputs(batch, "px").to(device, dtype)
        gates, out_name = _record_gates(gate_net, x, find_output=nets is None)
        if nets is None:
            nets = _PathNets(ctx, dtype, masks, out_name, variant)
            acc = [None] * len(nets.leaves)
        if not ours:
            continue
        for i, g in enumerate(nets.gradients(x, gates)):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g
    acc = distributed.all_sum_optional(acc)
    if n_batches == 0:
        raise PrunekitError("px got no scoring batches: pass data= a re-iterable (a list or a DataLoader) with at "
                            "least one batch")
    return acc


def _path_scores(ctx: ScoreContext, grads: list[torch.Tensor | None], dtype: torch.dtype,
                 variant: str) -> dict[str, torch.Tensor]:
    """S = θ²·abs(Σ_b ∂R_b/∂u) per prunable tensor (``release``: θ⁴ on Conv/Linear tensors), θ masked; 0 where
    pruned or unreached; float64 on the tensor's device."""
    path = {n for n, _ in _path_layers(ctx.model)}
    scores: dict[str, torch.Tensor] = {}
    for p, g in zip(ctx.params, grads):
        m = alive_mask(ctx, p)
        theta = p.tensor.detach().to(dtype) * m.to(dtype)
        sq = theta * theta
        if variant == "release" and p.module_name in path:
            sq = sq * sq
        s = torch.zeros_like(theta) if g is None else sq * g.to(theta.device).abs()
        s = torch.where(m, s, torch.zeros_like(s))
        scores[p.name] = s.to(p.tensor.device, torch.float64)
    return scores


@register("px", family="pruning at init (path exclusion, iterative)", needs_data="inputs", default_rounds=100,
          sources=("004",), options=PXOptions, default_samples={"per_class": 10, "pick": "random"}, rebatches=False,
          summary="Path eXclusion: θ²·abs(∂R/∂θ²), R = path kernel × data-dependent path activations")
def px(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """PX score (pai.md 6.12). Per round, three copies of the current masked model in ``dtype``:

    - A (gates): eval mode, input x; the gate 1[a > 0] of every ReLU call is recorded in execution order.
    - J (path activation, no grad): ``head``: every Conv/Linear weight but the output layer's is set to its mask
      and its bias to 1 (a prunable bias to its mask); the output layer keeps its masked weight and bias; input x⊙x.
      ``release``: every weight (output layer included) set to its mask, biases raw; input x.
    - P (path kernel): ``head``: every Conv/Linear weight but the output layer's becomes u = m⊙θ² (the variable),
      its bias b²; the output layer keeps its masked weight (the variable) and bias; input ones with the batch's
      shape. ``release``: every non-normalization tensor squared, output layer included; input x.
    - J and P run ReLUs as multiplication by A's gate (J) or as the identity (P); normalization layers are left
      unchanged and use batch statistics (train mode); dropout is off in every copy. In ``release`` A also uses
      batch statistics (the first public code ran all copies in train mode).
    - R = Σ_b Σ_{i∈b} Σ_k z1(x_i)_k·z2_{i,k}; ``head``: S = θ²·abs(∂R/∂u) (output layer: θ²·abs(∂R/∂θ));
      ``release``: S = θ⁴·abs(∂R/∂u) on every Conv/Linear tensor. Pruned entries score 0.

    The output layer is the last Conv/Linear module called in the forward pass (found with forward hooks on the
    first batch), also when it is excluded from pruning. Activations: ReLU and the other piecewise-linear ones
    with exact gates (ReLU6 and Hardtanh: gate 1 strictly inside the linear range, 0 where saturated; LeakyReLU:
    gate 1 or its negative slope; see :mod:`.path_copies`); any other activation module or functional activation
    (GELU, SiLU, Hardswish ...) raises; transformers (token embeddings, LayerNorm, softmax attention) are refused
    naming the modules found; a final softmax/log_softmax that produces the output is skipped (z is taken on
    the logits), any other softmax raises. The scoring batches should be the same, in the same order, every round
    (J's batch statistics depend on batch composition).
    """
    opts = ctx.options
    dtype = DTYPES[opts.dtype]
    variant = opts.px_variant
    check_path_model(ctx.model, "px")
    check_relu_modules(ctx.model, "px")
    if ctx.data is None:
        raise PrunekitError("px needs data: pass data= an iterable of (inputs, targets) batches (labels are unused)")
    return _path_scores(ctx, _summed_gradients(ctx, dtype, variant), dtype, variant)
