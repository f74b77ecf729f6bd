"""Path-based pruning at initialization: ``synflow`` (data-free) and ``px`` (Path eXclusion, seed 004).

Both transform a *copy* of the current masked model and never touch the live one: its weights, buffers, ``.grad``
and training mode are identical before and after scoring (pai.md section 4.3).

- ``synflow`` (pai.md 6.11): on the network with every floating parameter and buffer replaced by its absolute
  value, feed an all-ones input, R = sum of the outputs, S = abs(θ ⊙ ∂R/∂θ). float64 by default.
- ``px`` (pai.md 6.12): three copies (gates A, path activation J, path kernel P), R = Σ_b Σ_i z1(x_i)·z2_i,
  S = θ²·abs(∂R/∂u) with u = θ² the variable of P (the output layer's variable is its weight).

Nonlinearities are found with a :class:`torch.overrides.TorchFunctionMode` that sees every ``torch`` call during a
forward pass, so ReLUs applied as modules (``nn.ReLU``, in place or not) and functionally (``F.relu``, ``torch.relu``,
``Tensor.relu``, their in-place forms) are all handled, in execution order.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ... import distributed
from ...errors import PrunekitError
from ...params import PRUNABLE_TYPES, PrunableParam
from ...registry import ScoreContext, register

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# --------------------------------------------------------------------------------------------- nonlinearities
_RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax}


def _other_activations() -> set:
    names_f = ["gelu", "silu", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_",
               "rrelu", "rrelu_", "hardtanh", "hardtanh_", "relu6", "hardswish", "hardsigmoid", "mish", "softplus",
               "softsign", "tanh", "sigmoid", "logsigmoid", "glu", "prelu", "threshold", "threshold_",
               "tanhshrink", "softshrink", "hardshrink", "softmin"]
    names_t = ["tanh", "tanh_", "sigmoid", "sigmoid_", "selu", "selu_", "celu", "celu_", "prelu", "rrelu",
               "rrelu_", "threshold", "threshold_", "hardshrink"]
    out = {getattr(F, n) for n in names_f if hasattr(F, n)}
    out |= {getattr(torch, n) for n in names_t if hasattr(torch, n)}
    out |= {getattr(torch.Tensor, n) for n in names_t if hasattr(torch.Tensor, n)}
    return out


_OTHER_ACT = _other_activations()
#: Output modules handled by the final-(log_)softmax rule instead of the ReLU-only check.
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _fname(func) -> str:
    name = getattr(func, "__name__", repr(func))
    for prefix, ns in (("torch.nn.functional", F), ("torch", torch), ("torch.Tensor", torch.Tensor)):
        if getattr(ns, name, None) is func:
            return f"{prefix}.{name}"
    return name


class _Activations(TorchFunctionMode):
    """Intercepts ReLU and (log_)softmax calls during one forward pass.

    ``role``: ``pass`` (ReLUs run unchanged), ``record`` (also store the gate 1[input > 0] of every ReLU, in
    execution order), ``gate`` (replace the n-th ReLU by multiplication with the n-th stored gate) or ``identity``
    (ReLUs do nothing). With ``strict``, any other activation function raises. Every (log_)softmax call is recorded
    so that :meth:`logits` can undo a final one.
    """

    def __init__(self, role: str = "pass", gates: list | None = None, strict: bool = False, method: str = "px"):
        super().__init__()
        self.role = role
        self.gates = gates if gates is not None else []
        self.pos = 0
        self.strict = strict
        self.method = method
        self.softmax: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU and self.role != "pass":
            inp = args[0] if args else kwargs["input"]
            inplace = func in _RELU_INPLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            if self.role == "record":
                self.gates.append(inp.detach() > 0)
                return func(*args, **kwargs)
            if self.role == "identity":
                return inp
            # gate
            if self.pos >= len(self.gates):
                raise PrunekitError(
                    f"{self.method}: the gate copy recorded {len(self.gates)} ReLU calls but the path-activation "
                    "copy makes more; the model's forward must apply the same ReLUs on every call"
                )
            gate = self.gates[self.pos]
            self.pos += 1
            if tuple(gate.shape) != tuple(inp.shape):
                raise PrunekitError(
                    f"{self.method}: ReLU call {self.pos} sees shape {tuple(inp.shape)} in the path-activation copy "
                    f"but {tuple(gate.shape)} in the gate copy; the model's forward must apply the same ReLUs"
                )
            g = gate.to(inp.dtype)
            return inp.mul_(g) if inplace else inp * g
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            self.softmax.append((out, args[0] if args else kwargs["input"]))
            return out
        if self.strict and func in _OTHER_ACT:
            raise PrunekitError(
                f"{self.method} supports ReLU networks only: the forward calls {_fname(func)}{_RELU_ONLY_FIX}"
            )
        return func(*args, **kwargs)

    def logits(self, out):
        """``out``, or the input of the (log_)softmax that produced it: the final normalization is skipped."""
        for o, inp in self.softmax:
            if o is out:
                return inp
        return out

    def other_softmax(self, out) -> bool:
        return any(o is not out for o, _ in self.softmax)


#: Why PX refuses other activations, and what to do instead (appended to its refusals).
_RELU_ONLY_FIX = (" (PX's path decomposition gates every unit by 1[a > 0], which needs ReLU activations; GELU, "
                  "SiLU, tanh, ... have no such gates); use a ReLU model, or an unstructured data method that "
                  "accepts any activation (snip, grasp, fts, woodfisherblock, ...)")


def _check_relu_modules(model: nn.Module, method: str) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU) or isinstance(m, _SOFTMAX_MODULES):
            continue
        if type(m).__module__ == "torch.nn.modules.activation":
            raise PrunekitError(
                f"{method} supports ReLU networks only: module {name!r} is {type(m).__name__}{_RELU_ONLY_FIX}"
            )


# -------------------------------------------------------------------------------------------------- helpers
def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy in ``dtype`` with no gradients and no parameter requiring one."""
    net = copy.deepcopy(model)
    net.to(dtype)
    for p in net.parameters():
        p.grad = None
        p.requires_grad_(False)
    return net


def _tensor(net: nn.Module, p: PrunableParam) -> torch.Tensor:
    module = net.get_submodule(p.module_name) if p.module_name else net
    return getattr(module, p.attr)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _inputs(batch: Any, method: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise PrunekitError(
        f"{method}: each data batch must be an (inputs, targets) pair or an inputs tensor, got {type(batch).__name__}"
    )


def _mask(ctx: ScoreContext, p: PrunableParam) -> torch.Tensor:
    m = ctx.masks.get(p.name)
    if m is None:
        return torch.ones_like(p.tensor, dtype=torch.bool)
    return m.to(p.tensor.device, torch.bool)


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


# ----------------------------------------------------------------------------------------------- synflow
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
            return tuple(_inputs(batch, method).shape[1:])
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
    """
    dtype = _DTYPES[ctx.options.dtype]
    shape = _input_shape(ctx, "synflow")
    masks = [_mask(ctx, p) for p in ctx.params]
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
    net = _copy(ctx.model, dtype)
    net.eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    leaves = []
    for p, m in zip(ctx.params, masks):
        t = _tensor(net, p)
        with torch.no_grad():
            if ones:
                t.fill_(1.0)
            t.mul_(m.to(t.device, dtype))
        t.requires_grad_(True)
        leaves.append(t)
    x = torch.ones((1, *shape), dtype=dtype, device=_device(net))
    mode = _Activations("pass", strict=False, method="synflow")
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


# ---------------------------------------------------------------------------------------------------- px
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
    return [(n, m) for n, m in net.named_modules() if isinstance(m, PRUNABLE_TYPES)]


class _Masks:
    """Float masks of the copies' tensors by (module name, attribute); all ones for tensors that are not prunable."""

    def __init__(self, ctx: ScoreContext, dtype: torch.dtype):
        self.by_key = {(p.module_name, p.attr): _mask(ctx, p) for p in ctx.params}
        self.dtype = dtype

    def get(self, module_name: str, attr: str, like: torch.Tensor) -> torch.Tensor:
        m = self.by_key.get((module_name, attr))
        if m is None:
            return torch.ones_like(like)
        return m.to(like.device, like.dtype)

    def prunable(self, module_name: str, attr: str) -> bool:
        return (module_name, attr) in self.by_key


def _build_j(model: nn.Module, dtype, masks: _Masks, out_name: str, variant: str) -> nn.Module:
    """Path-activation copy J: weights = mask (head: except the output layer), biases 1 (head) or raw (release)."""
    net = _copy(model, dtype)
    _norm_train(net)
    path = {n for n, _ in _path_layers(net)}
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
        for (mn, attr) in masks.by_key:
            if mn not in path:
                t = getattr(net.get_submodule(mn) if mn else net, attr)
                t.mul_(masks.get(mn, attr, t))
    return net


def _build_p(model: nn.Module, dtype, masks: _Masks, out_name: str, variant: str) -> nn.Module:
    """Path-kernel copy P: weights u = m⊙θ², biases squared (head: except the output layer, kept masked raw)."""
    net = _copy(model, dtype)
    _norm_train(net)
    path = {n for n, _ in _path_layers(net)}
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
        for (mn, attr) in masks.by_key:
            if mn not in path:
                t = getattr(net.get_submodule(mn) if mn else net, attr)
                t.mul_(masks.get(mn, attr, t))
        if variant == "release":  # every other non-normalization tensor is squared too
            for mn, mod in net.named_modules():
                if mn in path or isinstance(mod, _NORM_TYPES):
                    continue
                for attr, t in mod.named_parameters(recurse=False):
                    if (mn, attr) not in masks.by_key:
                        t.mul_(t)
    return net


def _forward(net: nn.Module, x: torch.Tensor, mode: _Activations, method: str = "px") -> torch.Tensor:
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
    first batch), also when it is excluded from pruning. Only ReLU is supported: any other activation module or
    functional activation raises; a final softmax/log_softmax that produces the output is skipped (z is taken on
    the logits), any other softmax raises. The scoring batches should be the same, in the same order, every round
    (J's batch statistics depend on batch composition).
    """
    method = "px"
    opts = ctx.options
    dtype = _DTYPES[opts.dtype]
    variant = opts.px_variant
    model = ctx.model
    _check_relu_modules(model, method)
    if ctx.data is None:
        raise PrunekitError("px needs data: pass data= an iterable of (inputs, targets) batches (labels are unused)")
    masks = _Masks(ctx, dtype)
    device = _device(model)

    gate_net = _copy(model, dtype)
    if variant == "head":
        gate_net.eval()
    else:
        _norm_train(gate_net)
    j_net = p_net = None
    out_name = None
    leaves: list[torch.Tensor] = []
    acc: list[torch.Tensor | None] = []
    n_batches = 0
    for index, batch in enumerate(ctx.data):
        # DDP: each rank accumulates every world-size-th batch (summed over the ranks below); every rank builds the
        # path networks from the first batch
        n_batches += 1
        ours = distributed.owns(index)
        if not ours and out_name is not None:
            continue
        x = _inputs(batch, method).to(device, dtype)
        gates: list[torch.Tensor] = []
        calls: list[str] = []
        handles = []
        if out_name is None:
            for n, m in _path_layers(gate_net):
                handles.append(m.register_forward_hook(lambda mod, i, o, n=n: calls.append(n)))
        try:
            with torch.no_grad():
                _forward(gate_net, x, _Activations("record", gates, strict=True, method=method), method)
        finally:
            for h in handles:
                h.remove()
        if out_name is None:
            if not calls:
                raise PrunekitError("px found no Conv/Linear layer called in the model's forward pass")
            out_name = calls[-1]
            j_net = _build_j(model, dtype, masks, out_name, variant)
            p_net = _build_p(model, dtype, masks, out_name, variant)
            leaves = [_tensor(p_net, p) for p in ctx.params]
            for t in leaves:
                t.requires_grad_(True)
            acc = [None] * len(leaves)
        if not ours:
            continue
        j_mode = _Activations("gate", gates, strict=True, method=method)
        with torch.no_grad():
            z1 = _forward(j_net, x * x if variant == "head" else x, j_mode, method)
        if j_mode.pos != len(gates):
            raise PrunekitError(
                f"px: the gate copy recorded {len(gates)} ReLU calls but the path-activation copy made {j_mode.pos}; "
                "the model's forward must apply the same ReLUs on every call"
            )
        with torch.enable_grad():
            z2 = _forward(p_net, torch.ones_like(x) if variant == "head" else x,
                          _Activations("identity", strict=True, method=method), method)
            if z1.shape != z2.shape:
                raise PrunekitError(f"px: path-activation output {tuple(z1.shape)} and path-kernel output "
                                    f"{tuple(z2.shape)} differ")
            r = (z1.detach() * z2).sum()
            grads = torch.autograd.grad(r, leaves, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g
    acc = distributed.all_sum_optional(acc)
    if n_batches == 0:
        raise PrunekitError("px got no scoring batches: pass data= a re-iterable (a list or a DataLoader) with at "
                            "least one batch")

    path = {n for n, _ in _path_layers(model)}
    scores: dict[str, torch.Tensor] = {}
    for p, g in zip(ctx.params, acc):
        m = _mask(ctx, p)
        theta = p.tensor.detach().to(dtype) * m.to(dtype)
        sq = theta * theta
        if variant == "release" and p.module_name in path:
            sq = sq * sq
        s = torch.zeros_like(theta) if g is None else sq * g.to(theta.device).abs()
        s = torch.where(m, s, torch.zeros_like(s))
        scores[p.name] = s.to(p.tensor.device, torch.float64)
    return scores
