"""What ``synflow`` and ``px`` share: the activation interception of their forward passes and the scoring copies.

Both transform a *copy* of the current masked model and never touch the live one: its weights, buffers, ``.grad``
and training mode are identical before and after scoring (pai.md section 4.3).

Nonlinearities are found with a :class:`torch.overrides.TorchFunctionMode` (:class:`Activations`) that sees every
``torch`` call during a forward pass, so ReLUs applied as modules (``nn.ReLU``, in place or not) and functionally
(``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place forms) are all handled, in execution order.

Piecewise-linear activations other than ReLU are supported where the path decomposition holds: each is
x ↦ gate(x)·x plus, for the saturating ones, a constant on the saturated side:

- ``ReLU6`` / ``F.relu6``: gate 1 on (0, 6), 0 elsewhere (relu6(x) = x·1[0<x<6] + 6·1[x≥6]);
- ``Hardtanh(a, b)`` / ``F.hardtanh``: gate 1 on (a, b), 0 elsewhere (the constants a, b on the saturated sides);
- ``LeakyReLU(s)`` / ``F.leaky_relu``: gate 1 for x > 0, s otherwise (exact, no constant).

The saturated constants of ReLU6 / Hardtanh carry no path from the input (their derivative is 0), so PX's gated
copy drops them, as a ReLU's gate drops a negative unit. SynFlow's abs-valued network has positive activations
that would saturate (every path through a saturated unit would score 0): it runs ReLU6 / Hardtanh without their
upper bound (max(x, a)). ``Hardswish`` (x·relu6(x+3)/6), GELU, SiLU, tanh, sigmoid, softplus ... are not piecewise
linear: PX refuses them. Transformers (token embeddings, LayerNorm, softmax attention, GELU) are refused by
:func:`check_path_model` before anything runs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...errors import PrunekitError
from ...params import PrunableParam
from ...registry import ScoreContext

#: Scoring precisions by option value.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# --------------------------------------------------------------------------------------------- nonlinearities
_RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
#: Piecewise-linear activations with exact gates besides ReLU (functional forms; their modules call these).
_PIECEWISE = {F.relu6, F.hardtanh, F.leaky_relu} | ({F.leaky_relu_} if hasattr(F, "leaky_relu_") else set()) | (
    {F.hardtanh_} if hasattr(F, "hardtanh_") else set())
#: Activation modules PX and SynFlow accept.
_PL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax}


def _other_activations() -> set:
    names_f = ["gelu", "silu", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_",
               "rrelu", "rrelu_", "hardtanh", "hardtanh_", "relu6", "hardswish", "hardsigmoid", "mish", "softplus",
               "softsign", "tanh", "sigmoid", "logsigmoid", "glu", "prelu", "threshold", "threshold_",
               "tanhshrink", "softshrink", "hardshrink", "softmin"]
    names_t = ["tanh", "tanh_", "sigmoid", "sigmoid_", "selu", "selu_", "celu", "celu_", "prelu", "rrelu",
               "rrelu_", "threshold", "threshold_", "hardshrink"]
    out = {getattr(F, n) for n in names_f if hasattr(F, n)} - _PIECEWISE
    out |= {getattr(torch, n) for n in names_t if hasattr(torch, n)}
    out |= {getattr(torch.Tensor, n) for n in names_t if hasattr(torch.Tensor, n)}
    return out


_OTHER_ACT = _other_activations()
#: Output modules handled by the final-(log_)softmax rule instead of the ReLU-only check.
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)


def _arg(args, kwargs, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def piecewise_gate(func, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, bool, float | None]:
    """(input, gate, in place, lower bound) of a call of a piecewise-linear activation: the gate is the slope on the
    input's side (bool for 0/1 gates, the input's dtype for LeakyReLU); the lower bound is where a saturating
    activation clips from below (None when it does not)."""
    x = args[0] if args else kwargs["input"]
    if func in _RELU:
        inplace = func in _RELU_INPLACE or bool(_arg(args, kwargs, 1, "inplace", False))
        return x, x.detach() > 0, inplace, None
    if func is F.relu6:
        return x, (x.detach() > 0) & (x.detach() < 6), bool(_arg(args, kwargs, 1, "inplace", False)), 0.0
    if func in (F.leaky_relu, getattr(F, "leaky_relu_", None)):
        slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
        inplace = func is not F.leaky_relu or bool(_arg(args, kwargs, 2, "inplace", False))
        d = x.detach()
        return x, torch.where(d > 0, torch.ones_like(d), torch.full_like(d, slope)), inplace, None
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))  # hardtanh
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    inplace = func is not F.hardtanh or bool(_arg(args, kwargs, 3, "inplace", False))
    return x, (x.detach() > lo) & (x.detach() < hi), inplace, lo


def _fname(func) -> str:
    name = getattr(func, "__name__", repr(func))
    for prefix, ns in (("torch.nn.functional", F), ("torch", torch), ("torch.Tensor", torch.Tensor)):
        if getattr(ns, name, None) is func:
            return f"{prefix}.{name}"
    return name


class Activations(TorchFunctionMode):
    """Intercepts ReLU-type (piecewise-linear: ReLU, ReLU6, Hardtanh, LeakyReLU) and (log_)softmax calls during one
    forward pass.

    ``role``: ``pass`` (activations run unchanged), ``record`` (also store the gate of every activation call, in
    execution order: 1[input > 0] for ReLU, see :func:`piecewise_gate`), ``gate`` (replace the n-th activation by
    multiplication with the n-th stored gate), ``identity`` (activations do nothing) or ``unsaturated`` (ReLU and
    LeakyReLU unchanged, ReLU6 / Hardtanh without their upper bound: SynFlow). With ``strict``, any other activation
    function raises. Every (log_)softmax call is recorded so that :meth:`logits` can undo a final one.
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
        if (func in _RELU or func in _PIECEWISE) and self.role != "pass":
            inp, gate_now, inplace, lower = piecewise_gate(func, args, kwargs)
            if self.role == "record":
                self.gates.append(gate_now)
                return func(*args, **kwargs)
            if self.role == "identity":
                return inp
            if self.role == "unsaturated":
                if func in _RELU or lower is None:
                    return func(*args, **kwargs)
                return inp.clamp_(min=lower) if inplace else inp.clamp(min=lower)
            # gate
            if self.pos >= len(self.gates):
                raise PrunekitError(
                    f"{self.method}: the gate copy recorded {len(self.gates)} ReLU calls but the path-activation "
                    "copy makes more; the model's forward must apply the same activations on every call"
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
_RELU_ONLY_FIX = (" (PX's path decomposition gates every unit by the slope of a piecewise-linear activation: "
                  "ReLU, ReLU6, Hardtanh, LeakyReLU; GELU, SiLU, tanh, Hardswish (x·relu6(x+3)/6, piecewise "
                  "quadratic) ... have no such gates); use a ReLU model (or ReLU6, Hardtanh, LeakyReLU), or an "
                  "unstructured data method that "
                  "accepts any activation (snip, grasp, fts, woodfisherblock, ...)")


def check_relu_modules(model: nn.Module, method: str) -> None:
    """Refuse activation modules other than the piecewise-linear ones (ReLU, ReLU6, Hardtanh, LeakyReLU) and a
    (log_)softmax."""
    for name, m in model.named_modules():
        if isinstance(m, _PL_MODULES) or isinstance(m, _SOFTMAX_MODULES):
            continue
        if type(m).__module__ == "torch.nn.modules.activation":
            raise PrunekitError(
                f"{method} supports ReLU networks only: module {name!r} is {type(m).__name__}{_RELU_ONLY_FIX}"
            )


_BLOCKER_KINDS = ("token embeddings (token-id inputs: no all-ones or x⊙x input)",
                  "LayerNorm (per-example normalization, not linear)",
                  "softmax attention (products of activations)",
                  "activations that are not piecewise linear")


def _blocker_kind(m: nn.Module, model: nn.Module) -> int | None:
    cls = type(m).__name__.lower()
    if isinstance(m, nn.Embedding):
        return 0
    if m is not model and (isinstance(m, nn.LayerNorm) or cls.endswith("layernorm") or cls.endswith("rmsnorm")):
        return 1
    if isinstance(m, nn.MultiheadAttention) or (cls.endswith("attention") and not cls.endswith("selfattention")
                                                and not cls.endswith("outputattention")):
        return 2
    if "gelu" in cls or cls in ("siluactivation", "tanh", "sigmoid", "silu", "mish", "hardswish"):
        return 3
    return None


def path_blockers(model: nn.Module) -> dict[str, list[str]]:
    """The modules that break a path decomposition, by kind (see :data:`_BLOCKER_KINDS`): ``{kind: ["name
    (Class)", ...]}``; a kind is listed only when found."""
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        k = _blocker_kind(m, model)
        if k is not None:
            out.setdefault(_BLOCKER_KINDS[k], []).append(f"{name} ({type(m).__name__})")
    return out


def check_path_model(model: nn.Module, method: str) -> None:
    """Refuse a transformer-style model (token embeddings or softmax attention found), naming every kind of module
    that breaks the path decomposition (LayerNorm and GELU included). SynFlow's R and PX's path kernel are sums over
    input-output paths of products of weights and piecewise-linear gates (pai.md 6.11, 6.12); a CNN with a
    LayerNorm or a GELU is left to each method's own rules (PX refuses GELU; SynFlow runs it, see its docs)."""
    found = path_blockers(model)
    if not any(k in found for k in (_BLOCKER_KINDS[0], _BLOCKER_KINDS[2])):
        return
    parts = []
    for kind, names in found.items():
        more = f", and {len(names) - 2} more" if len(names) > 2 else ""
        parts.append(f"{kind}: {', '.join(names[:2])}{more}")
    raise PrunekitError(
        f"{method} cannot score this model: its path decomposition (a sum over input-output paths of products of "
        f"weights and piecewise-linear gates) does not hold; found {'; '.join(parts)}. Use a data method that "
        "works on transformers (snip, grasp, fisher_diag, woodfisherblock, kfac, ...; see docs/transformers.md)")


# -------------------------------------------------------------------------------------------------- copies
def scoring_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy in ``dtype`` with no gradients and no parameter requiring one."""
    net = copy.deepcopy(model)
    net.to(dtype)
    for p in net.parameters():
        p.grad = None
        p.requires_grad_(False)
    return net


def copy_tensor(net: nn.Module, p: PrunableParam) -> torch.Tensor:
    """The tensor of ``net`` (a copy of the scored model) at the place of ``p``."""
    module = net.get_submodule(p.module_name) if p.module_name else net
    return getattr(module, p.attr)


def net_device(model: nn.Module) -> torch.device:
    """The device of the first parameter, else of the first buffer, else the CPU."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_inputs(batch: Any, method: str) -> torch.Tensor:
    """The inputs of a data batch: the batch itself (a tensor) or the first item of an (inputs, targets) pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise PrunekitError(
        f"{method}: each data batch must be an (inputs, targets) pair or an inputs tensor, got {type(batch).__name__}"
    )


def alive_mask(ctx: ScoreContext, p: PrunableParam) -> torch.Tensor:
    """The current bool mask of ``p`` on its tensor's device (all ones when it has none)."""
    m = ctx.masks.get(p.name)
    if m is None:
        return torch.ones_like(p.tensor, dtype=torch.bool)
    return m.to(p.tensor.device, torch.bool)
