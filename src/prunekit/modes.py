"""Model state while scoring (pai.md §4.3): a context manager that sets the mode and restores everything after.

- ``eval``: normalization layers use running statistics, dropout off; per-sample gradients are well defined.
- ``train``: normalization layers use batch statistics (the PX code's SNIP and GraSP); their running statistics are
  restored on exit, so scoring never changes the model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import PrunekitError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; on exit each module gets its own mode back (not the
    top-level one: a frozen BatchNorm inside a training model stays frozen)."""
    training = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in training:
            m.training = flag


@contextmanager
def scoring_mode(model: nn.Module, mode: str = "eval", tensors: Sequence[torch.Tensor] = ()) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` with gradients enabled and ``tensors`` requiring grad; on exit restore every
    module's mode, the requires_grad flags, every buffer (running statistics updated by train-mode forwards) and
    the RNG state (dropout draws), so scoring leaves no trace."""
    if mode not in ("eval", "train"):
        raise PrunekitError(f"score_bn must be 'eval' or 'train', got {mode!r}")
    training = [(m, m.training) for m in model.modules()]
    buffers = []
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None:
                buffers.append((m, name, b, b.detach().clone()))
    leaves = [t for t in {id(t): t for t in tensors}.values() if t.is_leaf]
    flags = [(t, t.requires_grad) for t in leaves]
    device = model_device(model)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train(mode == "train")
            for t in leaves:
                t.requires_grad_(True)
            yield model
    finally:
        for t, flag in flags:
            t.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
        with torch.no_grad():
            for m, name, b, saved in buffers:
                if getattr(m, name, None) is not b:
                    setattr(m, name, b)
                b.copy_(saved)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
