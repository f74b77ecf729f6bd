"""Tables and plots from the results store.

The table follows the seeds' layout: one row per sparsity, one column per method, each cell the mean ± std over
seeds of a metric (test accuracy in %, final epoch by default), the best of each row marked with ``*``. The dense
baseline (``none``) is shown in its own row.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from pathlib import Path

from .store import Store

METRICS = {
    "test_acc": "final_test_acc",
    "final_test_acc": "final_test_acc",
    "best_val_test_acc": "test_acc_at_best_val",
    "test_acc_at_best_val": "test_acc_at_best_val",
    "best_val_acc": "best_val_acc",
    "test_acc_before_finetune": "test_acc_before_finetune",  # right after pruning (from the run record)
    "val_acc_before_finetune": "val_acc_before_finetune",
}


def split_level_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(IMP runs, reported level by level; every other run)."""
    from ..criteria.iterative import IMP_CODES

    return [r for r in runs if r["method"] in IMP_CODES], [r for r in runs if r["method"] not in IMP_CODES]


def _value(run: dict, col: str):
    """A metric of a stored run: a column of the runs table, or a field of its JSON record."""
    if col in run:
        return run[col]
    rec = run.get("record")
    return json.loads(rec).get(col) if rec else None


def _metric_column(metric: str) -> str:
    from ..errors import unknown

    if metric not in METRICS:
        raise unknown("report metric", metric, METRICS)
    return METRICS[metric]


def recipe(run: dict) -> str:
    """Short hash of what a comparison must hold equal: model, data and training recipe (not seed, not method)."""
    cfg = json.loads(run["config"])
    blob = json.dumps({k: cfg.get(k) for k in ("model", "data", "train")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def aggregate(runs: list[dict], metric: str = "test_acc") -> dict[tuple, dict]:
    """``{(model, dataset, recipe, method, sparsity): {"mean", "std", "n", "values"}}`` of a metric over seeds
    (in %). Runs with a different model, data or training recipe are never averaged together."""
    col = _metric_column(metric)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        v = _value(r, col)
        if v is None:
            continue
        groups[(r["model"], r["dataset"], recipe(r), r["method"], round(r["sparsity"], 10))].append(100.0 * v)
    out = {}
    for key, vals in groups.items():
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals), "values": vals}
    return out


def table_rows(runs: list[dict], metric: str = "test_acc") -> list[dict]:
    """The seed-style tables as data, one block per (model, dataset, recipe): ``title``, ``dense`` (the dense
    baseline, formatted, or None), ``head``, ``rows`` (cells are (text, value) pairs; value None for "—") and
    ``best`` ((row, column) of each row's best mean)."""
    agg = aggregate(runs, metric)
    blocks = []
    keys = sorted({k[:3] for k in agg})
    for md in keys:
        cells = {k[3:]: v for k, v in agg.items() if k[:3] == md}
        methods = sorted({m for m, _ in cells if m != "none"}, key=_method_order)
        sparsities = sorted({s for m, s in cells if m != "none"})
        rows, best = [], set()
        for i, s in enumerate(sparsities):
            vals = {m: cells.get((m, s)) for m in methods}
            top = max((v["mean"] for v in vals.values() if v), default=None)
            row = [(f"{s:g}", s)]
            for j, m in enumerate(methods, start=1):
                v = vals[m]
                row.append(("—", None) if v is None else (_fmt(v), v["mean"]))
                if v is not None and len(methods) > 1 and v["mean"] == top:
                    best.add((i, j))
            rows.append(row)
        n_seeds = sorted({v["n"] for v in cells.values()})
        title = f"{md[0]} on {md[1]}: {metric} (%), mean ± std over {'/'.join(map(str, n_seeds))} seed(s)"
        if sum(1 for k in keys if k[:2] == md[:2]) > 1:
            title += f" [training recipe {md[2]}]"
        dense = _fmt(cells[("none", 0.0)]) if ("none", 0.0) in cells else None
        blocks.append({"title": title, "dense": dense, "head": ["sparsity"] + methods, "rows": rows, "best": best,
                       "methods": methods})
    return blocks


def table(runs: list[dict], metric: str = "test_acc") -> str:
    """A text table per (model, dataset): sparsity rows x method columns, mean ± std over seeds."""
    blocks = table_rows(runs, metric)
    if not blocks:
        return "(no finished runs)"
    out = []
    for b in blocks:
        lines = [b["title"]]
        if b["dense"] is not None:
            lines.append(f"dense (none): {b['dense']}")
        if b["rows"]:
            rows = [[text + ("*" if (i, j) in b["best"] else "") for j, (text, _v) in enumerate(row)]
                    for i, row in enumerate(b["rows"])]
            lines.append(_render([b["head"]] + rows))
            if len(b["methods"]) > 1:
                lines.append("* = best in its row")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _method_order(m: str) -> tuple:
    first = {"random": 0, "magnitude": 1}
    return (first.get(m, 2), m)


def _fmt(v: dict) -> str:
    return f"{v['mean']:.2f} ± {v['std']:.2f}"


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Accuracy vs remaining weights (log axis) per method, seed std as error bars; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    agg = aggregate(runs, metric)
    groups = sorted({k[:3] for k in agg})  # (model, dataset, recipe): never one curve across them
    curves = sorted({(k[:3], k[3]) for k in agg if k[3] != "none"}, key=lambda c: (c[0], _method_order(c[1])))
    fig, ax = plt.subplots(figsize=(6 + (2 if len(curves) > 4 else 0), 4), dpi=120)
    colors = plt.cm.tab10.colors if len(curves) <= 10 else plt.cm.tab20.colors
    markers = "osD^vP*Xhp<>"
    for i, (g, m) in enumerate(curves):
        pts = sorted(((1.0 - k[4], v) for k, v in agg.items() if k[:3] == g and k[3] == m), key=lambda t: t[0])
        xs = [100 * d for d, _ in pts]
        label = m if len(groups) == 1 else f"{m} ({g[0]}, {g[2]})"
        ax.errorbar(xs, [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts], marker=markers[i % len(markers)],
                    color=colors[i % len(colors)], capsize=3, label=label)
    for g in groups:
        if g + ("none", 0.0) in agg:
            label = "dense" if len(groups) == 1 else f"dense ({g[0]}, {g[2]})"
            ax.axhline(agg[g + ("none", 0.0)]["mean"], color="k", ls="--", lw=1, label=label)
    methods = curves
    ax.set_xscale("log")
    ticks = sorted({100 * (1.0 - k[4]) for k in agg if k[3] != "none"})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("remaining weights (%)")
    return _save_figure(fig, plt, path, title, ax, f"{metric} (%)", len(methods))


def _save_figure(fig, plt, path, title, ax, ylabel: str | None = None, n_curves: int = 0) -> Path:
    """Y label, grid and legend (outside the axes beyond 4 curves), title, tight layout, and an atomic write
    (temporary file renamed into place)."""
    if ylabel is not None:
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if n_curves > 4:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        else:
            ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_speedup(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Accuracy vs theoretical speedup (dense MACs / masked or shrunk MACs, log axis) per method: one point per
    (method, sparsity), mean over seeds with std error bars in both directions; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = _metric_column(metric)
    pts: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        v, sp = _value(r, col), _value(r, "theoretical_speedup")
        if v is None or sp is None:
            continue
        pts[(r["model"], recipe(r), r["method"], round(r["sparsity"], 10))].append((sp, 100.0 * v))
    groups = sorted({k[:2] for k in pts})
    curves = sorted({(k[:2], k[2]) for k in pts if k[2] != "none"}, key=lambda c: (c[0], _method_order(c[1])))
    fig, ax = plt.subplots(figsize=(6 + (2 if len(curves) > 4 else 0), 4), dpi=120)
    colors = plt.cm.tab10.colors if len(curves) <= 10 else plt.cm.tab20.colors
    for i, (g, m) in enumerate(curves):
        rows = sorted((statistics.fmean(x for x, _ in v), statistics.fmean(y for _, y in v),
                       statistics.pstdev([x for x, _ in v]), statistics.pstdev([y for _, y in v]))
                      for k, v in pts.items() if k[:2] == g and k[2] == m)
        label = m if len(groups) == 1 else f"{m} ({g[0]}, {g[1]})"
        ax.errorbar([r[0] for r in rows], [r[1] for r in rows], xerr=[r[2] for r in rows],
                    yerr=[r[3] for r in rows], marker="o", color=colors[i % len(colors)], capsize=3, label=label)
    for g in groups:
        dense = [y for k, v in pts.items() if k[:2] == g and k[2] == "none" for _, y in v]
        if dense:
            label = "dense" if len(groups) == 1 else f"dense ({g[0]}, {g[1]})"
            ax.axhline(statistics.fmean(dense), color="k", ls="--", lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("theoretical speedup (dense MACs / pruned MACs)")
    return _save_figure(fig, plt, path, title, ax, f"{metric} (%)", len(curves))


def plot_layers(store: Store, run_id: str, path: str | Path, title: str | None = None) -> Path:
    """Per-layer density of one run's final masks (bars in forward order), with the global density as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import PrunekitError

    rows = store.layers(run_id)
    if not rows:
        raise PrunekitError(f"run {run_id!r} has no per-layer rows in the store (unknown id, or not finished)")
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 4), dpi=120)
    ax.bar(range(len(rows)), [100 * r["density"] for r in rows], color="tab:blue")
    kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
    ax.axhline(100 * kept / max(total, 1), color="k", ls="--", lw=1, label=f"global {100 * kept / max(total, 1):.2f}%")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, ha="right", fontsize="small")
    ax.set_xlabel("")
    return _save_figure(fig, plt, path, title or f"run {run_id}: per-layer density", ax, "remaining weights (%)", 1)


def fairness_notes(runs: list[dict], tol: float = 0.005) -> str:
    """What makes a comparison unequal, said next to the tables: runs whose achieved sparsity misses the requested
    one by more than ``tol`` of the requested kept fraction, and models trained with more than one recipe (their
    tables are separate and must not be compared). Empty when there is nothing to say."""
    lines = []
    for r in runs:
        req, got = r.get("sparsity"), r.get("achieved_sparsity")
        if r["method"] == "none" or req is None or got is None:
            continue
        if abs(got - req) > tol * max(1.0 - req, 1e-12):
            lines.append(f"  {r['run_id']} {r['method']} seed {r['seed']}: requested sparsity {req:g}, achieved "
                         f"{got:.5f}")
    out = []
    if lines:
        out.append(f"sparsity check: {len(lines)} run(s) miss the requested sparsity by more than {100 * tol:g}% "
                   "of the kept weights\n" + "\n".join(lines))
    recipes: dict[tuple, set] = defaultdict(set)
    for r in runs:
        recipes[(r["model"], r["dataset"])].add(recipe(r))
    for (model, ds), rs in sorted(recipes.items()):
        if len(rs) > 1:
            out.append(f"budget check: {model} on {ds} was trained with {len(rs)} different recipes "
                       f"({', '.join(sorted(rs))}); their tables are separate and not comparable")
    return "\n".join(out)


def within_delta_table(runs: list[dict], metric: str = "test_acc", deltas=(0.0, 0.005, 0.01, 0.02)) -> str:
    """Seed 002's summary for one-shot/retrain runs: per method, the highest sparsity whose mean ``metric`` is at
    least the dense run's (method ``none``, same model, data and recipe) minus δ, with its accuracy difference.
    Empty when there is no dense run to compare with."""
    agg = aggregate(runs, metric)
    dense = {k[:3]: v["mean"] for k, v in agg.items() if k[3] == "none"}
    blocks = []
    for key3, ref in dense.items():
        methods = sorted({k[3] for k in agg if k[:3] == key3 and k[3] != "none"}, key=_method_order)
        if not methods:
            continue
        rows = [["δ (points)"] + [f"{m} sparsity  Δacc" for m in methods]]
        for d in deltas:
            line = [f"{100 * d:+.1f}"]
            for m in methods:
                ok = [(k[4], v["mean"]) for k, v in agg.items() if k[:3] == key3 and k[3] == m
                      and v["mean"] >= ref - 100 * d]
                line.append("-" if not ok else "{:g}  {:+.2f}".format(*(lambda t: (t[0], t[1] - ref))(max(ok))))
            rows.append(line)
        blocks.append(f"{key3[0]} on {key3[1]} [recipe {key3[2]}]: highest sparsity within δ of dense "
                      f"({ref:.2f}%)\n" + _render(rows))
    return "\n\n".join(blocks)


def structured_rows(runs: list[dict]) -> dict | None:
    """Physical size and speed of structured runs (those whose record has ``structured``) as data: ``head`` and
    ``rows`` per model, method and sparsity: the shrunk model's parameters and MACs as % of dense, the theoretical
    speedup, and the measured latency speedup over the dense model at each batch size (means over seeds)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        st = _value(r, "structured")
        if st:
            groups[(r["model"], r["dataset"], r["method"], round(r["sparsity"], 10))].append(st)
    if not groups:
        return None
    sizes = sorted({row["batch_size"] for v in groups.values() for st in v for row in st["latency"]})
    head = ["model", "method", "sparsity", "params %", "MACs %", "theory x"] + [f"b{b} x" for b in sizes] + ["device"]
    rows = []
    for (model, _ds, method, sp), sts in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_order(kv[0][2]),
                                                                              kv[0][3])):
        params = 100 * statistics.fmean(st["params_ratio"] for st in sts)
        macs = 100 * statistics.fmean(st["macs_ratio"] for st in sts)
        theory = statistics.fmean(st["theoretical_speedup"] for st in sts)
        line = [model, method, (f"{sp:g}", sp), (f"{params:.1f}", params), (f"{macs:.1f}", macs),
                (f"{theory:.2f}", theory)]
        for bs in sizes:
            v = [row["speedup"] for st in sts for row in st["latency"] if row["model"] == "shrunk"
                 and row["batch_size"] == bs]
            line.append((f"{statistics.fmean(v):.2f}", statistics.fmean(v)) if v else ("-", None))
        line.append(sts[0].get("device", "?"))
        rows.append(line)
    return {"head": head, "rows": rows}


def structured_table(runs: list[dict]) -> str:
    """:func:`structured_rows` as text (empty if there are no structured runs)."""
    st = structured_rows(runs)
    if st is None:
        return ""
    rows = [[c[0] if isinstance(c, tuple) else c for c in row] for row in st["rows"]]
    return ("structured runs: the shrunk model vs the dense one (params and MACs in % of dense; speedups measured "
            "in the run, median latency, dense / shrunk)\n" + _render([st["head"]] + rows))


def render_texts(store: Store, runs: list[dict], metric: str = "test_acc") -> list[tuple[str, str]]:
    """The report's text-only sections as (name, text): the within-δ summary, the fairness notes and the IMP
    level report (no plots)."""
    from .imp_report import imp_report

    imp, other = split_level_runs(runs)
    out = [(name, text) for name, text in (("Highest sparsity within δ of dense", within_delta_table(other, metric)),
                                           ("Fairness checks", fairness_notes(other))) if text]
    if imp:
        rows = [{**r, "recipe": recipe(r), "levels": store.levels(r["run_id"])} for r in imp]
        out.append(("Iterative pruning levels", imp_report(rows, _metric_column(metric))))
    return out


def render(store: Store, runs: list[dict], metric: str = "test_acc", plot_path: str | Path | None = None,
           title: str | None = None) -> tuple[str, list[Path]]:
    """The report of ``runs``: the sparsity x method table of one-shot and gradual runs, and the level-by-level
    tables of IMP runs (:mod:`.imp_report`); with ``plot_path``, the plot of the former at that path and the IMP
    plots beside it (``<stem>_accuracy.png``, ``<stem>_epochs.png``). Returns (text, plot paths)."""
    from .imp_report import imp_report

    col = _metric_column(metric)
    imp, other = split_level_runs(runs)
    parts, plots = [], []
    if other or not imp:
        parts.append(table(other, metric))
        parts += [t for t in (within_delta_table(other, metric), structured_table(other), fairness_notes(other)) if t]
        if plot_path is not None and other:
            plots.append(plot(other, plot_path, metric, title=title))
            if any(_value(r, "theoretical_speedup") for r in other):
                sp = Path(plot_path)
                plots.append(plot_speedup(other, sp.with_name(f"{sp.stem}_speedup{sp.suffix}"), metric, title=title))
    if imp:
        rows = [{**r, "recipe": recipe(r), "levels": store.levels(r["run_id"])} for r in imp]
        plot_dir = Path(plot_path).parent if plot_path is not None else None
        stem = Path(plot_path).stem if plot_path is not None else "imp"
        parts.append(imp_report(rows, col, plot_dir=plot_dir, name=stem))
        if plot_dir is not None:
            plots += [plot_dir / f"{stem}_accuracy.png", plot_dir / f"{stem}_epochs.png"]
    return "\n\n".join(parts), plots


def report(root: str | Path = "runs", name: str | None = None, metric: str = "test_acc",
           plot_path: str | Path | None = None) -> str:
    """The text table of the store under ``root`` (optionally one experiment), and a plot when asked."""
    from ..errors import PrunekitError

    path = Path(root) / "results.sqlite"
    if not path.exists():
        raise PrunekitError(f"no results store at {path}: run an experiment first (prunekit run CONFIG)")
    with Store(path, readonly=True) as store:  # reading only: works on a store this user may not write
        if name is not None and name not in store.experiment_names():
            from ..errors import unknown

            raise unknown("experiment", name, store.experiment_names())
        runs = store.runs(name=name)
        text, _ = render(store, runs, metric, plot_path, title=name)
    return text
