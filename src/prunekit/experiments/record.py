"""What a run leaves: its :class:`RunRecord` (``record.json`` and the store's ``record`` column), and the versions
and hardware it ran with."""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from .. import __version__


@dataclass
class RunRecord:
    run_id: str
    name: str
    method: str
    sparsity: float
    seed: int
    model: str
    dataset: str
    final_test_acc: float | None = None
    best_val_acc: float | None = None
    test_acc_at_best_val: float | None = None
    best_epoch: int | None = None
    achieved_sparsity: float = 0.0
    collapsed: list[str] = field(default_factory=list)
    connected: bool | None = None  # does an input-output path of kept weights survive? (None: dense)
    prune_events: list[dict] = field(default_factory=list)
    prune_seconds: float = 0.0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    epochs: int = 0
    run_dir: str = ""
    cached: bool = False  # True when the record came from the store without running
    levels: list[dict] = field(default_factory=list)  # IMP codes: one row per level (and control branch)
    structured: dict | None = None  # structured methods: the shrunk model's params, MACs and latency vs dense
    val_acc_before_finetune: float | None = None   # right after the final pruning step, before any retraining
    test_acc_before_finetune: float | None = None
    before_finetune_samples: dict | None = None     # {'val': n, 'test': n}: the samples those two were measured on
    reconstruction: dict | None = None  # prune.reconstruction: layer / output errors vs the weights before pruning
    compression: float | None = None               # prunable weights / kept ones, 1 / (1 - achieved sparsity)
    theoretical_speedup: float | None = None       # dense MACs / masked MACs (prunekit.flops)
    peak_memory_mb: float | None = None            # peak RSS of the process (CPU) or peak CUDA allocation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def versions() -> dict[str, str]:
    return {"prunekit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def hardware(device: str) -> dict[str, Any]:
    info = {"device": device, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
