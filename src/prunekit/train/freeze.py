"""``train.freeze: backbone``: a linear probe. Only the model's head trains; everything before it is fixed, in
evaluation mode while training too (BatchNorm uses its running statistics and keeps them, dropout is off), so the
head sees exactly the features the (pruned) backbone computes at test time.

The head is the model's ``head`` attribute when it is a module (:class:`prunekit.hf.TextClassifier`), else its last
``nn.Linear`` in registration order (the classifier of every zoo model).
"""
from __future__ import annotations

from torch import nn

from ..errors import PrunekitError


def head_name(model: nn.Module) -> str:
    """The name of ``model``'s head module (see the module docstring)."""
    if isinstance(getattr(model, "head", None), nn.Module):
        return "head"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PrunekitError(f"{type(model).__name__} has no Linear layer to train as a head: train.freeze "
                            "'backbone' needs one (or a module attribute named 'head')")
    return linears[-1]


def _in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def freeze_backbone(model: nn.Module) -> str:
    """Stop gradients to every parameter outside the head; returns the head's name."""
    head = head_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(_in_head(name, head))
    return head


def backbone_eval(model: nn.Module, head: str) -> None:
    """Put every module outside the head (and not holding it) in evaluation mode; call after ``model.train()``."""
    for name, m in model.named_modules():
        if not _in_head(name, head) and not (name == "" or head.startswith(name + ".")):
            m.eval()
