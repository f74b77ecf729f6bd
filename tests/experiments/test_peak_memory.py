"""A run's ``peak_memory_mb`` is its own peak, not the process's: a sweep worker runs many runs in one process."""
from __future__ import annotations

import pytest
import torch

from tiny import tiny
from prunekit.experiments import run
from prunekit.experiments.measure import peak_memory_mb, reset_peak_memory


def test_a_run_reports_its_own_peak_not_an_earlier_one(tmp_path):
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform does not allow resetting the peak resident memory")
    big = torch.ones(100 * 2**20)  # 400 MiB, touched: the process's high-water mark rises by that much
    earlier = peak_memory_mb("cpu")
    del big
    rec = run(tiny("peak"), tmp_path, log=lambda m: None)
    assert 0 < rec.peak_memory_mb < earlier - 200
