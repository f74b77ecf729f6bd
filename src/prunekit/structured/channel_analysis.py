"""The rule-based channel analysis of a traced model.

:class:`_Analysis` walks the ``torch.fx`` graph (shapes recorded by :mod:`prunekit.structured.fx_trace`) in order,
gives every channelled value a channel space (:mod:`prunekit.structured.channel_spaces`), records the producers,
norms and consumers of each space, ties spaces at element-wise ops between tensors, and marks every space that an
operation without a rule (:mod:`prunekit.structured.op_tables`) touches as not prunable, with a reason that names
it; :meth:`_Analysis.groups` then builds the :class:`ChannelGroup` list, checking that all sizes agree. The rules
(what is supported and what is not) are listed in the module docstring of :mod:`prunekit.structured.groups`, whose
:func:`prunekit.structured.groups.channel_groups` is the entry point.
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import PrunekitError
from .channel_group import CONV_TYPES, CONVT_TYPES, ChannelGroup
from .channel_spaces import _Ch, _Spaces
from .fx_nodes import _arg, _describe, _norm_dims, _shape, _short
from .op_tables import (_BINARY_NAMES, _CHANNELWISE_MODULES, _CHANNELWISE_NAMES, _DIVISION, _ELEMENTWISE_MODULES,
                        _ELEMENTWISE_NAMES, _META_ATTRS, _META_NAMES, _NORM, _REDUCE_NAMES, _RESHAPE_NAMES,
                        _SOFTMAX_NAMES)


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
