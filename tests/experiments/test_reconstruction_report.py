"""The report of runs with ``prune.reconstruction`` (issue 17 §4), and N:M runs kept apart from unstructured ones
in every report table."""
from __future__ import annotations

import statistics
import warnings

import pytest

from tiny import fine_tune_of_dense, tiny
from prunekit.experiments import Store, run
from prunekit.experiments.config import expand
from prunekit.experiments.reconstruction_report import reconstruction_data, reconstruction_report
from prunekit.experiments.report import render


def test_the_tables_are_the_means_of_the_records_per_method_and_pattern(tmp_path):
    base = tiny("lwr", prune={"method": "magnitude", "sparsity": 0.5, "reconstruction": 50, "scope": "layer"},
                grid={"prune.method": ["magnitude", "wanda"], "prune.pattern": [None, "2:4"], "seed": [0, 1]})
    cfg = fine_tune_of_dense(base, tmp_path)
    recs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for one in expand(cfg):
            recs.append(run(one, tmp_path, log=lambda m: None))
    with Store(tmp_path / "results.sqlite", readonly=True) as store:
        runs = store.runs()
        (d,) = reconstruction_data(store, runs)
        text = reconstruction_report(store, runs)
        full, _ = render(store, runs)
        dense = store.record(next(r["run_id"] for r in runs if r["method"] == "none"))
    assert d["columns"] == ["0.5 unstructured", "2:4"] and d["methods"] == ["magnitude", "wanda"]
    assert d["start"] == pytest.approx(100 * dense["final_test_acc"])
    for method in ("magnitude", "wanda"):
        for pattern, col in ((None, "0.5 unstructured"), ("2:4", "2:4")):
            mine = [r for r, one in zip(recs, expand(cfg))
                    if one["prune"]["method"] == method and one["prune"].get("pattern") == pattern]
            assert len(mine) == 2
            errs = [r.reconstruction["mean"] for r in mine]
            assert d["cells"][(0, method, col)]["mean"] == pytest.approx(statistics.fmean(errs))
            assert d["cells"][(0, method, col)]["std"] == pytest.approx(statistics.stdev(errs))
            after = [100 * r.final_test_acc for r in mine]
            assert d["cells"][(3, method, col)]["mean"] == pytest.approx(statistics.fmean(after))
            before = [100 * r.test_acc_before_finetune for r in mine]
            assert d["cells"][(2, method, col)]["mean"] == pytest.approx(statistics.fmean(before))
    assert "mean layer error" in text and "right after pruning" in text
    # the main accuracy table: "wanda 2:4" is its own column, never averaged with unstructured wanda
    assert "wanda 2:4" in full and "magnitude 2:4" in full
