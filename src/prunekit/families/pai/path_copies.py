"""What ``synflow`` and ``px`` share: the activation interception of their forward passes and the scoring copies.

Both transform a *copy* of the current masked model and never touch the live one: its weights, buffers, ``.grad``
and training mode are identical before and after scoring (pai.md section 4.3).

Nonlinearities are found with a :class:`torch.overrides.TorchFunctionMode` (:class:`Activations`) that sees every
``torch`` call during a forward pass, so ReLUs applied as modules (``nn.ReLU``, in place or not) and functionally
(``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place forms) are all handled, in execution order.
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


def _fname(func) -> str:
    name = getattr(func, "__name__", repr(func))
    for prefix, ns in (("torch.nn.functional", F), ("torch", torch), ("torch.Tensor", torch.Tensor)):
        if getattr(ns, name, None) is func:
            return f"{prefix}.{name}"
    return name


class Activations(TorchFunctionMode):
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


def check_relu_modules(model: nn.Module, method: str) -> None:
    """Refuse activation modules other than ReLU and a (log_)softmax."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU) or isinstance(m, _SOFTMAX_MODULES):
            continue
        if type(m).__module__ == "torch.nn.modules.activation":
            raise PrunekitError(
                f"{method} supports ReLU networks only: module {name!r} is {type(m).__name__}{_RELU_ONLY_FIX}"
            )


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
