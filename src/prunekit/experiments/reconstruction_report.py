"""The report of runs that measured their reconstruction (``prune.reconstruction``): how much of the model each
method keeps right after a one-shot pruning, and after the fine-tuning that follows.

For each model, dataset and training recipe, four tables with one row per method and one column per pattern
(unstructured at its sparsity, or N:M), each cell the mean ± std over seeds:

- layer error: the mean over the pruned layers of ‖(W − Ŵ)X̂‖² / ‖WX̂‖² on the held-out samples
  (:mod:`prunekit.families.layerwise.reconstruction`);
- output error: ‖f(x) − f̂(x)‖² / ‖f(x)‖² of the model's output on the same samples;
- test accuracy (%) right after pruning (``test_acc_before_finetune``) and after fine-tuning (``final_test_acc``).

The starting model's own test accuracy (the run named by ``model.pretrained``, from the same store) heads the
group when the store holds it.
"""
from __future__ import annotations

import json
from collections import defaultdict

from .store import Store
from .summary import pattern_of, recipe, value
from .tables import MISSING, mean_std, method_order, stats, text_table

__all__ = ["reconstruction_data", "reconstruction_report"]

#: (title, how to read it from a run) of the four tables.
_QUANTITIES = (
    ("mean layer error ‖(W−Ŵ)X̂‖²/‖WX̂‖²", lambda r: _rec(r).get("mean"), 1.0),
    ("output error ‖f−f̂‖²/‖f‖²", lambda r: _rec(r).get("output"), 1.0),
    ("test accuracy (%) right after pruning", lambda r: value(r, "test_acc_before_finetune"), 100.0),
    ("test accuracy (%) after fine-tuning", lambda r: value(r, "final_test_acc"), 100.0),
)


def _rec(run: dict) -> dict:
    return value(run, "reconstruction") or {}


def _column(run: dict) -> str:
    pat = pattern_of(run)
    return pat if pat else f"{run['sparsity']:g} unstructured"


def _start(run: dict) -> str | None:
    pre = json.loads(run["config"]).get("model", {}).get("pretrained")
    return pre.get("run_id") if isinstance(pre, dict) else None


def reconstruction_data(store: Store, runs: list[dict]) -> list[dict]:
    """One dict per (model, dataset, recipe) with runs that measured their reconstruction: ``model``,
    ``dataset``, ``recipe``, ``start`` (the starting run's test accuracy in %, or None), ``samples``,
    ``methods``, ``columns`` and ``cells`` ({(table index, method, column): stats})."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if _rec(r):
            groups[(r["model"], r["dataset"], recipe(r))].append(r)
    out = []
    for (model, dataset, rcp), rs in sorted(groups.items()):
        vals: dict[tuple, list[float]] = defaultdict(list)
        for r in rs:
            method = r.get("code", r["method"])
            for i, (_, read, scale) in enumerate(_QUANTITIES):
                v = read(r)
                if v is not None:
                    vals[(i, method, _column(r))].append(scale * v)
        starts = {s for r in rs if (s := _start(r)) is not None}
        start = None
        if len(starts) == 1:
            rec = store.record(next(iter(starts)))
            if rec is not None and rec.get("final_test_acc") is not None:
                start = 100.0 * rec["final_test_acc"]
        columns = sorted({c for _, _, c in vals}, key=lambda c: (":" in c, c))
        out.append({"model": model, "dataset": dataset, "recipe": rcp, "start": start,
                    "samples": sorted({_rec(r).get("samples") for r in rs}),
                    "methods": sorted({m for _, m, _ in vals}, key=method_order), "columns": columns,
                    "cells": {k: stats(v) for k, v in vals.items()}})
    return out


def _cell(v: dict | None, scale: float) -> str:
    if v is None:
        return MISSING
    return mean_std(v) if scale != 1.0 else f"{v['mean']:.4f} ± {v['std']:.4f}"


def reconstruction_report(store: Store, runs: list[dict]) -> str:
    """The reconstruction tables of ``runs`` (empty when none measured it)."""
    out = []
    for d in reconstruction_data(store, runs):
        head = (f"{d['model']} on {d['dataset']} [recipe {d['recipe']}]: one-shot pruning, mean ± std over seeds; "
                f"errors on {', '.join(str(n) for n in d['samples'])} held-out samples")
        if d["start"] is not None:
            head += f"; the starting model: {d['start']:.2f}% test accuracy"
        lines = [head]
        for i, (title, _, scale) in enumerate(_QUANTITIES):
            rows = [[title] + d["columns"]]
            rows += [[m] + [_cell(d["cells"].get((i, m, c)), scale) for c in d["columns"]] for m in d["methods"]]
            lines.append(text_table(rows))
        out.append("\n".join(lines))
    return "\n\n".join(out)
