"""The losses of :func:`prunekit.gradstats.grad_stats`: whether a loss is the default cross-entropy, and its
per-sample (summed) form that the hooks engine differentiates."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import default_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def is_default_ce(loss) -> bool:
    return loss is None or loss is default_loss or loss is F.cross_entropy


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_n of the per-sample mean cross-entropy (outputs [n, C, d...] average over the d positions per sample)."""
    if not isinstance(out, torch.Tensor):  # a transformers ModelOutput from tuple batches (no labels given to it)
        out = out.logits
    per_class = out[0, 0].numel() if out.dim() > 2 else 1
    total = F.cross_entropy(out, y, reduction="sum")
    return total / per_class if per_class != 1 else total
