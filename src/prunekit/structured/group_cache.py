"""Channel groups cached by model structure, so that pruning several copies of one architecture (a sweep, a
benchmark, a new model object per run) traces it once.

Tracing (``torch.fx`` and a shape-propagation forward) is most of a filter baseline's call on a small network.
The groups depend on the model's code, its module tree and the shapes of its tensors and of the example input,
not on weight values, so two model objects with the same *structure* have the same groups. The key
(:func:`structure_key`) holds, for every module: its name, its class (the class object itself, not its name),
every plain attribute (numbers, strings, tuples of them: kernel sizes, strides, ``groups``, ``eps``, ...), and
the names, shapes and dtypes of its parameters and buffers; and the example's shapes and dtypes. A model that
carries anything the key cannot describe (a hook, an attribute holding a function, a tensor or another object,
an instance-level ``forward``) gets no key and is traced every time. Cached groups are handed out as copies.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from .channel_group import ChannelGroup

#: Architectures remembered (least recently used first out).
CACHE_SIZE = 16
_CACHE: "OrderedDict[tuple, list[ChannelGroup]]" = OrderedDict()

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
_SKIP = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
         "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
         "_forward_hooks_always_called", "_is_full_backward_hook", "training", *_HOOKS}


class _Opaque(Exception):
    """A value the structure key cannot describe."""


def _plain(v: Any):
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, type)):
        return v
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_plain(x) for x in v))
    raise _Opaque


def _example_key(x: Any):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    if isinstance(x, (tuple, list)):
        return ("seq", tuple(_example_key(t) for t in x))
    if x is None:
        return None
    raise _Opaque


def structure_key(model: nn.Module, example: Any) -> tuple | None:
    """What the channel groups of ``model`` traced on ``example`` depend on, or None when something in the model
    (hooks, non-plain attributes) or the example (not a tensor or a tuple of tensors) cannot be described."""
    try:
        parts = [_example_key(example)]
        for name, m in model.named_modules():
            if any(getattr(m, h, None) for h in _HOOKS):
                return None
            attrs = tuple(sorted((k, _plain(v)) for k, v in vars(m).items() if k not in _SKIP))
            params = tuple((k, tuple(p.shape), p.dtype) for k, p in m._parameters.items() if p is not None)
            buffers = tuple((k, tuple(b.shape), b.dtype) for k, b in m._buffers.items() if b is not None)
            parts.append((name, type(m), attrs, params, buffers))
        return tuple(parts)
    except _Opaque:
        return None


def groups_by_structure(model: nn.Module, example: Any,
                        compute: Callable[[nn.Module, Any], list[ChannelGroup]]) -> list[ChannelGroup]:
    """``compute(model, example)`` (the channel groups), remembered by :func:`structure_key`: a model of a
    structure seen before gets a copy of its groups without tracing."""
    key = structure_key(model, example)
    if key is None:
        return compute(model, example)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = compute(model, example)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return copy.deepcopy(hit)
