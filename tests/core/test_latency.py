"""Latency measurement: protocol properties (not speed targets, which live in bench/)."""
import pytest
import torch

import prunekit as pk
from prunekit.latency import compare_latency, measure_latency

pytestmark = pytest.mark.usefixtures("one_thread")


class Slow(torch.nn.Module):
    """Does k times the work of one matmul: its latency must scale with k."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.randn(256, 256))

    def forward(self, x):
        for _ in range(self.k):
            x = x @ self.w
        return x


def test_rows_and_speedup_ordering():
    rows = compare_latency({"big": Slow(40), "small": Slow(4)}, (256,), batch_sizes=(8, 32), repeats=5, warmup=1)
    assert [(r["model"], r["batch_size"]) for r in rows] == [("big", 8), ("small", 8), ("big", 32), ("small", 32)]
    for r in rows:
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 3  # 10x fewer matmuls


def test_training_flag_restored_and_errors():
    m = Slow(1).train()
    out = measure_latency(m, (256,), batch_sizes=(2,), repeats=2, warmup=0)
    assert set(out) == {2} and m.training
    with pytest.raises(pk.PrunekitError, match="input_shape"):
        measure_latency(m, (), batch_sizes=(1,))
    with pytest.raises(pk.PrunekitError, match="batch_sizes"):
        measure_latency(m, (256,), batch_sizes=(0,))
