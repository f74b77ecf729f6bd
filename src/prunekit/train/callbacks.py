"""Callbacks: hooks into :meth:`prunekit.train.Trainer.fit`.

Order within one ``fit()``::

    on_train_begin(trainer)                      # also on a resumed run, after its state is restored
    for epoch in range(start, cfg.epochs):       # epochs are 0-based
        on_epoch_begin(trainer, epoch)           # before the epoch's first step: prune here, then trainer.set_masks
        on_batch_end(trainer, step, loss)        # after every optimizer step
        on_epoch_end(trainer, epoch, metrics)    # after evaluation, before best/checkpoint bookkeeping
    on_train_end(trainer)

A callback that keeps state across epochs (e.g. "already pruned at epoch 3") returns it from :meth:`state_dict`
and restores it in :meth:`load_state_dict`; the trainer stores it in its resumable checkpoint.
"""
from __future__ import annotations

from typing import Any


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        pass

    def on_batch_end(self, trainer, step: int, loss) -> None:
        """``step`` is the 0-based global step; ``loss`` is the detached 0-d loss tensor (``.item()`` syncs)."""

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
