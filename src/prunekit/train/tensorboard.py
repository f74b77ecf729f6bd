"""TensorBoard event files of a training run (``train.tensorboard: true`` or ``prunekit run --tensorboard``).

Needs the optional extra (``pip install 'prunekit[tensorboard]'``). Written under ``<run folder>/tensorboard/`` (an
IMP or cascade level under its own level folder) by rank 0 only. Tags:

- per epoch (step = epoch, 0-based): ``loss/train``, ``loss/val``, ``loss/test``, ``accuracy/train``,
  ``accuracy/val``, ``accuracy/test`` (fractions), ``lr``, ``sparsity/global`` and ``sparsity/<tensor>`` for every
  prunable tensor;
- at each pruning event (step = the epoch it happened at, one event per sub-step): ``prune/scores/<tensor>`` (the
  method's scores of the last round, over every entry) and ``prune/weights/<tensor>`` (the surviving, nonzero-mask
  weights) as histograms, and the scalar ``prune/sparsity``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrunekitError

FOLDER = "tensorboard"
MISSING = ("TensorBoard logging needs the optional tensorboard package: pip install 'prunekit[tensorboard]' "
           "(or turn it off: train.tensorboard: false)")


def open_writer(run_dir: str | Path):
    """A ``SummaryWriter`` on ``run_dir/tensorboard``; a clear error when the extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when the tensorboard package is absent
        raise PrunekitError(MISSING) from None
    return SummaryWriter(log_dir=str(Path(run_dir) / FOLDER))


def check_available() -> None:
    """Raise the clear error now (before any training) when the extra is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise PrunekitError(MISSING) from None


def _tag(name: str) -> str:
    return name.replace(".", "/")


def log_epoch(writer, metrics: dict, masks=None) -> None:
    step = int(metrics["epoch"])
    for split in ("train", "val", "test"):
        for what, tag in (("loss", "loss"), ("acc", "accuracy")):
            v = metrics.get(f"{split}_{what}")
            if v is not None:
                writer.add_scalar(f"{tag}/{split}", float(v), step)
    writer.add_scalar("lr", float(metrics["lr"]), step)
    writer.add_scalar("sparsity/global", float(metrics.get("sparsity") or 0.0), step)
    if masks is not None:
        for st in masks.layer_stats():
            writer.add_scalar(f"sparsity/{_tag(st.name)}", 1.0 - st.kept / max(st.total, 1), step)
    writer.flush()


def log_prune(writer, masks, step: int) -> None:
    scores = getattr(masks, "scores", None) or {}
    for p in masks.params:
        m = masks.as_dict()[p.name].to(torch.bool)
        s = scores.get(p.name)
        if s is not None and s.numel():
            writer.add_histogram(f"prune/scores/{_tag(p.name)}", s.detach().double().cpu().reshape(-1), step)
        alive = p.tensor.detach()[m.to(p.tensor.device)]
        if alive.numel():
            writer.add_histogram(f"prune/weights/{_tag(p.name)}", alive.double().cpu(), step)
    writer.add_scalar("prune/sparsity", float(masks.sparsity()), step)
    writer.flush()
