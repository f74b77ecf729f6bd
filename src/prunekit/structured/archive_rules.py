"""What a shrunk-model archive may contain, and the check of an archive before anything is built from it: torch.nn
module types with constructor arguments, an explicit allow-list of tensor functions, tensor methods and tensor
metadata attributes, plain identifiers for node names, inputs and keywords (torch.fx pastes them into the ``forward``
it generates), and references only to the archive's own modules, tensors and earlier nodes. No entry may reach a
dunder attribute, a file, global state or Python objects other than tensors, sizes, dtypes and devices."""
from __future__ import annotations

import importlib
import keyword
import re
from typing import Any

import torch

from ..errors import PrunekitError

#: torch.nn leaf module types an archive may contain (constructor arguments are read from their attributes)
MODULE_TYPES: tuple[str, ...] = (
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear", "Bilinear",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "LocalResponseNorm",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid", "Threshold",
    "Hardshrink", "Softshrink", "Softmax", "LogSoftmax", "Softmin", "Identity", "Flatten", "Unflatten",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "LPPool1d", "LPPool2d", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "PixelShuffle",
    "PixelUnshuffle", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
    "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d",
    "ReplicationPad3d", "Embedding",
)
#: the functions a graph may call, by module: an explicit allow-list of tensor operations. Nothing that reads or
#: writes files, changes global state, or reaches Python objects other than tensors, sizes, dtypes and devices.
ALLOWED_FUNCTIONS: dict[str, frozenset[str]] = {
    "torch": frozenset("""
        abs add addmm amax amin any all argmax argmin baddbmm bmm cat ceil chunk clamp clamp_max clamp_min clip
        concat concatenate conv1d conv2d conv3d cos cosh cumsum diag div dropout einsum eq erf exp expand_copy flatten
        flip floor floor_divide full_like ge gelu gt hardtanh index_select isfinite isnan layer_norm le lerp log
        log_softmax logsumexp lt masked_fill matmul max maximum mean min minimum mm movedim mul narrow ne neg norm
        ones_like permute pow prod reciprocal relu reshape roll rsqrt sigmoid sign sin sinh softmax split sqrt
        square squeeze stack std sub sum swapaxes t tanh tensor_split tile topk transpose tril triu true_divide
        unbind unsqueeze var where zeros_like adaptive_avg_pool1d avg_pool1d max_pool1d max_pool2d batch_norm
        group_norm instance_norm pixel_shuffle pixel_unshuffle channel_shuffle hardswish hardsigmoid silu mish
        """.split()),
    "torch.functional": frozenset("einsum norm split tensordot".split()),
    "torch.nn.functional": frozenset("""
        adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
        adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d batch_norm celu conv1d conv2d conv3d conv_transpose1d
        conv_transpose2d conv_transpose3d dropout dropout1d dropout2d dropout3d elu embedding gelu glu group_norm
        hardshrink hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm leaky_relu linear
        local_response_norm log_softmax logsigmoid lp_pool1d lp_pool2d max_pool1d max_pool2d max_pool3d mish
        normalize pad pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm selu sigmoid silu softmax softmin
        softplus softshrink softsign tanh tanhshrink threshold upsample scaled_dot_product_attention one_hot
        """.split()),
    "torch._C._nn": frozenset("gelu linear pad silu hardswish hardsigmoid".split()),
    "_operator": frozenset("""
        abs add and_ eq floordiv ge getitem gt iadd imul invert isub itruediv le lshift lt matmul mod mul ne neg
        not_ or_ pos pow rshift sub truediv xor
        """.split()),
    "math": frozenset("ceil floor sqrt log log2 exp prod isqrt".split()),
}
ALLOWED_FUNCTIONS["operator"] = ALLOWED_FUNCTIONS["_operator"]
#: public torch.Tensor methods a graph may call
ALLOWED_METHODS = frozenset("""
    abs add amax amin any all argmax argmin bmm ceil chunk clamp clamp_ clamp_min clamp_max clip contiguous cos
    cumsum detach dim div double eq exp expand expand_as flatten flip float floor ge gelu gt half int le log
    log_softmax long lt masked_fill matmul max mean min mm mul narrow ne neg norm numel permute pow prod reciprocal
    relu relu_ repeat repeat_interleave reshape reshape_as roll rsqrt select sigmoid sign sin size softmax split
    sqrt square squeeze std sub sum t tanh tile to transpose tril triu type_as unbind unflatten unsqueeze var view
    view_as where add_ mul_ div_ sub_ zero_ bfloat16 bool masked_fill_ sigmoid_ tanh_ hardtanh_ movedim swapaxes
    """.split())
#: attributes ``getattr(x, name)`` may read (tensor metadata; fx records ``x.shape`` this way)
ALLOWED_ATTRIBUTES = frozenset("shape dtype device ndim is_cuda T mT requires_grad".split())
BUILTINS = {"getattr"}
_IDENTIFIER = re.compile(r"_?[A-Za-z][A-Za-z0-9_]*\Z")  # no dunders: at most one leading underscore
_PATH_PART = re.compile(r"(?:_?[A-Za-z][A-Za-z0-9_]*|[0-9]+)\Z")
SCALARS = (bool, int, float, str, type(None))


def allowed_function(mod: str, name: str) -> bool:
    if mod == "builtins":
        return name in BUILTINS
    return name in ALLOWED_FUNCTIONS.get(mod, ())


def resolve_function(mod: str, name: str) -> Any:
    if not allowed_function(mod, name):
        raise PrunekitError(f"archive calls {mod}.{name}, which is not an allowed function")
    obj = getattr(importlib.import_module(mod), name, None)
    if obj is None or not callable(obj):
        raise PrunekitError(f"archive calls {mod}.{name}, which this torch does not have")
    return obj


# ------------------------------------------------------------------------------------------------ validation
_TAGS = {"__node__", "__tuple__", "__dict__", "__slice__", "__ellipsis__", "__dtype__", "__device__",
         "__memory_format__", "__layout__"}
_OPS = ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output")


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name)


def _is_path(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and all(_PATH_PART.match(p) for p in name.split("."))


def _check_value(value: Any, earlier: set[str], where: str) -> None:
    """An encoded argument holds only scalars, containers, known tags and references to earlier nodes."""
    if isinstance(value, SCALARS):
        return
    if isinstance(value, list):
        for v in value:
            _check_value(v, earlier, where)
        return
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _TAGS:
        raise PrunekitError(f"{where}: an argument of unknown form ({type(value).__name__})")
    tag, inner = next(iter(value.items()))
    if tag == "__node__":
        if inner not in earlier:
            raise PrunekitError(f"{where}: refers to node {inner!r}, which is not defined before it")
    elif tag in ("__tuple__", "__slice__"):
        if not isinstance(inner, list):
            raise PrunekitError(f"{where}: a damaged {tag.strip('_')} argument")
        for v in inner:
            _check_value(v, earlier, where)
    elif tag == "__dict__":
        if not isinstance(inner, list) or not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str)
                                                  for kv in inner):
            raise PrunekitError(f"{where}: a damaged dict argument")
        for _, v in inner:
            _check_value(v, earlier, where)
    elif tag != "__ellipsis__" and not _is_identifier(inner) and not (tag == "__device__" and isinstance(inner, str)
                                                                       and re.match(r"[a-z]+(:[0-9]+)?\Z", inner)):
        raise PrunekitError(f"{where}: a damaged {tag.strip('_')} argument {inner!r}")


def validate_archive(blob: Any, source: str) -> None:
    """Check an archive's structure before anything is built from it; raises :class:`PrunekitError` naming
    ``source`` and the offending entry.

    Node names and placeholder targets must be plain identifiers (fx pastes them into the ``forward`` it
    generates), module and attribute targets plain dotted names of the archive's own modules and tensors, keyword
    names identifiers, function targets in :data:`ALLOWED_FUNCTIONS`, method targets in :data:`ALLOWED_METHODS`,
    ``getattr`` only for the tensor metadata in :data:`ALLOWED_ATTRIBUTES`, and modules only of
    :data:`MODULE_TYPES`."""
    def bad(msg: str) -> PrunekitError:
        return PrunekitError(f"{source}: {msg}; not loaded (the archive is damaged or was not written by prunekit)")

    if not isinstance(blob, dict) or not all(isinstance(blob.get(k), list) for k in ("modules", "nodes", "attrs")) \
            or not isinstance(blob.get("state_dict"), dict):
        raise bad("missing or malformed modules, nodes, attrs or state_dict")
    modules = set()
    for spec in blob["modules"]:
        if not isinstance(spec, dict) or not _is_path(spec.get("name")) or not isinstance(spec.get("args"), dict):
            raise bad(f"a malformed module entry {str(spec)[:80]!r}")
        if spec.get("type") not in MODULE_TYPES:
            raise bad(f"module {spec['name']!r} has type {spec.get('type')!r}, which is not allowed")
        for k, v in spec["args"].items():
            if not _is_identifier(k):
                raise bad(f"module {spec['name']!r} has an argument named {k!r}")
            _check_value(v, set(), f"{source}: module {spec['name']!r} argument {k!r}")
        modules.add(spec["name"])
    attrs = set()
    for a in blob["attrs"]:
        if not isinstance(a, dict) or not _is_path(a.get("target")) or a.get("kind") not in \
                ("parameter", "buffer", "constant") or not isinstance(a.get("tensor"), torch.Tensor):
            raise bad(f"a malformed tensor entry {str(a)[:80]!r}")
        attrs.add(a["target"])
    earlier: set[str] = set()
    for n in blob["nodes"]:
        if not isinstance(n, dict) or n.get("op") not in _OPS:
            raise bad(f"a graph node of unknown kind {str(n)[:80]!r}")
        name, op, target = n.get("name"), n["op"], n.get("target")
        if not _is_identifier(name) or name in earlier:
            raise bad(f"graph node name {name!r} is not a new plain identifier")
        where = f"{source}: node {name!r}"
        if not (isinstance(n.get("args"), dict) and isinstance(n["args"].get("__tuple__"), list)):
            raise bad(f"node {name!r} has malformed arguments")
        if op == "placeholder" and not _is_identifier(target):
            raise bad(f"input {name!r} has the name {target!r}, which is not a plain identifier")
        if op == "get_attr" and target not in attrs:
            raise bad(f"node {name!r} reads {target!r}, which is not a tensor of the archive")
        if op == "call_module" and target not in modules:
            raise bad(f"node {name!r} calls module {target!r}, which is not a module of the archive")
        if op == "call_method" and target not in ALLOWED_METHODS:
            raise bad(f"node {name!r} calls Tensor.{target}, which is not an allowed tensor method")
        if op == "call_function":
            mod, _, fname = target.partition(":") if isinstance(target, str) else ("", "", "")
            if not allowed_function(mod, fname):
                raise bad(f"node {name!r} calls {target!r}, which is not an allowed function")
            if mod == "builtins":  # getattr(x, name): tensor metadata only
                args = n.get("args")
                if not (isinstance(args, dict) and isinstance(args.get("__tuple__"), list)
                        and len(args["__tuple__"]) == 2 and args["__tuple__"][1] in ALLOWED_ATTRIBUTES):
                    raise bad(f"node {name!r} reads an attribute other than {', '.join(sorted(ALLOWED_ATTRIBUTES))}")
        if op == "output" and target != "output":
            raise bad(f"output node {name!r} has target {target!r}")
        _check_value(n.get("args"), earlier, where)
        kwargs = n.get("kwargs")
        _check_value(kwargs, earlier, where)
        if not (isinstance(kwargs, dict) and list(kwargs) == ["__dict__"]):
            raise bad(f"node {name!r} has malformed keyword arguments")
        for k, _ in kwargs["__dict__"]:
            if not _is_identifier(k):
                raise bad(f"node {name!r} has a keyword argument named {k!r}")
        if op == "placeholder" and not all(isinstance(v, SCALARS) for v in n["args"]["__tuple__"]):
            raise bad(f"input {name!r} has a default that is not a plain number or string")
        earlier.add(name)
