"""Tracing a model for the channel analysis: the ``torch.fx`` trace with opaque submodules (:func:`trace`), an example
input as a tuple of tensors (:func:`inputs_tuple`) and the shape-propagation forward that records every tensor's
shape (``ShapeProp``, in eval mode without gradients). A failure becomes one :class:`PrunekitError` line that names
the fix.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import PrunekitError
from ..modes import eval_mode


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
