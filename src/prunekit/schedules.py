"""When, and how much: schedules answer "at the start of this epoch, prune to what sparsity?".

A schedule is a small pure object; :class:`PruningCallback` turns it into trainer callbacks that call
:func:`prunekit.prune` and hand the masks to the trainer. Any criterion runs under any schedule. Schedules are
defined in epochs, never silently in steps per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from .errors import PrunekitError
from .patterns import parse_pattern
from .prune import prune
from .registry import get_method
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


@dataclass(frozen=True)
class Gradual:
    """Gradual pruning on the polynomial (cubic by default) schedule of Zhu & Gupta (second_order.md §8).

    A step runs at the start of epoch e when ``start <= e <= end`` and ``(e - start) % freq == 0``, pruning to
    s(e) = s_f − (s_f − s_i)·(1 − min(1, (e − start)/(end − start)))^degree. At e = start the step is skipped when
    s_i <= 0, unless ``prune_at_launch``. When ``end`` is off the grid a final step at ``end`` reaches s_f exactly;
    ``reference_compat`` keeps the reference's behaviour of stopping short (its defect: ResNet-50 [1, 5, 40] ends at
    0.899, not 0.90).

    Recompute sub-steps: each step from s_prev to s_target becomes ``recompute_num + 1`` sub-steps
    s_r = s_prev + (s_target − s_prev)·[1 − (1 − (r+1)/(R+1))^k], k = ``recompute_degree`` (1 when
    ``recompute_schedule`` is linear); every sub-step draws fresh data and re-scores.
    """

    target_sparsity: float
    start: int = 0
    freq: int = 1
    end: int = 0
    initial_sparsity: float = 0.0
    degree: float = 3.0
    prune_at_launch: bool = False
    reference_compat: bool = False
    recompute_num: int = 0
    recompute_schedule: str = "linear"
    recompute_degree: float = 2.0

    def validate(self, path="", error=ValueError) -> None:
        if not (0 <= self.start <= self.end):
            raise error(f"gradual schedule needs 0 <= start <= end, got start={self.start}, end={self.end}")
        if self.freq < 1:
            raise error(f"gradual freq must be >= 1, got {self.freq}")
        if not (0.0 <= self.initial_sparsity <= self.target_sparsity < 1.0):
            raise error(f"gradual schedule needs 0 <= initial_sparsity <= target sparsity < 1, got "
                        f"{self.initial_sparsity} and {self.target_sparsity}")
        if self.recompute_num < 0 or self.recompute_schedule not in ("linear", "poly"):
            raise error("recompute_num must be >= 0 and recompute_schedule 'linear' or 'poly'")

    def sparsity_at(self, epoch: int) -> float:
        if self.end == self.start:
            return self.target_sparsity
        frac = min(1.0, max(0.0, (epoch - self.start) / (self.end - self.start)))
        return self.target_sparsity - (self.target_sparsity - self.initial_sparsity) * (1.0 - frac) ** self.degree

    def epochs(self) -> list[int]:
        steps = list(range(self.start, self.end + 1, self.freq))
        if not self.reference_compat and steps[-1] != self.end:
            steps.append(self.end)
        if self.initial_sparsity <= 0 and not self.prune_at_launch and self.end > self.start:
            steps = steps[1:]
        return steps

    def target(self, epoch: int) -> float | None:
        return self.sparsity_at(epoch) if epoch in self.epochs() else None

    def events(self) -> list[tuple[int, float]]:
        return [(e, self.sparsity_at(e)) for e in self.epochs()]

    def substeps(self, s_prev: float, s_target: float) -> list[float]:
        R = self.recompute_num
        k = 1.0 if self.recompute_schedule == "linear" else self.recompute_degree
        return [s_prev + (s_target - s_prev) * (1.0 - (1.0 - (r + 1) / (R + 1)) ** k) for r in range(R + 1)]


@dataclass(frozen=True)
class Segment:
    """``n`` keep ratios from ``start`` to ``end``: ``geometric`` (start·(end/start)^(i/(n-1))) or ``linear``."""

    start: float = 1.0
    end: float = 0.1
    n: int = 2
    spacing: Literal["geometric", "linear"] = "geometric"

    def points(self) -> list[float]:
        n, a, b = int(self.n), float(self.start), float(self.end)
        if n < 1:
            raise ValueError(f"cascade n must be >= 1, got {n}")
        if n == 1:
            return [b]
        if self.spacing == "geometric":
            if a <= 0 or b <= 0:
                raise ValueError("geometric cascade spacing needs start and end > 0")
            return [a * (b / a) ** (i / (n - 1)) for i in range(n)]
        return [a + (b - a) * i / (n - 1) for i in range(n)]


@dataclass(frozen=True)
class Cascade:
    """The prune-retrain cascade of seed 002 (sensitivity.md section 8): prune to each keep ratio in turn, the
    weights carrying over, and retrain after every chunk of ratios.

    Keep ratios (densities of the prunable weights): ``ratios`` (a decreasing list), or ``spacing`` from ``start``
    to ``end`` in ``n`` points (``geometric`` or ``linear``), or ``segments``, a list of such ``{start, end, n,
    spacing}`` pieces joined in order (the seed's ResNet-20 schedule is three). ``retrain_iterations`` R splits the
    list into R consecutive chunks: inside a chunk the ratios are pruned without training, and the chunk's last
    ratio is followed by retraining; -1 retrains after every ratio. ``retrain_epochs``: epochs of each retraining
    (None = the whole ``train`` recipe again, as the seed does).
    """

    ratios: tuple[float, ...] | None = None
    spacing: Literal["geometric", "linear"] = "geometric"
    start: float | None = None
    end: float | None = None
    n: int | None = None
    segments: tuple[Segment, ...] | None = None
    retrain_iterations: int = -1
    retrain_epochs: int | None = None

    def keep_ratios(self) -> list[float]:
        given = [k for k, v in (("ratios", self.ratios), ("segments", self.segments), ("start", self.start)) if v is not None]
        if len(given) != 1:
            raise ValueError("cascade needs exactly one of ratios: [...], segments: [...] or start, end and n")
        if self.ratios is not None:
            r = [float(x) for x in self.ratios]
        elif self.segments is not None:
            r = [x for seg in self.segments for x in seg.points()]
        else:
            if self.end is None or self.n is None:
                raise ValueError("cascade needs ratios: [...] or start, end and n (with spacing geometric|linear)")
            r = Segment(self.start, self.end, self.n, self.spacing).points()
        if not r or any(not 0.0 < x <= 1.0 for x in r) or any(x <= y for x, y in zip(r, r[1:])):
            raise ValueError(f"cascade keep ratios must decrease strictly within (0, 1], got {r}")
        return r

    def chunks(self) -> list[list[float]]:
        """The keep ratios grouped by retraining: one list per retrained level."""
        r = self.keep_ratios()
        R = int(self.retrain_iterations)
        if R == -1 or R >= len(r):
            return [[x] for x in r]
        if R < 1:
            raise ValueError(f"retrain_iterations must be -1 or >= 1, got {R}")
        size, extra = divmod(len(r), R)
        out, i = [], 0
        for c in range(R):
            k = size + (1 if c < extra else 0)
            out.append(r[i:i + k])
            i += k
        return out

    def validate(self, path="", error=ValueError) -> None:
        try:
            self.chunks()
        except ValueError as e:
            raise error(f"{path}: {e}" if path else str(e)) from None
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            raise error(f"{path}.retrain_epochs must be >= 1, got {self.retrain_epochs}")


class PruningCallback(Callback):
    """Calls ``prunekit.prune(model, method, sparsity, data=data(), **options)`` whenever the schedule ``when`` says so.

    ``data(step)`` returns the scoring batches of pruning step ``step`` (0, 1, ...; built lazily, only when a
    method needs them; later steps draw fresh samples). ``before_prune(model)`` runs before every step, ``on_prune(masks,
    event)`` after it. Every pruning event is appended to ``self.events`` (epoch, method, sparsity reached, seconds, collapsed
    tensors), and restored on resume.

    With ``pattern="N:M"`` in ``options`` the schedule's final sparsity must be 1 − N/M (a PrunekitError here
    otherwise), and every step's sparsity s is moved to the nearest pattern level 1 − n/M, n = round((1 − s)·M)
    clamped to [N, M] (:meth:`prunekit.patterns.Pattern.nearest_level`): the steps go through the patterns n:M
    with n decreasing to N, each mask a valid pattern nested in the one before (a step at a level already reached
    changes nothing).
    """

    def __init__(self, when, method: str, data: Callable[[int], Iterable] | None = None, loss=None,
                 on_prune: Callable[[Any, dict], None] | None = None,
                 before_prune: Callable[[Any], None] | None = None, **options):
        self.when, self.method, self.data, self.loss, self.options = when, method, data, loss, options
        self.on_prune, self.before_prune = on_prune, before_prune
        self.events: list[dict] = []
        self.nm = parse_pattern(options.get("pattern"))
        if self.nm is not None:
            final = max(when.events())[1]
            if abs(final - self.nm.sparsity) > 1e-9:
                raise PrunekitError(f"pattern {self.nm} prunes {self.nm.sparsity:g} of the weights, but the schedule "
                                    f"ends at sparsity {final:g}: set the target sparsity to {self.nm.sparsity:g}")

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        target = self.when.target(epoch)
        if target is None or any(e["epoch"] == epoch for e in self.events):
            return
        needs = get_method(self.method).needs_data in ("inputs", "labels")
        current = trainer.masks.sparsity() if trainer.masks is not None else 0.0
        steps = self.when.substeps(current, target) if hasattr(self.when, "substeps") else [target]
        final = epoch == max(e for e, _ in self.when.events())
        if self.nm is not None:  # each step at its pattern level n:M (n from M down to N)
            steps = [self.nm.level_sparsity(self.nm.nearest_level(s)) for s in steps]
        for i, s in enumerate(steps):
            step = len(self.events)  # a fresh scoring draw for every pruning (sub-)step
            data = self.data(step) if (needs and self.data is not None) else None
            if self.before_prune is not None:
                self.before_prune(trainer.model)
            masks = prune(trainer.model, self.method, sparsity=s, data=data, masks=trainer.masks, loss=self.loss,
                          **self.options)
            trainer.set_masks(masks, final=final and i == len(steps) - 1)
            event = {"epoch": epoch, "substep": i, "final": final and i == len(steps) - 1, **masks.report}
            self.events.append(event)
            trainer.log_prune_event(masks, epoch)
            if self.on_prune is not None:
                self.on_prune(masks, event)

    def state_dict(self) -> dict:
        return {"events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        self.events = list(state.get("events", []))
