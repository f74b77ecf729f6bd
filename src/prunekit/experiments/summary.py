"""Stored runs as the numbers the reports show: metric columns, record fields, training recipes, means over seeds.

A run here is a row of :meth:`Store.runs` (a dict with the runs table's columns and its JSON ``record``).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from ..errors import unknown
from ..families.imp.codes import IMP_CODES
from .store import Store
from .tables import stats

#: Report metric names -> the run field they read (accuracies, shown in %).
METRICS = {
    "test_acc": "final_test_acc",
    "final_test_acc": "final_test_acc",
    "best_val_test_acc": "test_acc_at_best_val",
    "test_acc_at_best_val": "test_acc_at_best_val",
    "best_val_acc": "best_val_acc",
    "test_acc_before_finetune": "test_acc_before_finetune",  # right after pruning (from the run record)
    "val_acc_before_finetune": "val_acc_before_finetune",
}


def metric_column(metric: str) -> str:
    """The run field of a report metric; an unknown metric is an error naming the known ones."""
    if metric not in METRICS:
        raise unknown("report metric", metric, METRICS)
    return METRICS[metric]


def value(run: dict, col: str):
    """A metric of a stored run: a column of the runs table, or a field of its JSON record."""
    if col in run:
        return run[col]
    rec = run.get("record")
    return json.loads(rec).get(col) if rec else None


def pattern_of(run: dict) -> str | None:
    """The N:M pattern a run pruned to (``prune.options.pattern`` / ``prune.method_options.pattern``), or None."""
    prune = json.loads(run["config"]).get("prune", {})
    return (prune.get("options") or {}).get("pattern") or (prune.get("method_options") or {}).get("pattern")


def labelled(runs: list[dict]) -> list[dict]:
    """``runs`` with each N:M run's ``method`` shown as ``"<method> N:M"`` (``code`` keeps the method), so that a
    report never averages a pattern with the unstructured runs of the same method and sparsity."""
    out = []
    for r in runs:
        pat = pattern_of(r)
        out.append({**r, "code": r["method"], "method": f"{r['method']} {pat}"} if pat else r)
    return out


def recipe(run: dict) -> str:
    """Short hash of what a comparison must hold equal: model, data and training recipe (not seed, not method)."""
    cfg = json.loads(run["config"])
    blob = json.dumps({k: cfg.get(k) for k in ("model", "data", "train")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def split_level_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(IMP runs, reported level by level; every other run)."""
    return [r for r in runs if r["method"] in IMP_CODES], [r for r in runs if r["method"] not in IMP_CODES]


def with_levels(store: Store, runs: list[dict]) -> list[dict]:
    """IMP runs as :mod:`.imp_report` reads them: each with its ``recipe`` and its ``levels`` rows."""
    return [{**r, "recipe": recipe(r), "levels": store.levels(r["run_id"])} for r in runs]


def aggregate(runs: list[dict], metric: str = "test_acc") -> dict[tuple, dict]:
    """``{(model, dataset, recipe, method, sparsity): {"mean", "std", "n", "values"}}`` of a metric over seeds
    (in %). Runs with a different model, data or training recipe are never averaged together."""
    col = metric_column(metric)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        v = value(r, col)
        if v is None:
            continue
        groups[(r["model"], r["dataset"], recipe(r), r["method"], round(r["sparsity"], 10))].append(100.0 * v)
    return {key: {**stats(vals), "values": vals} for key, vals in groups.items()}
