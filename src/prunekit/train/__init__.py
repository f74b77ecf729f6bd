"""Training: :class:`Trainer` (epochs, masks, evaluation, checkpoints, callbacks), :class:`TrainConfig` and its
optimizers and per-epoch learning-rate schedules."""
from .callbacks import Callback
from .config import TrainConfig, build_optimizer, build_scheduler, lr_factor
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "Callback", "build_optimizer", "build_scheduler", "lr_factor"]
