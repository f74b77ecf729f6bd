"""The scoring set of data-dependent pruning criteria (pai.md §4.1).

Drawn once per run from the training split (never validation or test data), reused in the same order by every
pruning round. Budgets (``samples``):

- ``"all"``: every training sample once, in a seeded order;
- ``{"per_class": k, "pick": "random" | "first"}``: k samples of each class (seeded draw, or the first k in dataset
  order);
- ``{"random": n}``: n samples drawn uniformly, not class-balanced;
- ``{"batches": n, "batch_size": b}``: the first n mini-batches of a seeded shuffled training loader.

``transform``: ``"eval"`` (no augmentation) or ``"train"`` (the training augmentation, drawn once, so every
round sees the same images).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import PrunekitError
from ._util import generator
from .datasets import DatasetSplits, TensorData, balanced_subset, random_subset
from .loader import TensorLoader

_SCORING_STREAM = 0x5C0E


def check_samples(samples: Any) -> None:
    """Validate a budget's form (counts are checked against the data by :func:`scoring_indices`)."""
    if samples == "all":
        return
    ok = isinstance(samples, dict) and (
        ("per_class" in samples and set(samples) <= {"per_class", "pick"}
         and samples.get("pick", "random") in ("random", "first"))
        or set(samples) == {"random"}
        or ("batches" in samples and set(samples) <= {"batches", "batch_size"})
    )
    if ok:
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in samples.items() if k != "pick")
    if not ok:
        raise PrunekitError(
            f"samples {samples!r} is not a budget: use 'all', {{per_class: k, pick: random|first}}, {{random: n}} or "
            "{batches: n, batch_size: b} with positive counts"
        )


def scoring_indices(y: torch.Tensor, samples: Any, seed: int) -> torch.Tensor:
    """Indices into the training split, in the order the scoring set visits them."""
    check_samples(samples)
    n = len(y)
    if samples == "all":
        return torch.randperm(n, generator=generator(seed, _SCORING_STREAM))
    if not isinstance(samples, dict) or len(samples) == 0:
        raise PrunekitError(f"samples must be 'all', {{per_class: k}}, {{random: n}} or {{batches: n}}, got {samples!r}")
    keys = set(samples)
    if "per_class" in keys and keys <= {"per_class", "pick"}:
        pick = samples.get("pick", "random")
        if pick not in ("random", "first"):
            raise PrunekitError(f"samples.pick must be 'random' or 'first', got {pick!r}")
        return balanced_subset(y, samples["per_class"], seed=seed, pick=pick)
    if keys == {"random"}:
        k = samples["random"]
        if not isinstance(k, int) or not 0 < k <= n:
            raise PrunekitError(f"samples.random must be a count in 1..{n}, got {k!r}")
        return random_subset(n, k, seed=seed)
    if "batches" in keys and keys <= {"batches", "batch_size"}:
        nb, bs = samples["batches"], samples.get("batch_size", 128)
        if not isinstance(nb, int) or nb < 1 or not isinstance(bs, int) or bs < 1:
            raise PrunekitError(f"samples.batches and samples.batch_size must be positive counts, got {samples!r}")
        return torch.randperm(n, generator=generator(seed, _SCORING_STREAM))[: nb * bs]
    raise PrunekitError(
        f"samples {samples!r} is not a budget: use 'all', {{per_class: k, pick: random|first}}, {{random: n}} or "
        "{batches: n, batch_size: b}"
    )


def scoring_data(splits: DatasetSplits, samples: Any = "all", *, batch_size: int = 256, seed: int = 0,
                 transform: str = "eval", device: str | torch.device = "cpu"):
    """A re-iterable of (x, y) batches over the scoring set, identical on every iteration."""
    if transform not in ("eval", "train"):
        raise PrunekitError(f"score_transform must be 'eval' or 'train', got {transform!r}")
    idx = scoring_indices(splits.train.y, samples, seed)
    subset = splits.train.subset(idx)
    augment = transform == "train" and splits.augment
    if not isinstance(subset, TensorData):  # files decoded per batch (ImageNet): replay one fixed epoch
        from .imagenet import FileLoader

        return FileLoader(subset, batch_size, augment=augment, mean=splits.mean, std=splits.std, device=device,
                          seed=seed, advance=False)
    loader = TensorLoader(subset, batch_size, shuffle=False, augment=augment, mean=splits.mean, std=splits.std,
                          device=device, seed=seed)
    if augment:  # draw the augmentation once: every round must score the same images
        return [(x, y) for x, y in loader]
    return loader
