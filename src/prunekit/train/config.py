"""Training configuration, optimizers and per-epoch learning-rate schedules.

:class:`TrainConfig` is a frozen, typed dataclass: experiment configs embed it and build it with
:func:`prunekit.typed.from_dict`, which also calls :meth:`TrainConfig.validate`.

Epochs are counted from 0. Learning-rate schedules are functions of the epoch index only (never of the number of
steps per epoch); the rate used during epoch ``e`` is ``lr * factor(e)`` with

- ``constant``: ``1``;
- ``multistep``: ``gamma ** (number of milestones <= e)`` (with ``milestones=(30, 60)`` epochs 0-29 use ``lr``,
  30-59 ``lr * gamma``, 60+ ``lr * gamma**2``; the same convention as ``torch.optim.lr_scheduler.MultiStepLR``);
- ``cosine``: ``0.5 * (1 + cos(pi * e / epochs))``, annealing from ``lr`` towards 0 over ``epochs``;
- ``exponential``: ``gamma ** (e // lr_step_every)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..errors import ConfigError, PrunekitError


@dataclass(frozen=True)
class TrainConfig:
    """How to train a model.

    ``batch_size`` and ``eval_batch_size`` are for whoever builds the data loaders (the trainer takes any iterable of
    ``(x, y)`` batches). ``weight_decay_after_prune=False`` switches weight decay off in every parameter group once
    masks are applied (:meth:`prunekit.train.Trainer.set_masks`). ``grad_clip`` is a maximum gradient norm (None =
    no clipping). ``device='auto'`` means CUDA when available, else the CPU. ``checkpoint_every`` is the number of
    epochs between resumable checkpoints (0 = never). ``tensorboard``: write TensorBoard event files under the run
    folder (:mod:`prunekit.train.tensorboard`; needs the ``tensorboard`` extra). ``threads``: the intra-op torch
    threads an experiment run computes with (None = 1); the harness fixes it per run, whatever the number of sweep
    workers, because CPU results differ bit for bit with the thread count (the library's Trainer leaves the
    process's setting alone). ``freeze='backbone'``: a linear probe, only the head trains
    (:mod:`prunekit.train.freeze`).
    """

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    weight_decay_after_prune: bool = True
    lr_schedule: Literal["constant", "multistep", "cosine", "exponential"] = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    lr_step_every: int = 1
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    device: str = "auto"
    progress: bool = True
    checkpoint_every: int = 1
    tensorboard: bool = False
    threads: int | None = None
    freeze: Literal["backbone"] | None = None

    def validate(self, path: str = "", error: type[Exception] = ConfigError) -> None:
        """Raise ``error(message)`` for a bad value or a bad combination of values."""
        p = f"{path}." if path else ""

        def fail(field: str, msg: str):
            raise error(f"field {p + field!r}: {msg}")

        if self.epochs < 0:
            fail("epochs", f"must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            fail("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", f"must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            fail("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.optimizer != "sgd":
            fail("nesterov", f"applies only to optimizer 'sgd', not {self.optimizer!r}")
        if self.nesterov and self.momentum <= 0:
            fail("nesterov", "needs momentum > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.milestones:
            if self.lr_schedule != "multistep":
                fail("milestones", f"are used only by lr_schedule 'multistep', not {self.lr_schedule!r}")
            if any(m < 1 for m in self.milestones):
                fail("milestones", f"must be epochs >= 1, got {list(self.milestones)}")
            if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
                fail("milestones", f"must be strictly increasing, got {list(self.milestones)}")
        elif self.lr_schedule == "multistep":
            fail("milestones", "lr_schedule 'multistep' needs at least one milestone epoch")
        if not self.gamma > 0:
            fail("gamma", f"must be > 0, got {self.gamma}")
        if self.lr_step_every < 1:
            fail("lr_step_every", f"must be >= 1, got {self.lr_step_every}")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail("grad_clip", f"must be > 0 (or null for no clipping), got {self.grad_clip}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            fail("threads", f"must be an integer >= 1 (or null for 1), got {self.threads}")
        if self.checkpoint_every < 0:
            fail("checkpoint_every", f"must be >= 0 (0 = never), got {self.checkpoint_every}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                fail("device", f"{self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(device: str) -> torch.device:
    """``'auto'`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device` and must be
    usable here (a one-line error otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise PrunekitError(f"device {str(device)!r} is not usable ({str(exc).splitlines()[0]}): pass "
                            f"device='cpu' or an available accelerator") from None
    return dev


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over the trainable parameters of ``model`` (one parameter group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}: choose one of 'sgd', 'adam', 'adamw'")


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The multiplier of ``cfg.lr`` during epoch ``epoch`` (0-based), per ``cfg.lr_schedule``."""
    kind = cfg.lr_schedule
    if kind == "constant":
        return 1.0
    if kind == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    if kind == "cosine":
        if cfg.epochs <= 0:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    if kind == "exponential":
        return cfg.gamma ** (epoch // cfg.lr_step_every)
    raise ConfigError(f"unknown lr_schedule {kind!r}: choose one of 'constant', 'multistep', 'cosine', 'exponential'")


class EpochLR(LRScheduler):
    """Closed-form per-epoch schedule: after ``e`` calls of :meth:`step`, every group's lr is ``base * factor(e)``.

    Its state dict holds only the position (epoch, base rates), not the schedule itself, so a resumed run follows
    the schedule of the config it is resumed with.
    """

    _STATE = ("last_epoch", "base_lrs", "_last_lr", "_step_count")

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.cfg = cfg
        super().__init__(optimizer)

    def factor(self, epoch: int) -> float:
        return lr_factor(self.cfg, epoch)

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._STATE if k in self.__dict__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k in self._STATE})


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> EpochLR:
    """The per-epoch learning-rate schedule of ``cfg``: call ``step()`` once at the end of every epoch."""
    lr_factor(cfg, 0)  # reject an unknown schedule now
    return EpochLR(optimizer, cfg)
