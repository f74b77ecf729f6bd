"""Channel groups: which tensors move together when one channel of a network is removed.

A *channel group* is one space of channels: the output rows (weight and bias) of every layer that writes it (its
*producers*), the BatchNorm entries that follow it (*norms*) and the input slices of every layer that reads it
(*consumers*: ``conv.weight[:, c]``, or the ``H*W`` in-features block of a linear layer after a flatten).
Residual additions tie the channels of all their inputs into one group with several producers; a depthwise conv
ties its input and output channel (it is then a producer of its input's group).

Hugging Face transformers models are not traced: their groups (attention heads, FFN neurons) are read off the
module structure by :mod:`prunekit.structured.transformer_groups`; a channel there may own several output units of
a producer (``ChannelGroup.rows`` / ``splits``), which every function below handles, as it handles GPT-2's Conv1D
whose weight is stored (in, out) like a transposed conv's (:func:`transposed`).

Groups are found by tracing the model with :func:`torch.fx.symbolic_trace` and recording every tensor's shape
with :class:`torch.fx.passes.shape_prop.ShapeProp` on an example input. Every operation is handled by a rule that
says how channel ``c`` of its output relates to channel ``c`` of its inputs. What has no rule (an unknown module,
function or method, a transpose, a roll over channels, a concatenation along channels, a hard-coded reshape, ...)
never fails the analysis: the groups it touches are marked not prunable, with a reason that names it, and the
rest of the network stays prunable.

Supported (channel ``c`` in = channel ``c`` out, unless stated):

- leaf modules: ``Conv1d/2d/3d`` (ordinary, or depthwise: ``groups == in == out``), ``ConvTranspose1d/2d/3d``
  (``groups == 1``) and ``Linear`` (input of rank 2) are producers and consumers; ``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm`` and ``InstanceNorm1d/2d/3d`` are norms; activations, dropout, pooling (max/avg/adaptive/LP),
  ``Upsample``, ``ZeroPad``/``ConstantPad``/``ReflectionPad``/``ReplicationPad``, ``Identity``, ``Flatten``,
  ``Softmax``/``LogSoftmax`` over a non-channel dim pass channels through;
- functions and tensor methods: element-wise activations and arithmetic with scalars, element-wise binary ops
  between tensors (``+ - * /``, ``maximum``, ...; broadcasting over a size-1 channel dim is fine), functional
  pooling / interpolation / dropout, ``F.pad`` on spatial dims, reductions over spatial dims
  (``mean/sum/amax/amin``), ``flatten``/``view``/``reshape`` that merge the trailing dims into the channel dim
  (each channel then owns a contiguous block of features) or keep dims 0 and 1, basic slicing that keeps dim 1
  whole, ``cat`` along a non-channel dim, ``size``/``dim``/``shape`` queries.

Not supported (the affected groups are marked not prunable): channel-mixing or channel-reordering ops
(``transpose``, ``permute``, ``roll``/``flip`` over channels, ``cat``/``stack``/``chunk``/``split`` along
channels, reductions over channels, ``GroupNorm``/``LayerNorm`` over channels, per-channel ``PReLU``),
``F.pad`` of the channel dim (option-A ResNet shortcuts), grouped but not depthwise convs, reshapes with
hard-coded sizes, tensor attributes used directly (``x * self.scale``), division by a tied tensor, and anything
unknown. Model inputs and everything that reaches the model's output are never prunable.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import PrunekitError, closest
from ..modes import eval_mode
from ..params import hf_conv1d

__all__ = [
    "ChannelGroup", "channel_groups", "channel_masks_to_masks", "make_exact", "channel_masks_from_masks",
    "check_channel_masks", "trace", "row_channels", "transposed",
]


@dataclass
class ChannelGroup:
    """One space of channels that is removed as a unit.

    - ``name``: id used as the key of channel masks: the first producer's module name, or ``"add:<first
      producer>"`` when residual additions (or other element-wise ops) tie several producers together.
    - ``size``: number of channels.
    - ``producers``: modules whose output channels (weight rows and bias; a depthwise conv's rows; a transposed
      conv's ``weight[:, c]``) are the group's channels.
    - ``norms``: BatchNorm / InstanceNorm modules whose entries follow these channels.
    - ``consumers``: ``(module name, features per channel)``: 1 for a conv input channel (or a linear layer on
      unflattened features), ``H*W`` for a linear layer after a flatten.
    - ``prunable`` / ``reason``: whether channels may be removed, and if not, why.
    - ``rows`` and ``splits``: the producers' output units per channel. The output dim of every producer holds
      ``splits`` equal segments of ``size * rows`` units, and channel ``c`` owns units ``c*rows ... c*rows+rows-1``
      of each segment (:func:`row_channels`). 1 and 1 for a CNN channel; an attention head of a transformer has
      ``rows = head_dim`` (its rows of each of query, key, value), and GPT-2's fused ``c_attn`` (q|k|v) has
      ``splits = 3``.
    - ``kind``: ``"channel"`` (found by tracing), ``"head"`` (attention heads) or ``"neuron"`` (FFN neurons of a
      transformer block); ``attention``: for heads, the attention module whose head count :func:`shrink` updates.
    """

    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None
    rows: int = 1
    splits: int = 1
    kind: str = "channel"
    attention: str | None = None


def row_channels(g: ChannelGroup) -> torch.Tensor:
    """The channel of every output unit of ``g``'s producers (a LongTensor of ``size * rows * splits``)."""
    ch = torch.arange(g.size)
    if g.rows != 1:
        ch = ch.repeat_interleave(g.rows)
    return ch.repeat(g.splits) if g.splits != 1 else ch


def expand_rows(keep: torch.Tensor, g: ChannelGroup) -> torch.Tensor:
    """A per-channel vector of ``g`` repeated onto its producers' output units (identity for plain channels)."""
    return keep if g.rows == 1 and g.splits == 1 else keep[row_channels(g).to(keep.device)]


def transposed(mod: nn.Module) -> bool:
    """True when ``mod.weight`` stores (in, out, ...): transposed convs and GPT-2's ``Conv1D``; its output units
    are then ``weight[:, j]`` and its inputs ``weight[i]``."""
    if isinstance(mod, CONVT_TYPES):
        return True
    conv1d = hf_conv1d()
    return conv1d is not None and isinstance(mod, conv1d)


# ----------------------------------------------------------------------------------------------- op tables
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: element-wise modules: any features-per-channel block passes through
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Threshold, nn.Identity, nn.Dropout, nn.AlphaDropout, nn.Hardshrink, nn.Softshrink,
)
#: channel-wise modules that work on the spatial dims of each channel separately (need block 1)
_CHANNELWISE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
_ELEMENTWISE_NAMES = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "softplus",
    "softsign", "logsigmoid", "threshold", "dropout", "alpha_dropout", "feature_alpha_dropout", "clamp", "clamp_",
    "clip", "clamp_min", "clamp_max", "abs", "abs_", "neg", "neg_", "exp", "log", "sqrt", "rsqrt", "square",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as", "requires_grad_",
    "sign", "floor", "ceil", "round", "reciprocal", "sin", "cos", "erf", "hardshrink", "softshrink", "tanhshrink",
    "nan_to_num", "cpu", "cuda", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
_CHANNELWISE_NAMES = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear", "dropout1d", "dropout2d", "dropout3d",
}
_BINARY_NAMES = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "iadd", "isub", "imul",
                 "itruediv", "maximum", "minimum", "fmax", "fmin", "pow", "pow_", "true_divide", "multiply",
                 "subtract", "rsub", "radd", "rmul", "rtruediv"}
_DIVISION = {"div", "div_", "truediv", "itruediv", "true_divide", "rtruediv", "pow", "pow_"}
_RESHAPE_NAMES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_REDUCE_NAMES = {"mean", "sum", "amax", "amin", "nansum", "nanmean"}
_META_NAMES = {"size", "dim", "numel", "ndimension", "nelement", "type", "is_contiguous", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_SOFTMAX_NAMES = {"softmax", "log_softmax", "softmin"}


@dataclass
class _Ch:
    """Channel structure of a tensor value: dim 1 holds ``size * block`` entries, ``block`` per channel of
    union-find space ``space``."""

    space: int
    block: int = 1


class _Spaces:
    """Union-find over channel spaces, each root carrying its members and the reasons it is not prunable."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[dict[str, Any]] = []

    def new(self, reason: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.data.append({"producers": [], "norms": [], "consumers": {}, "reasons": [], "tied": False})
        if reason:
            self.data[i]["reasons"].append(reason)
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, tied: bool = False) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            if tied:
                self.data[ra]["tied"] = True
            return ra
        if rb < ra:
            ra, rb = rb, ra
        da, db = self.data[ra], self.data[rb]
        for key in ("producers", "norms", "reasons"):
            da[key] += [x for x in db[key] if x not in da[key]]
        for k, v in db["consumers"].items():
            da["consumers"].setdefault(k, v)
        da["tied"] = da["tied"] or db["tied"] or tied
        self.parent[rb] = ra
        return ra

    def get(self, i: int) -> dict[str, Any]:
        return self.data[self.find(i)]

    def mark(self, i: int, reason: str) -> None:
        d = self.get(i)
        if reason not in d["reasons"]:
            d["reasons"].append(reason)


# ----------------------------------------------------------------------------------------------- tracing
class _Tracer(torch.fx.Tracer):
    def __init__(self, exclude: Iterable[str] = ()):
        super().__init__()
        self.exclude = set(exclude)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.exclude or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, exclude: Sequence[str] = ()) -> torch.fx.GraphModule:
    """``torch.fx`` trace of ``model`` (modules named in ``exclude`` stay opaque leaves).

    Raises :class:`PrunekitError` naming the failure when the model cannot be traced symbolically.
    """
    if isinstance(model, torch.fx.GraphModule) and not exclude:
        return model
    named = dict(model.named_modules())
    missing = [e for e in exclude if e not in named]
    if missing:
        raise PrunekitError(f"module {missing[0]!r} named in 'exclude' is not in {type(model).__name__}")
    tracer = _Tracer(exclude)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one user-facing line
        first = (str(e).strip().splitlines() or [""])[0]
        raise PrunekitError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {first}); pass "
            "exclude=['<submodule name>'] to treat the untraceable submodule as an opaque block (its neighbouring "
            "channels are then not prunable)") from None
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def inputs_tuple(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise PrunekitError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


def _propagate_shapes(model: nn.Module, gm: torch.fx.GraphModule, example_input) -> None:
    try:
        with eval_mode(model, gm), torch.no_grad():
            ShapeProp(gm).propagate(*inputs_tuple(example_input))
    except PrunekitError:
        raise
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        raise PrunekitError(f"the traced {type(model).__name__} fails on the example input "
                            f"({type(e).__name__}: {first}); check example_input's shape") from None


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if isinstance(tm, TensorMetadata) else None


def _fn_name(fn) -> str:
    name = getattr(fn, "__name__", None) or repr(fn)
    mod = getattr(fn, "__module__", None) or ""
    mod = {"_operator": "operator", "torch.nn.functional": "F", "torch._C._nn": "F",
           "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def _short(node: torch.fx.Node) -> str:
    """Bare operation name for the op tables (``relu`` for F.relu, torch.relu and x.relu())."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {_fn_name(node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    if node.op == "get_attr":
        return f"tensor attribute '{node.target}'"
    return f"{node.op} {node.target}"


def _arg(node: torch.fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _norm_dims(dims, rank: int) -> list[int] | None:
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    out = []
    for d in dims:
        if not isinstance(d, int):
            return None
        out.append(d % rank if rank else d)
    return out


class _Analysis:
    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.sp = _Spaces()
        self.state: dict[torch.fx.Node, _Ch | None] = {}
        self.mod_in: dict[str, int] = {}   # module -> the space of its input (consumers / norms / depthwise)
        self.mod_out: dict[str, int] = {}  # module -> the space of its output (producers)
        self.order: dict[str, int] = {}    # producer -> first appearance

    # -------------------------------------------------------------------------------------------- helpers
    def ch(self, x) -> _Ch | None:
        return self.state.get(x) if isinstance(x, torch.fx.Node) else None

    def source(self, node: torch.fx.Node) -> tuple[object, _Ch | None]:
        """A node's first argument and the channel space it carries (None when it carries none)."""
        src = node.args[0] if node.args else None
        return src, self.ch(src)

    def tensor_inputs(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) if n not in out else None)
        return out

    def unsupported(self, node: torch.fx.Node, why: str | None = None) -> _Ch | None:
        """Mark every channel space the node reads; its output (if channelled) is a fresh unprunable space."""
        desc = _describe(node, self.modules)
        extra = f": {why}" if why else ""
        for n in self.tensor_inputs(node):
            c = self.ch(n)
            if c is not None:
                self.sp.mark(c.space, f"consumed by unsupported {desc}{extra}")
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            return _Ch(self.sp.new(f"produced by unsupported {desc}{extra}"))
        return None

    def same_dim1(self, node: torch.fx.Node, src: torch.fx.Node) -> bool:
        a, b = _shape(node), _shape(src)
        return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and a[1] == b[1]

    def passthrough(self, node: torch.fx.Node, channelwise: bool) -> _Ch | None:
        ins = [n for n in self.tensor_inputs(node) if _shape(n) is not None]
        if not ins:
            return None
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else ins[0]
        c = self.ch(src)
        others = [n for n in ins if n is not src and self.ch(n) is not None]
        if c is None:
            return self.unsupported(node) if others else None
        if others:
            return self.unsupported(node, "takes several channelled tensors")
        if channelwise and c.block != 1:
            return self.unsupported(node, "applied to flattened features")
        if not self.same_dim1(node, src):
            return self.unsupported(node, "changes the channel dimension")
        return c

    # -------------------------------------------------------------------------------------------- visit
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for n in self.tensor_inputs(node):
                    c = self.ch(n)
                    if c is not None:
                        self.sp.mark(c.space, "feeds the output")
                continue
            try:
                st = self.visit(node)
            except PrunekitError:
                raise
            except Exception as e:  # noqa: BLE001 - a rule that cannot decide marks the op unsupported
                st = self.unsupported(node, f"{type(e).__name__}: {e}")
            shape = _shape(node)
            if st is None and shape is not None and len(shape) >= 2 and node.op != "get_attr":
                # a channelled tensor from something without channels (a constant op, a tuple element, ...)
                st = _Ch(self.sp.new(f"produced by {_describe(node, self.modules)}"))
            self.state[node] = st

    def visit(self, node: torch.fx.Node) -> _Ch | None:
        shape = _shape(node)
        if node.op == "placeholder":
            return _Ch(self.sp.new("network input")) if shape is not None and len(shape) >= 2 else None
        if node.op == "get_attr":
            return None  # handled by the ops that use it (binary ops mark channelled constants)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        name = _short(node)
        target = node.target
        if node.op == "call_function" and target is builtins.getattr:
            attr = node.args[1] if len(node.args) > 1 else None
            if attr in _META_ATTRS:
                return None
            return self.unsupported(node, f"attribute {attr!r}")
        if name in _META_NAMES:
            return None
        if node.op == "call_function" and target is operator.getitem:
            return self.visit_getitem(node)
        if name in _ELEMENTWISE_NAMES:
            return self.passthrough(node, channelwise=False)
        if name in _CHANNELWISE_NAMES:
            return self.passthrough(node, channelwise=True)
        if name in _BINARY_NAMES or (node.op == "call_function" and target in (operator.add, operator.sub,
                                                                                operator.mul, operator.truediv,
                                                                                operator.iadd, operator.imul)):
            return self.visit_binary(node, name)
        if name in _RESHAPE_NAMES:
            return self.visit_reshape(node)
        if name in _REDUCE_NAMES:
            return self.visit_reduce(node)
        if name in _SOFTMAX_NAMES:
            return self.visit_softmax(node, _arg(node, 1, "dim"))
        if name in ("cat", "concat", "concatenate"):
            return self.visit_cat(node)
        if name == "pad" and node.op == "call_function":
            return self.visit_pad(node)
        return self.unsupported(node)

    # -------------------------------------------------------------------------------------------- modules
    def visit_module(self, node: torch.fx.Node, mod: nn.Module) -> _Ch | None:
        src, c = self.source(node)
        ins = [n for n in self.tensor_inputs(node) if self.ch(n) is not None]
        name = node.target
        if isinstance(mod, CONV_TYPES + CONVT_TYPES + (nn.Linear,)):
            if len(ins) != 1 or c is None:
                return self.opaque_producer(node, "with an input it cannot follow")
            in_shape = _shape(src)
            if isinstance(mod, nn.Linear):
                if in_shape is None or len(in_shape) != 2:
                    rank = len(in_shape or ())
                    return self.opaque_producer(node, f"over the last dim of a rank-{rank} tensor (only rank 2 is "
                                                      "supported)")
                self.consumer(name, c)
                return self.producer(name)
            if c.block != 1:
                return self.opaque_producer(node, "applied to flattened features")
            depthwise = (isinstance(mod, CONV_TYPES) and mod.groups > 1
                         and mod.groups == mod.in_channels == mod.out_channels)
            if depthwise:
                # the depthwise conv's rows belong to its input's channels: output space = input space
                space = self.remember(self.mod_in, name, c.space)
                space = self.remember(self.mod_out, name, space)
                self.add_producer(space, name)
                return _Ch(space)
            if mod.groups != 1:
                return self.opaque_producer(node, f"with groups={mod.groups} (grouped, not depthwise)")
            self.consumer(name, c)
            return self.producer(name)
        if isinstance(mod, _NORM):
            if len(ins) != 1 or c is None:
                return self.unsupported(node)
            if c.block != 1:
                return self.unsupported(node, "applied to flattened features")
            space = self.remember(self.mod_in, name, c.space)
            d = self.sp.get(space)
            if name not in d["norms"]:
                d["norms"].append(name)
            return _Ch(space)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return self.passthrough(node, channelwise=False)
        if isinstance(mod, _CHANNELWISE_MODULES):
            return self.passthrough(node, channelwise=True)
        if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return self.passthrough(node, channelwise=False)
        if isinstance(mod, nn.Flatten):
            return self.visit_reshape(node)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self.visit_softmax(node, mod.dim)
        return self.unsupported(node)

    def opaque_producer(self, node: torch.fx.Node, why: str) -> _Ch:
        """A Conv/Linear whose input channels cannot be followed: its inputs and its own output group are marked
        not prunable (it still owns a group, so every called Conv/Linear is a producer of exactly one group)."""
        desc = _describe(node, self.modules)
        for n in self.tensor_inputs(node):
            c = self.ch(n)
            if c is not None:
                self.sp.mark(c.space, f"consumed by {desc} {why}")
        out = self.producer(node.target)
        self.sp.mark(out.space, f"produced by {desc} {why}")
        return out

    def remember(self, table: dict[str, int], name: str, space: int) -> int:
        """Modules called more than once share their channels across calls."""
        if name in table:
            space = self.sp.union(table[name], space)
        table[name] = self.sp.find(space)
        return self.sp.find(space)

    def consumer(self, name: str, c: _Ch) -> None:
        space = self.remember(self.mod_in, name, c.space)
        cons = self.sp.get(space)["consumers"]
        if cons.setdefault(name, c.block) != c.block:
            self.sp.mark(space, f"module '{name}' reads these channels with different layouts")

    def producer(self, name: str) -> _Ch:
        space = self.remember(self.mod_out, name, self.sp.new())
        self.add_producer(space, name)
        return _Ch(space)

    def add_producer(self, space: int, name: str) -> None:
        d = self.sp.get(space)
        if name not in d["producers"]:
            d["producers"].append(name)
        self.order.setdefault(name, len(self.order))

    # -------------------------------------------------------------------------------------------- functions
    def visit_binary(self, node: torch.fx.Node, name: str) -> _Ch | None:
        out_shape = _shape(node)
        operands = [a for a in node.args[:2]]
        if out_shape is None:
            return None
        rank = len(out_shape)
        if rank < 2:
            chans = [self.ch(a) for a in operands if self.ch(a) is not None]
            return self.unsupported(node, "result has no channel dim") if chans else None
        tie: list[tuple[torch.fx.Node, _Ch]] = []
        for a in operands:
            shape = _shape(a)
            if shape is None:  # a Python scalar or a non-tensor
                continue
            idx = 1 - (rank - len(shape))  # operand dim broadcast against the output's channel dim
            if idx < 0 or shape[idx] == 1:
                continue  # broadcast over channels
            c = self.ch(a)
            if c is None or idx != 1:
                what = f"tensor attribute '{a.target}'" if a.op == "get_attr" else f"a tensor of shape {shape}"
                return self.unsupported(node, f"combines the channels with {what}")
            tie.append((a, c))
        if not tie:
            return self.unsupported(node, "broadcasts a channel-less result") if any(
                self.ch(a) is not None for a in operands) else None
        if len({c.block for _, c in tie}) != 1:
            return self.unsupported(node, "combines flattened and unflattened channels")
        if name in _DIVISION and len(operands) > 1 and any(a is operands[1] for a, _ in tie):
            return self.unsupported(node, "divides by a tensor on the same channels (0/0 for removed ones)")
        space = tie[0][1].space
        for _, c in tie[1:]:
            space = self.sp.union(space, c.space, tied=True)
        return _Ch(self.sp.find(space), tie[0][1].block)

    def visit_getitem(self, node: torch.fx.Node) -> _Ch | None:
        src = node.args[0]
        c = self.ch(src)
        if c is None:
            return None
        shape = _shape(src)
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.fx.Node) for i in idx):
            return self.unsupported(node, "indexing with a tensor")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: list[Any] = []
        for i in idx:
            if i is Ellipsis:
                full += [slice(None)] * (len(shape) - n_real)
            else:
                full.append(i)
        # position of each entry: None inserts a dim, ints remove one
        pos = 0
        for i in full:
            if pos > 1:
                break
            if i is None:
                return self.unsupported(node, "inserts a dim before the channels")
            if pos == 0 and not isinstance(i, slice):
                return self.unsupported(node, "indexes the batch dim")
            if pos == 1 and i != slice(None):
                return self.unsupported(node, "selects channels")
            pos += 1
        if not self.same_dim1(node, src):
            return self.unsupported(node, "changes the channel dimension")
        if c.block != 1 and len(full) > 1:
            return self.unsupported(node, "slices flattened features")
        return c

    def visit_reshape(self, node: torch.fx.Node) -> _Ch | None:
        src, c = self.source(node)
        if c is None:
            return None
        name = _short(node)
        if name in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = tuple(sizes[0])
            if "shape" in node.kwargs:
                sizes = tuple(node.kwargs["shape"])
            if any(isinstance(s, int) and s != -1 for s in sizes[1:]):
                return self.unsupported(node, "reshape with hard-coded sizes")
        a, b = _shape(src), _shape(node)
        if a is None or b is None:
            return self.unsupported(node)
        if a == b:
            return c
        if len(b) >= 2 and b[0] == a[0] and b[1] == a[1]:
            # dims 0 and 1 kept: each channel's entries stay together; only flat blocks must stay intact
            return c if c.block == 1 or len(b) == len(a) else self.unsupported(node, "reshapes flattened features")
        if len(b) >= 2 and b[0] == a[0]:
            # dims 1..j of the input merged into dim 1, the rest unchanged
            for j in range(2, len(a) + 1):
                if math.prod(a[1:j]) == b[1] and tuple(a[j:]) == tuple(b[2:]):
                    return _Ch(c.space, c.block * math.prod(a[2:j]))
        return self.unsupported(node, f"reshapes {list(a)} to {list(b)}")

    def visit_reduce(self, node: torch.fx.Node) -> _Ch | None:
        src, c = self.source(node)
        if c is None:
            return None
        shape = _shape(src)
        dims = _norm_dims(_arg(node, 1, "dim"), len(shape))
        if dims is None or 0 in dims or 1 in dims:
            return self.unsupported(node, "reduces over the channel or batch dim")
        if c.block != 1:
            return self.unsupported(node, "reduces flattened features")
        return c if self.same_dim1(node, src) else self.unsupported(node)

    def visit_softmax(self, node: torch.fx.Node, dim) -> _Ch | None:
        src, c = self.source(node)
        if c is None:
            return None
        shape = _shape(src)
        dims = _norm_dims(dim, len(shape))
        if dims is None or 1 in dims:
            return self.unsupported(node, "normalises over the channel dim")
        if c.block != 1:
            return self.unsupported(node, "applied to flattened features")
        return c

    def visit_cat(self, node: torch.fx.Node) -> _Ch | None:
        tensors = _arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)):
            return self.unsupported(node)
        chans = [self.ch(t) for t in tensors]
        if all(c is None for c in chans):
            return None
        rank = len(_shape(node) or ())
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(dim, int) or rank < 2 or dim % rank == 1:
            return self.unsupported(node, "concatenates along the channel dim")
        if any(c is None for c in chans) or len({c.block for c in chans}) != 1:
            return self.unsupported(node, "concatenates tensors without matching channels")
        space = chans[0].space
        for c in chans[1:]:
            space = self.sp.union(space, c.space, tied=True)
        return _Ch(self.sp.find(space), chans[0].block)

    def visit_pad(self, node: torch.fx.Node) -> _Ch | None:
        src, c = self.source(node)
        if c is None:
            return None
        pad = _arg(node, 1, "pad")
        rank = len(_shape(src))
        if not isinstance(pad, (list, tuple)) or any(not isinstance(p, int) for p in pad):
            return self.unsupported(node)
        pairs = [tuple(pad[i:i + 2]) for i in range(0, len(pad), 2)]  # pairs[k] pads dim rank-1-k
        for k, pair in enumerate(pairs):
            d = rank - 1 - k
            if d <= 1 and any(pair):
                why = "pads the channel dim (option-A shortcut)" if d == 1 else "pads the batch dim"
                return self.unsupported(node, why)
        return self.passthrough(node, channelwise=True)

    # -------------------------------------------------------------------------------------------- groups
    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, list[str]] = {}
        for name in self.order:
            roots.setdefault(self.sp.find(self.mod_out[name]), [])
        out = []
        for root in roots:
            d = self.sp.data[root]
            producers = sorted(d["producers"], key=lambda p: self.order[p])
            size = _out_channels(self.modules[producers[0]])
            reasons = list(d["reasons"])
            reasons += _size_problems(self.modules, producers, d["norms"], d["consumers"], size)
            name = ("add:" if d["tied"] and len(producers) > 1 else "") + producers[0]
            out.append(ChannelGroup(
                name=name, size=size, producers=producers, norms=list(d["norms"]),
                consumers=[(k, v) for k, v in d["consumers"].items()], prunable=not reasons,
                reason="; ".join(reasons) if reasons else None))
        out.sort(key=lambda g: self.order[g.producers[0]])
        return out


def _out_channels(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    return mod.out_channels


def _size_problems(modules, producers, norms, consumers, size) -> list[str]:
    bad = []
    for p in producers:
        if _out_channels(modules[p]) != size:
            bad.append(f"producer '{p}' has {_out_channels(modules[p])} channels, not {size}")
    for n in norms:
        if getattr(modules[n], "num_features", size) != size:
            bad.append(f"norm '{n}' has {modules[n].num_features} features, not {size}")
    for cname, block in consumers.items():
        m = modules[cname]
        have = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if have != size * block:
            bad.append(f"consumer '{cname}' reads {have} features, not {size}x{block}")
    return bad


def channel_groups(model: nn.Module, example_input, exclude: Sequence[str] = ()) -> list[ChannelGroup]:
    """The channel groups of ``model``, in forward order of their first producer.

    Traces ``model`` with ``torch.fx`` and runs ``example_input`` (a tensor, or a tuple of tensors for several
    inputs; a batch of at least 2 is best) through it in eval mode without gradients to record shapes; the model
    itself is not changed (its training flag is restored). Every Conv/Linear that is called in the forward pass is
    a producer of exactly one group. A group is prunable only if every operation touching its channels is
    understood (see the module docstring), it does not reach the model's output, and all sizes agree; otherwise
    ``reason`` names the cause (for unknown operations: the module name and type, or the function / method).

    ``exclude``: submodule names to treat as opaque blocks (use it for submodules that ``torch.fx`` cannot trace;
    their neighbouring groups become not prunable). Raises :class:`PrunekitError` if tracing fails.

    A Hugging Face transformers model is not traced: its attention heads and FFN neurons are found from its module
    structure (:func:`prunekit.structured.transformer_groups.transformer_groups`), ``example_input`` is then not
    needed (it may be None).
    """
    from .transformer_groups import is_transformer, transformer_groups

    if is_transformer(model):
        return transformer_groups(model)
    gm = trace(model, exclude)
    _propagate_shapes(model, gm, example_input)
    analysis = _Analysis(model, gm)
    analysis.run()
    return analysis.groups()


# ----------------------------------------------------------------------------------------------- masks
def _by_name(groups: Sequence[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def check_channel_masks(groups: Sequence[ChannelGroup], channel_masks: Mapping[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """Validate ``{group name: bool keep-mask of length size}`` against ``groups``; returns CPU bool masks.

    Raises :class:`PrunekitError` for an unknown group name, a wrong length, a group left with no channel, or a
    removed channel in a group that is not prunable (the message gives the reason).
    """
    by = _by_name(groups)
    out = {}
    for name, m in channel_masks.items():
        if name not in by:
            near = closest(name, list(by))
            hint = f"did you mean {', '.join(map(repr, near))}?" if near else f"known groups: {', '.join(by)}"
            raise PrunekitError(f"channel mask for unknown group {name!r}: {hint}")
        g = by[name]
        m = torch.as_tensor(m).detach().to("cpu", torch.bool).reshape(-1)
        if m.numel() != g.size:
            raise PrunekitError(f"channel mask for group {name!r} has {m.numel()} entries, the group has {g.size}")
        if not bool(m.all()) and not g.prunable:
            raise PrunekitError(f"group {name!r} is not prunable ({g.reason}); keep all of its channels")
        if not bool(m.any()):
            raise PrunekitError(f"channel mask for group {name!r} removes every channel; keep at least one")
        out[name] = m
    return out


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _param_name(mname: str, attr: str) -> str:
    return f"{mname}.{attr}" if mname else attr


def _expand(keep: torch.Tensor, block: int) -> torch.Tensor:
    return keep.repeat_interleave(block) if block != 1 else keep


def channel_masks_to_masks(model: nn.Module, groups: Sequence[ChannelGroup],
                           channel_masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-weight boolean masks (``True`` = kept) that remove the masked channels from ``model``.

    For every group named in ``channel_masks`` the result has the ``weight`` of each producer (output rows; a
    transposed conv's ``weight[:, c]``) and of each consumer (input slices: ``weight[:, c]`` of a conv, the
    ``block`` columns of a linear layer after a flatten), named as in ``model.named_parameters()``, on the device
    of the weight. Weights of several groups combine with AND. Weights of groups not named are absent (a subset
    suitable for ``Masks.set``). Applying these masks and :func:`make_exact` gives a model whose outputs equal
    those of ``shrink(model, channel_masks)``.
    """
    cm = check_channel_masks(groups, channel_masks)
    mods = _modules(model)
    out: dict[str, torch.Tensor] = {}

    def get(mname: str) -> torch.Tensor:
        key = _param_name(mname, "weight")
        if key not in out:
            w = mods[mname].weight
            out[key] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        return out[key]

    for g in groups:
        if g.name not in cm:
            continue
        keep = cm[g.name]
        for p in g.producers:
            mask = get(p)
            k = expand_rows(keep, g).to(mask.device)
            if transposed(mods[p]):
                mask[:, ~k] = False
            else:
                mask[~k] = False
        for cname, block in g.consumers:
            mask = get(cname)
            k = _expand(keep, block).to(mask.device)
            if transposed(mods[cname]):
                mask[~k] = False
            else:
                mask[:, ~k] = False
    return out


@torch.no_grad()
def make_exact(model: nn.Module, groups: Sequence[ChannelGroup], channel_masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, what keeps a removed channel's output from being exactly 0 once its weight rows are 0.

    For every removed channel: its entries in each producer's ``bias``, each norm's ``weight`` (gamma) and
    ``bias`` (beta), and each norm's ``running_mean`` (so a norm without affine parameters also outputs 0 in eval
    mode). Then a removed channel leaving its BN is exactly 0 (for any input, train or eval mode).

    Why: zeroing only a conv's rows leaves the BN output ``beta - gamma * mean / sqrt(var + eps)``, a constant per
    channel that still reaches the consumers. Zeroing the consumers' input slices too drops that constant silently,
    so the masked model then differs from the model before masking by a hidden bias shift, and a producer-only
    masked model differs from the physically shrunk one. After ``make_exact`` (and the weight masks of
    :func:`channel_masks_to_masks`), masked and shrunk models compute the same function.
    """
    cm = check_channel_masks(groups, channel_masks)
    mods = _modules(model)
    for g in groups:
        if g.name not in cm or bool(cm[g.name].all()):
            continue
        for p in g.producers:
            b = getattr(mods[p], "bias", None)
            if b is not None:
                b[~expand_rows(cm[g.name], g).to(b.device)] = 0
        for n in g.norms:
            m = mods[n]
            for attr in ("weight", "bias", "running_mean"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    t[~cm[g.name].to(t.device)] = 0


def _lookup(masks, name: str):
    return masks[name] if name in masks else None


def channel_masks_from_masks(model: nn.Module, groups: Sequence[ChannelGroup],
                             masks: Mapping[str, torch.Tensor], side: str = "either") -> dict[str, torch.Tensor]:
    """Channel keep-masks (``{group name: bool}``, prunable groups only) read off per-weight masks.

    ``masks`` maps weight names to bool masks (a :class:`prunekit.Masks` or a plain dict). A channel is removed
    when every producer's row of it is fully masked (``side="producers"``: filter pruning), when every consumer's
    slice of it is fully masked (``side="consumers"``: input-channel pruning such as PFP), or either
    (``"either"``, default).
    Weights absent from ``masks`` count as unmasked; in a residual-tied group all members must agree. At least one
    channel per group is kept (the one the masks remove last is not defined: the lowest index is kept).
    """
    if side not in ("either", "producers", "consumers"):
        raise PrunekitError(f"side must be 'either', 'producers' or 'consumers', got {side!r}")
    mods = _modules(model)
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        dead_p = torch.ones(g.size, dtype=torch.bool)
        dead_c = torch.ones(g.size, dtype=torch.bool)
        for p in g.producers:
            m = _lookup(masks, _param_name(p, "weight"))
            if m is None:
                dead_p[:] = False
                continue
            m = m.detach().to("cpu", torch.bool)
            m = m.transpose(0, 1) if transposed(mods[p]) else m
            alive_rows = m.reshape(m.shape[0], -1).any(1)
            if g.rows != 1 or g.splits != 1:  # a channel is alive while any of its units is
                alive_rows = torch.zeros(g.size, dtype=torch.long).index_add_(
                    0, row_channels(g), alive_rows.long()) > 0
            dead_p &= ~alive_rows
        if not g.consumers:
            dead_c[:] = False
        for cname, block in g.consumers:
            m = _lookup(masks, _param_name(cname, "weight"))
            if m is None:
                dead_c[:] = False
                continue
            m = m.detach().to("cpu", torch.bool)
            m = m if transposed(mods[cname]) else m.transpose(0, 1)
            alive = m.reshape(m.shape[0], -1).any(1).reshape(g.size, block).any(1)
            dead_c &= ~alive
        dead = {"producers": dead_p, "consumers": dead_c, "either": dead_p | dead_c}[side]
        keep = ~dead
        if not bool(keep.any()):
            keep[0] = True
        out[g.name] = keep
    return out

