"""Model state while scoring (pai.md §4.3): a context manager that sets the mode and restores everything after.

- ``eval``: normalization layers use running statistics, dropout off; per-sample gradients are well defined.
- ``train``: normalization layers use batch statistics (the PX code's SNIP and GraSP); their running statistics are
  restored on exit, so scoring never changes the model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import PrunekitError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@contextmanager
def scoring_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    if mode not in ("eval", "train"):
        raise PrunekitError(f"score_bn must be 'eval' or 'train', got {mode!r}")
    modes = {m: m.training for m in model.modules()}
    saved = {}
    if mode == "train":
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, was in modes.items():
            m.training = was
        if saved:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
