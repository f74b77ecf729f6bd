"""The downstream report of runs that start from published weights (``model.pretrained: {source: hf | zoo}``):
seed 004's question, whether a pruned pretrained backbone still transfers.

For each dataset and training recipe (the same fine-tuning or linear probe for every run; ``init`` aside):

- the dense pretrained model fine-tuned that way, and the same network trained from scratch (``init: random``), so
  the table shows what pretraining is worth;
- accuracy vs sparsity per method (mean ± std over seeds), pretrained backbones;
- the fine-tuning epochs each method needs to come within ``gap`` (default 1 point) of the dense pretrained
  model's mean accuracy: per seed the first epoch whose test accuracy reaches it, averaged over the seeds that do
  (``k/n`` says how many seeds reached it when not all did; ``-`` when none did).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from .store import Store
from .summary import metric_column, value
from .tables import MISSING, mean_std, method_order, stats, text_table

__all__ = ["is_downstream", "downstream_data", "downstream_report"]


def _pretrained(run: dict) -> dict | None:
    pre = json.loads(run["config"]).get("model", {}).get("pretrained")
    return pre if isinstance(pre, dict) and pre.get("source") in ("hf", "zoo") else None


def is_downstream(run: dict) -> bool:
    """Whether ``run`` starts from published weights (or is their from-scratch reference)."""
    return _pretrained(run) is not None


def _group(run: dict) -> tuple[str, str]:
    """(dataset, recipe): what every run of one comparison holds equal, the weights' init aside."""
    cfg = json.loads(run["config"])
    model = json.loads(json.dumps(cfg.get("model", {})))
    pre = model.get("pretrained", {})
    for k in ("init", "sha256", "folder"):  # the scratch reference is the same network, freshly initialised
        pre.pop(k, None)
    blob = json.dumps({"model": model, "data": cfg.get("data"), "train": cfg.get("train")}, sort_keys=True)
    return run["dataset"], f"{run['model']} [{hashlib.sha256(blob.encode()).hexdigest()[:8]}]"


def _init(run: dict) -> str:
    return (_pretrained(run) or {}).get("init", "pretrained")


def _first_epoch(epochs: list[dict], target: float) -> int | None:
    """The first epoch (1-based) whose test accuracy (%) reaches ``target``."""
    for row in sorted(epochs, key=lambda r: r["epoch"]):
        if row.get("test_acc") is not None and 100.0 * row["test_acc"] >= target - 1e-9:
            return int(row["epoch"]) + 1
    return None


def downstream_data(store: Store, runs: list[dict], metric: str = "test_acc", gap: float = 1.0) -> list[dict]:
    """The downstream comparisons as data, one dict per (dataset, model recipe): ``dataset``, ``model``,
    ``dense`` / ``scratch`` (:func:`~.tables.stats` of the dense pretrained and from-scratch accuracies in %, or
    None), ``methods``, ``sparsities``, ``acc`` ({(method, sparsity): stats}), ``target`` (dense mean - gap, or
    None) and ``epochs`` ({(method, sparsity): (mean first epoch reaching target or None, seeds reaching it,
    seeds)})."""
    col = metric_column(metric)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if is_downstream(r):
            groups[_group(r)].append(r)
    out = []
    for (dataset, model), rs in sorted(groups.items()):
        acc: dict[tuple, list[float]] = defaultdict(list)
        for r in rs:
            v = value(r, col)
            if v is not None:
                acc[(_init(r), r["method"], round(r["sparsity"], 10))].append(100.0 * v)
        dense, scratch = acc.get(("pretrained", "none", 0.0)), acc.get(("random", "none", 0.0))
        keys = [(m, s) for i, m, s in acc if m != "none" and i == "pretrained"]
        item = {"dataset": dataset, "model": model, "dense": stats(dense) if dense else None,
                "scratch": stats(scratch) if scratch else None,
                "methods": sorted({m for m, _ in keys}, key=method_order), "sparsities": sorted({s for _, s in keys}),
                "acc": {k: stats(acc[("pretrained", *k)]) for k in keys}, "target": None, "epochs": {}}
        if dense:
            item["target"] = target = stats(dense)["mean"] - gap
            reached: dict[tuple, list] = defaultdict(list)
            for r in rs:
                if _init(r) == "pretrained" and r["method"] != "none":
                    reached[(r["method"], round(r["sparsity"], 10))].append(
                        _first_epoch(store.epochs(r["run_id"]), target))
            for k, got in reached.items():
                ok = [e for e in got if e is not None]
                item["epochs"][k] = (sum(ok) / len(ok) if ok else None, len(ok), len(got))
        out.append(item)
    return out


def downstream_report(store: Store, runs: list[dict], metric: str = "test_acc", gap: float = 1.0) -> str:
    """The downstream tables of the runs in ``runs`` that start from published weights (empty when none do)."""
    out = []
    for d in downstream_data(store, runs, metric, gap):
        dense, scratch = d["dense"], d["scratch"]
        lines = [f"{d['model']} on {d['dataset']}: {metric} (%) after fine-tuning, mean ± std over seeds",
                 f"dense pretrained: {mean_std(dense) if dense else MISSING}   "
                 f"dense from scratch: {mean_std(scratch) if scratch else MISSING}"
                 + (f"   (pretraining is worth {dense['mean'] - scratch['mean']:+.2f} points)"
                    if dense and scratch else "")]
        methods, sparsities = d["methods"], d["sparsities"]
        if methods:
            rows = [["sparsity"] + methods]
            rows += [[f"{s:g}"] + [mean_std(d["acc"][(m, s)]) if (m, s) in d["acc"] else MISSING for m in methods]
                     for s in sparsities]
            lines.append(text_table(rows))
        if d["target"] is not None and methods:
            lines.append(f"fine-tuning epochs to reach dense - {gap:g} point(s) ({d['target']:.2f}%): mean over the "
                         "seeds that reach it (k/n: seeds that did)")
            rows = [["sparsity"] + methods]
            for s in sparsities:
                row = [f"{s:g}"]
                for m in methods:
                    mean, k, n = d["epochs"].get((m, s), (None, 0, 0))
                    row.append(MISSING if mean is None else f"{mean:.1f}" + ("" if k == n else f" ({k}/{n})"))
                rows.append(row)
            lines.append(text_table(rows))
        out.append("\n".join(lines))
    return "\n\n".join(out)
