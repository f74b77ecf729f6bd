"""The Trainer: epochs of SGD/Adam(W) with per-epoch LR schedules, masks, evaluation, checkpoints and callbacks.

::

    seed_everything(seed)              # seed *before* building the model: the trainer never re-initialises it
    model = build_model(...)
    trainer = Trainer(model, cfg, train_loader, val_loader, test_loader, callbacks=[...], run_dir="runs/x", seed=seed)
    history = trainer.fit()            # resumes from runs/x/last.pt when it exists
    print(trainer.summary())

Files in ``run_dir``:

- ``last.pt``: the resumable checkpoint (see :meth:`Trainer.checkpoint_state`), written atomically every
  ``cfg.checkpoint_every`` epochs and after the last epoch, as a checked checkpoint of ``owner``
  (:mod:`prunekit.checkpoint`: owner and sha256 in a header, plain data loaded with ``weights_only=True``);
- ``best.pt``: the model and masks at the best validation accuracy (the last epoch when there is no validation
  data), written with :func:`prunekit.save` (read it back with :func:`prunekit.load`), with ``best.pt.sha256``.

A ``last.pt`` that cannot be trusted (unreadable, empty, truncated, damaged, another owner's, or not plain data) is
never resumed: with ``on_corrupt="restart"`` (the default, or the ``PRUNEKIT_ON_CORRUPT`` environment variable) it
is moved aside to ``last.pt.corrupt`` with a one-line warning and training starts from scratch; with ``"error"``
the trainer raises :class:`prunekit.checkpoint.CheckpointError`.

Resuming restores the model, optimizer, scheduler, masks, history, best tracking, callback states and the global
RNG states, so an interrupted run continues exactly as an uninterrupted one would (bit for bit on the CPU, given a
data loader whose order depends only on (seed, epoch) through ``set_epoch`` or on the global RNG).

Distributed data parallel (a process group initialized, e.g. under ``torchrun``; :mod:`prunekit.distributed`):
every rank iterates the same batches and trains on its slice of each (``tensor_split`` along the samples), the
model is wrapped in ``DistributedDataParallel`` at each :meth:`fit` (so a model shrunk between fits is wrapped
afresh), the loss is scaled so that the averaged gradient is the gradient of the mean loss over the WHOLE batch
(the one-process gradient, to floating-point order), evaluation shares the batches out and sums the counts, and
only rank 0 writes files (``last.pt``, ``best.pt``; :func:`prunekit.io.atomic_write`). BatchNorm layers normalize
with their rank's slice, as in any DDP run, so only models without BatchNorm match a one-process run exactly.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import PrunekitError
from ..checkpoint import CheckpointError, CorruptCheckpointWarning, load_checked, on_corrupt_policy, quarantine, save_checked, write_digest
from ..masks import Masks, save
from ..seeding import rng_state, seed_everything, set_rng_state
from ..typed import to_dict
from .callbacks import Callback
from .freeze import backbone_eval, freeze_backbone
from .config import TrainConfig, build_optimizer, build_scheduler, resolve_device

CHECKPOINT_FORMAT = "prunekit.train.checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
_BAR_EVERY = 50  # live progress bar: sync the running loss at most every this many steps


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _to(obj, device: torch.device):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batch_size(y) -> int:
    return int(y.shape[0]) if torch.is_tensor(y) else len(y)


def _n_correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = y.argmax(1) if y.is_floating_point() and y.dim() > 1 else y  # soft / one-hot targets
    return (out.argmax(1) == target).sum()


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


class Trainer:
    """Trains ``model`` with ``cfg`` on ``train_data``, an iterable of ``(x, y)`` batches.

    ``train_data`` may be any re-iterable of batches (a :class:`torch.utils.data.DataLoader`, a list, a
    ``prunekit.data.TensorLoader``); if it has ``set_epoch(epoch)`` it is called before each epoch's pass. Batches
    are moved to the device with ``non_blocking=True``. ``val_data`` and ``test_data`` are evaluated after every
    epoch. ``masks`` (optional) are applied and kept from the start; callbacks can set new ones at any time with
    :meth:`set_masks`. ``log`` receives the progress lines (default: print to stderr); ``cfg.progress=False``
    silences them.

    ``seed``: the global RNGs are seeded with :func:`prunekit.seeding.seed_everything` at construction, unless
    ``run_dir`` holds a checkpoint to resume (then :meth:`fit` restores the saved RNG states). The trainer does not
    initialise the model: seed before building it.

    Epochs are 0-based everywhere (callback hooks, ``metrics['epoch']``, ``best_epoch``); accuracies are fractions
    in [0, 1].

    Attributes useful to callbacks: ``model``, ``cfg``, ``optimizer``, ``scheduler``, ``masks`` (None until set),
    ``device``, ``epoch`` (the current epoch), ``epochs_done``, ``global_step``, ``history``, ``train_data``,
    ``val_data``, ``test_data``, ``run_dir``, ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_data: Iterable,
        val_data: Iterable | None = None,
        test_data: Iterable | None = None,
        callbacks: Sequence[Callback] = (),
        run_dir: str | Path | None = None,
        seed: int = 0,
        masks: Masks | None = None,
        log: Callable[[str], Any] | None = None,
        owner: str | None = None,
        on_corrupt: str | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.callbacks = list(callbacks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = int(seed)
        self.log = log if log is not None else _stderr
        self.device = resolve_device(cfg.device)
        self.owner = owner  # whose checkpoints these are (a run id); None: checked for damage only
        self._on_corrupt = on_corrupt_policy(on_corrupt)

        self._resume_from = self._trusted_checkpoint()  # (path, state) of a checkpoint to resume, or None
        if self._resume_from is None:
            seed_everything(self.seed)

        self.model = model.to(self.device)
        self._head = freeze_backbone(self.model) if cfg.freeze == "backbone" else None  # a linear probe
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.masks: Masks | None = None
        self._mask_handle = None
        self._mask_key: tuple | None = None
        self._wd_off = False

        self.history: list[dict] = []
        self.epoch = 0
        self.epochs_done = 0
        self.global_step = 0
        self.best_val_acc: float | None = None
        self.best_epoch: int | None = None
        self.test_acc_at_best_val: float | None = None
        self.stop_training = False  # a callback sets it in on_epoch_end to end fit() after that epoch
        self.tensorboard = None  # a SummaryWriter while fit() runs with cfg.tensorboard (rank 0, with a run_dir)
        self._net: nn.Module = self.model  # what trains: the model, or its DDP wrapper (_wrap)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._ddp_shapes: list[tuple] | None = None  # the wrapped model's parameter shapes
        if cfg.tensorboard:
            from .tensorboard import check_available

            check_available()
        self.start_epoch = 0
        self._skip = 0  # batches of the first epoch already trained before the start point (start_at)
        if masks is not None:
            self.set_masks(masks)

    def _trusted_checkpoint(self) -> tuple[Path, dict] | None:
        """The verified state of ``run_dir/last.pt`` when there is one to resume; an untrusted one is moved aside
        (and training restarts from scratch) or raises, by ``on_corrupt``."""
        path = self.last_path
        if path is None or not path.exists():
            return None
        try:
            return path, self._read_checkpoint(path)
        except CheckpointError as e:
            if self._on_corrupt == "error":
                raise CheckpointError(path, f"{e.reason}; not resumed (--no-restart-corrupt): move it aside to "
                                            "restart the run from scratch") from None
            where = path
            if distributed.is_main():
                try:
                    where = quarantine(path)
                except FileNotFoundError:  # another process moved it first
                    pass
            warnings.warn(CorruptCheckpointWarning(f"{path}: {e.reason}; not resumed (kept as {where.name}), training "
                                                   "starts from scratch"), stacklevel=3)
            return None

    def _read_checkpoint(self, path: Path) -> dict:
        state = load_checked(path, self.owner)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(path, f"not a prunekit training checkpoint ({CHECKPOINT_FORMAT})")
        return state

    # ------------------------------------------------------------------------------------------------- paths
    @property
    def last_path(self) -> Path | None:
        return self.run_dir / LAST if self.run_dir is not None else None

    @property
    def best_path(self) -> Path | None:
        return self.run_dir / BEST if self.run_dir is not None else None

    # ------------------------------------------------------------------------------------------------- masks
    def set_masks(self, masks: Masks, final: bool = True) -> None:
        """Use ``masks`` from now on: apply them and keep pruned weights (and optimizer state) exactly zero.

        Replaces the previous masks' optimizer hooks. With ``cfg.weight_decay_after_prune=False`` weight decay is set
        to 0 in every parameter group once the masks are ``final`` (the last step of a pruning schedule; a gradual
        schedule passes ``final=False`` before its last step), for the rest of the run (a resumed run included).

        When the masks differ from the previous ones (per-tensor kept counts), best-validation tracking restarts:
        ``best.pt`` and ``test_acc_at_best_val`` only ever describe a model trained under the current masks (never
        a dense warm-up epoch, nor an intermediate step of a gradual schedule).
        """
        if not isinstance(masks, Masks):
            raise PrunekitError(f"set_masks expects a prunekit.Masks, got {type(masks).__name__}")
        if masks.model is not self.model:
            raise PrunekitError("set_masks: these masks were made for another model than the trainer's")
        if self._mask_handle is not None:
            self._mask_handle.remove()
            self._mask_handle = None
        masks.apply()  # moves the masks to the parameters' device and zeroes pruned weights
        self._mask_handle = masks.attach(self.optimizer)
        self.masks = masks
        key = tuple((s.name, s.kept) for s in masks.layer_stats())
        if key != self._mask_key:  # a new sparsity pattern: models from earlier epochs no longer compete for best
            self._mask_key = key
            self.best_val_acc = self.best_epoch = self.test_acc_at_best_val = None
        if final and not self.cfg.weight_decay_after_prune:
            self._wd_off = True
        self._apply_wd_off()

    def _apply_wd_off(self) -> None:
        if self._wd_off:
            for group in self.optimizer.param_groups:
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0

    def start_at(self, epoch: int, skip_batches: int = 0) -> None:
        """Begin training at ``epoch`` instead of 0, after its first ``skip_batches`` batches: the LR schedule is
        advanced ``epoch`` steps and the data order continues from there (IMP levels that rewind to an
        early-training checkpoint resume its schedule and data order).

        Call before :meth:`fit`; ignored when ``run_dir`` holds a checkpoint to resume (it knows where it was).
        """
        epoch, skip_batches = int(epoch), int(skip_batches)
        if not 0 <= epoch <= self.cfg.epochs or skip_batches < 0:
            raise PrunekitError(f"start_at({epoch}): the epoch must be in [0, {self.cfg.epochs}] (train.epochs)")
        if self._resume_from is not None or self.epochs_done:
            return
        with warnings.catch_warnings():  # stepping the schedule before any optimizer step is what we mean here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epoch):
                self.scheduler.step()
        self.epochs_done = self.epoch = self.start_epoch = epoch
        steps = len(self.train_data) if hasattr(self.train_data, "__len__") else 0
        self.global_step = epoch * steps + skip_batches
        self._skip = skip_batches

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> list[dict]:
        """Train to ``cfg.epochs`` epochs (continuing a checkpoint in ``run_dir``); returns the history.

        A callback that sets ``trainer.stop_training = True`` in ``on_epoch_end`` ends training after that epoch
        (the checkpoint records it, so a resumed run does not train on).

        Each entry: ``epoch, lr, train_loss, train_acc, val_loss, val_acc, test_loss, test_acc, seconds, sparsity``
        (``None`` for missing val/test data) plus anything callbacks add in ``on_epoch_end``.
        """
        if self._resume_from is not None:
            (path, state), self._resume_from = self._resume_from, None
            self._restore(path, state)
            if self.epochs_done < self.cfg.epochs:
                self._say(f"resuming {path} after epoch {self.epochs_done}/{self.cfg.epochs}")
        if self.epochs_done >= self.cfg.epochs or self.stop_training:
            return list(self.history)

        self._wrap()
        if self.cfg.tensorboard and self.run_dir is not None and distributed.is_main():
            from .tensorboard import open_writer

            self.tensorboard = open_writer(self.run_dir)
        try:
            return self._fit_epochs()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None

    def log_prune_event(self, masks: Masks, epoch: int) -> None:
        """Histograms of the scores and surviving weights of a pruning event (TensorBoard on; else a no-op)."""
        if self.tensorboard is not None:
            from .tensorboard import log_prune

            log_prune(self.tensorboard, masks, epoch)

    def _fit_epochs(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        for epoch in range(self.epochs_done, self.cfg.epochs):
            self.epoch = epoch
            for cb in self.callbacks:
                cb.on_epoch_begin(self, epoch)
            lr = float(self.optimizer.param_groups[0]["lr"])
            if hasattr(self.train_data, "set_epoch"):
                self.train_data.set_epoch(epoch)
            t0 = time.perf_counter()
            train_loss, train_acc = self._train_epoch(epoch)
            seconds = time.perf_counter() - t0
            self.scheduler.step()

            val_loss = val_acc = test_loss = test_acc = None
            if self.val_data is not None:
                val_loss, val_acc = self.evaluate(self.val_data)
            if self.test_data is not None:
                test_loss, test_acc = self.evaluate(self.test_data)
            metrics = {
                "epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                "seconds": seconds, "sparsity": self.masks.sparsity() if self.masks is not None else 0.0,
            }
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics)
            self.history.append(metrics)
            self.epochs_done = epoch + 1
            self._track_best(metrics)
            every = self.cfg.checkpoint_every
            if self.run_dir is not None and every > 0 and (self.epochs_done % every == 0 or self.stop_training
                                                           or self.epochs_done == self.cfg.epochs):
                save_checked(self.checkpoint_state(), self.last_path, self.owner)
            self._log_epoch(metrics)
            if self.tensorboard is not None:
                from .tensorboard import log_epoch

                log_epoch(self.tensorboard, metrics, self.masks)
            if self.stop_training:
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        return list(self.history)

    def _wrap(self) -> None:
        """Under DDP, wrap the current model (again when it is a new or reshaped one, e.g. after shrinking)."""
        self._net = self.model
        if not distributed.active():
            return
        shapes = [tuple(p.shape) for p in self.model.parameters()]
        if self._ddp is None or self._ddp.module is not self.model or self._ddp_shapes != shapes:
            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            self._ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self._ddp_shapes = shapes
        self._net = self._ddp

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        model, opt, dev = self._net, self.optimizer, self.device
        model.train()
        if self._head is not None:
            backbone_eval(self.model, self._head)
        world, rank = distributed.world_size(), distributed.rank()
        clip = self.cfg.grad_clip
        params = [p for g in opt.param_groups for p in g["params"]] if clip is not None else []
        ls = self.cfg.label_smoothing
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        n = 0
        bar = self.cfg.progress and sys.stderr.isatty() and distributed.is_main()
        total = len(self.train_data) if bar and hasattr(self.train_data, "__len__") else None
        skip, self._skip = self._skip, 0
        for i, (x, y) in enumerate(self.train_data):
            if i < skip:
                continue
            if world > 1:  # this rank's slice; DDP averages over the ranks: world/B·Σ_slice = the whole batch's mean
                full = _batch_size(y)
                x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]  # sliced before the copy to dev
                x, y = _to(x, dev), _to(y, dev)
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=ls, reduction="sum") * (world / max(full, 1))
            else:
                x, y = _to(x, dev), _to(y, dev)
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                if self.masks is not None:
                    self.masks.mask_grads()  # clip the norm of the gradient that is actually applied
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            bs = _batch_size(y)
            loss = loss.detach() * (full / world / max(bs, 1) if world > 1 else 1.0)  # the slice's mean loss
            loss_sum += loss * bs
            correct += _n_correct(out.detach(), y)
            n += bs
            for cb in self.callbacks:
                cb.on_batch_end(self, self.global_step, loss)
            self.global_step += 1
            if bar and ((i + 1) % _BAR_EVERY == 0 or (total is not None and i + 1 == total)):
                self._bar(epoch, i + 1, total, loss_sum.item() / n)
        if bar:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        return self._totals(loss_sum, correct, n)

    @staticmethod
    def _totals(loss_sum: torch.Tensor, correct: torch.Tensor, n: int) -> tuple[float, float]:
        """(mean loss, accuracy) from this rank's sums, added over the ranks under DDP."""
        t = torch.stack([loss_sum.double().cpu(), correct.double().cpu(), torch.tensor(float(n), dtype=torch.float64)])
        distributed.all_sum(t)
        if t[2] == 0:
            return math.nan, math.nan
        return float(t[0] / t[2]), float(t[1] / t[2])

    @torch.no_grad()
    def evaluate(self, data: Iterable) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over all samples of ``data``, in eval mode (no label smoothing)."""
        model, dev = self.model, self.device
        was_training = model.training
        model.eval()
        try:
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.long, device=dev)
            n = 0
            for i, (x, y) in enumerate(data):
                if not distributed.owns(i):  # DDP: this rank's batches, summed over the ranks below
                    continue
                x, y = _to(x, dev), _to(y, dev)
                out = model(x)
                loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
                correct += _n_correct(out, y)
                n += _batch_size(y)
        finally:
            model.train(was_training)
        return self._totals(loss_sum, correct, n)

    # ----------------------------------------------------------------------------------------------- best
    def _track_best(self, m: dict) -> None:
        if self.val_data is not None:
            better = m["val_acc"] is not None and (self.best_val_acc is None or m["val_acc"] > self.best_val_acc)
        else:
            better = True  # no validation data: the last epoch is the "best"
        if not better:
            return
        self.best_val_acc = m["val_acc"]
        self.best_epoch = m["epoch"]
        self.test_acc_at_best_val = m["test_acc"]
        if self.run_dir is not None:
            save(self.best_path, self.model, self.masks, epoch=m["epoch"], val_acc=m["val_acc"],
                 test_acc=m["test_acc"], sparsity=m["sparsity"])
            if distributed.is_main():
                write_digest(self.best_path, self.owner)

    def summary(self) -> dict:
        """final_test_acc, best_val_acc, best_epoch, test_acc_at_best_val, epochs, train_seconds (and finals)."""
        last = self.history[-1] if self.history else {}
        return {
            "final_test_acc": last.get("test_acc"),
            "final_val_acc": last.get("val_acc"),
            "final_sparsity": last.get("sparsity"),
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "test_acc_at_best_val": self.test_acc_at_best_val,
            "epochs": len(self.history),
            "train_seconds": sum(h["seconds"] for h in self.history),
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        """The resumable state written to ``run_dir/last.pt``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epochs_done,  # number of completed epochs = the next epoch's index
            "start_epoch": self.start_epoch,
            "stopped": self.stop_training,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "weight_decay_off": self._wd_off,
            "history": [dict(h) for h in self.history],
            "best": {"val_acc": self.best_val_acc, "epoch": self.best_epoch, "test_acc": self.test_acc_at_best_val},
            "rng": rng_state(),
            "callbacks": [{"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks],
            "seed": self.seed,
            "config": to_dict(self.cfg),
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a state written by :meth:`checkpoint_state` (a checked checkpoint of this trainer's ``owner``;
        raises :class:`~prunekit.checkpoint.CheckpointError` for one that cannot be trusted)."""
        path = Path(path)
        self._restore(path, self._read_checkpoint(path))

    def _restore(self, path: Path, state: dict) -> None:
        saved_cbs = state["callbacks"]
        names = [type(cb).__name__ for cb in self.callbacks]
        if [c["class"] for c in saved_cbs] != names:
            raise PrunekitError(
                f"{path} was written with callbacks [{', '.join(c['class'] for c in saved_cbs)}] but this trainer has "
                f"[{', '.join(names)}]: resume with the same callbacks, or use a fresh run_dir")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise PrunekitError(f"{path} does not fit {type(self.model).__name__}: {first}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._wd_off = bool(state["weight_decay_off"])
        if state["masks"] is not None:
            self.set_masks(Masks.from_state_dict(self.model, state["masks"]), final=False)  # _wd_off is restored
        else:
            if self._mask_handle is not None:
                self._mask_handle.remove()
            self.masks, self._mask_handle, self._mask_key = None, None, None
        self._apply_wd_off()
        self.epochs_done = self.epoch = int(state["epoch"])
        self.start_epoch = int(state.get("start_epoch", 0))
        self.stop_training = bool(state.get("stopped", False))
        self.global_step = int(state["global_step"])
        self.history = [dict(h) for h in state["history"]]
        best = state["best"]
        self.best_val_acc, self.best_epoch, self.test_acc_at_best_val = best["val_acc"], best["epoch"], best["test_acc"]
        for cb, saved in zip(self.callbacks, saved_cbs):
            cb.load_state_dict(saved["state"])
        set_rng_state(state["rng"])

    # ---------------------------------------------------------------------------------------------- progress
    def _say(self, msg: str) -> None:
        if self.cfg.progress and distributed.is_main():
            self.log(msg)

    def _log_epoch(self, m: dict) -> None:
        if not self.cfg.progress or not distributed.is_main():
            return
        width = len(str(self.cfg.epochs))
        parts = [f"epoch {m['epoch'] + 1:>{width}}/{self.cfg.epochs}", f"lr {m['lr']:.3g}",
                 f"train {_fmt(m['train_loss'])} {_fmt(m['train_acc'], True)}"]
        if m["val_acc"] is not None:
            parts.append(f"val {_fmt(m['val_loss'])} {_fmt(m['val_acc'], True)}")
        if m["test_acc"] is not None:
            parts.append(f"test {_fmt(m['test_loss'])} {_fmt(m['test_acc'], True)}")
        if m["sparsity"]:
            parts.append(f"sparsity {m['sparsity']:.4f}")
        parts.append(f"{m['seconds']:.1f}s")
        self.log("  ".join(parts))

    def _bar(self, epoch: int, done: int, total: int | None, loss: float) -> None:
        width = 24
        if total:
            filled = int(width * done / total)
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        else:
            bar = f"{done} steps"
        sys.stderr.write(f"\r\x1b[Kepoch {epoch + 1}/{self.cfg.epochs} {bar} loss {loss:.4f}")
        sys.stderr.flush()
