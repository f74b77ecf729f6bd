"""When, and how much: schedules answer "at the start of this epoch, prune to what sparsity?".

A schedule is a small pure object; :class:`PruningCallback` turns it into trainer callbacks that call
:func:`prunekit.prune` and hand the masks to the trainer. Any criterion runs under any schedule. Schedules are
defined in epochs, never silently in steps per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .prune import prune
from .train.callbacks import Callback


@dataclass(frozen=True)
class OneShot:
    """Prune once, to ``sparsity``, at the start of epoch ``at_epoch`` (0 = at initialization, w = after w epochs
    of dense warm-up training; no rewinding, the LR schedule is not restarted)."""

    sparsity: float
    at_epoch: int = 0

    def target(self, epoch: int) -> float | None:
        return self.sparsity if epoch == self.at_epoch else None

    def events(self) -> list[tuple[int, float]]:
        return [(self.at_epoch, self.sparsity)]


class PruningCallback(Callback):
    """Calls ``prunekit.prune(model, method, sparsity, data=data(), **options)`` whenever the schedule ``when`` says so.

    ``data`` is a zero-argument callable returning the scoring batches (built lazily, only when a method needs
    them). Every pruning event is appended to ``self.events`` (epoch, method, sparsity reached, seconds, collapsed
    tensors), and restored on resume.
    """

    def __init__(self, when, method: str, data: Callable[[], Iterable] | None = None, loss=None,
                 on_prune: Callable[[Any, dict], None] | None = None, **options):
        self.when, self.method, self.data, self.loss, self.options = when, method, data, loss, options
        self.on_prune = on_prune
        self.events: list[dict] = []

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        target = self.when.target(epoch)
        if target is None or any(e["epoch"] == epoch for e in self.events):
            return
        from .registry import get_method

        needs = get_method(self.method).needs_data in ("inputs", "labels")
        data = self.data() if (needs and self.data is not None) else None
        masks = prune(trainer.model, self.method, sparsity=target, data=data, masks=trainer.masks, loss=self.loss,
                      **self.options)
        trainer.set_masks(masks)
        event = {"epoch": epoch, **masks.report}
        self.events.append(event)
        if self.on_prune is not None:
            self.on_prune(masks, event)

    def state_dict(self) -> dict:
        return {"events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        self.events = list(state.get("events", []))
