"""Reading ``torch.fx`` nodes for the channel analysis: a node's recorded shape, its bare op name (the key of the op
tables), a description of it for the reasons a group is not prunable, positional-or-keyword argument lookup and
normalised dims.
"""
from __future__ import annotations

from typing import Mapping

import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata


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
