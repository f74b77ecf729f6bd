"""Tables and plots of iterative-magnitude-pruning (IMP) runs, level by level.

Input: a list of run dicts, one per (method, seed), each with ``model``, ``dataset``, ``recipe``, ``method``
(``lth``, ``sap``, ``ciap``, ``giap``), ``seed``, an optional display ``label`` (default: the method) and
``levels``, one row per trained level (``level``, ``branch``, ``density``, ``epochs``, ``seconds``,
``check_seconds``, accuracies, ...). Runs are grouped by (model, dataset, recipe) and never averaged across groups;
within a group, runs with the same label are the seeds of one method.

- :func:`level_table`: per group, one row per level and, per method, density %, accuracy % and epochs (mean ± std
  over seeds), then totals (epochs, seconds, final density and accuracy). Control branches get a small table.
- :func:`savings` / :func:`savings_table`: each method against the ``lth`` baseline of its group, both for the same
  number of levels and at equal final sparsity (lth interpolated linearly in log(density)).
- :func:`plot_accuracy` / :func:`plot_epochs`: PNG or PDF plots, one subplot per group, written by
  :func:`.figures.finish`; :func:`plot_levels` writes both.
- :func:`imp_report`: the tables, and the two plots when a folder is given.
"""
from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import PrunekitError, unknown
from ..families.imp.codes import IMP_CODES
from . import figures
from .figures import Panel
from .tables import delta_rows, group_title, mean_std, number, stats, text_table

IMP_METHODS = IMP_CODES
METRICS = ("final_test_acc", "test_acc_at_best_val", "best_val_acc")
_ROW_KEYS = ("level", "density", "epochs", "seconds")

Group = tuple  # (model, dataset, recipe)
Stats = dict  # {"mean", "std", "n"}


# ---------------------------------------------------------------------------------------------------- collecting


def _name(run: dict) -> str:
    rid = str(run.get("run_id", ""))[:8] or "?"
    return f"{rid} ({run.get('method', '?')}, seed {run.get('seed', '?')})"


def _main_rows(run: dict) -> list[dict]:
    return sorted((r for r in run.get("levels") or () if r.get("branch", "main") == "main"), key=lambda r: r["level"])


def _collect(runs: list[dict], metric: str) -> dict[Group, dict[str, list[dict]]]:
    """``{(model, dataset, recipe): {label: [run, ...]}}``, after checking the metric and every run's levels."""
    if metric not in METRICS:
        raise unknown("IMP report metric", metric, METRICS)
    if not runs:
        raise PrunekitError("no runs to report: pass the records of IMP runs (methods " + ", ".join(IMP_METHODS)
                            + "), whose 'levels' hold one row per pruning level")
    lacking = [r for r in runs if not _main_rows(r)]
    if lacking:
        names = ", ".join(_name(r) for r in lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise PrunekitError(f"{len(lacking)} of {len(runs)} run(s) have no IMP levels: {names}; per-level records "
                            f"come from an IMP method ({', '.join(IMP_METHODS)}): run one of those, or leave the "
                            "other runs out of the report")
    groups: dict[Group, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for row in _main_rows(r):
            missing = [k for k in _ROW_KEYS + (metric,) if row.get(k) is None]
            if missing:
                raise PrunekitError(f"run {_name(r)} level {row.get('level')} lacks {', '.join(missing)}: "
                                    "every main level row needs level, density, epochs, seconds and the metric")
        key = (r.get("model", "?"), r.get("dataset", "?"), str(r.get("recipe", "")))
        groups[key][r.get("label") or r["method"]].append(r)
    return {k: dict(v) for k, v in sorted(groups.items())}


def _order(labels: dict[str, list[dict]]) -> list[str]:
    """Labels in method order lth, sap, ciap, giap, then the others alphabetically."""
    def key(lab: str) -> tuple:
        m = labels[lab][0]["method"]
        return (IMP_METHODS.index(m) if m in IMP_METHODS else len(IMP_METHODS), m if m not in IMP_METHODS else "", lab)
    return sorted(labels, key=key)


def _per_level(runs: list[dict], metric: str) -> dict[int, dict[str, Stats]]:
    """``{level: {"density", "acc", "epochs", "cum_epochs"}}`` over the seeds that reached the level (% for density
    and accuracy; ``cum_epochs`` counts every epoch through that level)."""
    vals: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cum = 0.0
        for row in _main_rows(r):
            cum += row["epochs"]
            v = vals[row["level"]]
            v["density"].append(100.0 * row["density"])
            v["acc"].append(100.0 * row[metric])
            v["epochs"].append(float(row["epochs"]))
            v["cum_epochs"].append(cum)
    return {k: {name: stats(x) for name, x in v.items()} for k, v in sorted(vals.items())}


def _totals(runs: list[dict], metric: str) -> dict[str, Stats]:
    """Per-run totals over the main levels, as stats over seeds: epochs, seconds, check seconds, levels, and the
    last level's density and accuracy (%)."""
    per_run = [_main_rows(r) for r in runs]
    return {
        "epochs": stats([float(sum(row["epochs"] for row in rows)) for rows in per_run]),
        "seconds": stats([float(sum(row["seconds"] for row in rows)) for rows in per_run]),
        "check_seconds": stats([float(sum(row.get("check_seconds") or 0.0 for row in rows)) for rows in per_run]),
        "levels": stats([float(len(rows)) for rows in per_run]),
        "density": stats([100.0 * rows[-1]["density"] for rows in per_run]),
        "acc": stats([100.0 * rows[-1][metric] for rows in per_run]),
    }


# ---------------------------------------------------------------------------------------------------- tables


def level_table(runs: list[dict], metric: str = "final_test_acc") -> str:
    """A text table per (model, dataset, recipe): one row per level; per method density % (mean), ``metric`` %
    and epochs (mean ± std over seeds, ``-`` where the method has no such level); then total epochs (mean ± std),
    total training and stop-check seconds (mean) and the final level's density and accuracy. Control branches
    (``control_reinit`` / ``control_random_prune``) follow in a small table of their own."""
    blocks = []
    for group, labels in _collect(runs, metric).items():
        order = _order(labels)
        curves = {lab: _per_level(labels[lab], metric) for lab in order}
        totals = {lab: _totals(labels[lab], metric) for lab in order}
        head = ["level"] + [f"{lab} {col}" for lab in order for col in ("dens%", "acc%", "epochs")]
        rows = _level_rows(order, curves) + _total_rows(order, totals)
        seeds = ", ".join(f"{lab} {len(labels[lab])}" for lab in order)
        table = text_table([head] + rows, strip=True)  # blank total cells
        lines = [group_title(group, f"{metric} (%) per IMP level, mean ± std over seeds ({seeds})"), table]
        controls = _controls_table(labels, order, metric)
        if controls:
            lines += ["", controls]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _level_rows(order: list[str], curves: dict[str, dict[int, dict[str, Stats]]]) -> list[list[str]]:
    """One row per level: per method its density %, accuracy and epochs (``-`` where it has no such level)."""
    rows = []
    for k in sorted({k for c in curves.values() for k in c}):
        row = [str(k)]
        for lab in order:
            s = curves[lab].get(k)
            row += (["-"] * 3 if s is None
                    else [f"{s['density']['mean']:.2f}", mean_std(s["acc"]), mean_std(s["epochs"])])
        rows.append(row)
    return rows


def _total_rows(order: list[str], totals: dict[str, dict[str, Stats]]) -> list[list[str]]:
    """The totals under the level rows: epochs, training and stop-check seconds, the final density and accuracy."""
    cells = {"total epochs": lambda t: ("", "", mean_std(t["epochs"])),
             "total seconds": lambda t: ("", "", f"{t['seconds']['mean']:.1f}"),
             "check seconds": lambda t: ("", "", f"{t['check_seconds']['mean']:.1f}"),
             "final": lambda t: (f"{t['density']['mean']:.2f}", mean_std(t["acc"]), "")}
    return [[name] + [c for lab in order for c in cell(totals[lab])] for name, cell in cells.items()]


def _controls_table(labels: dict[str, list[dict]], order: list[str], metric: str) -> str:
    """Accuracy of the non-main branches per level (mean ± std over seeds), or '' when there are none."""
    vals: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for lab in order:
        for r in labels[lab]:
            for row in r.get("levels") or ():
                if row.get("branch", "main") != "main" and row.get(metric) is not None:
                    vals[(lab, row["branch"])][row["level"]].append(100.0 * row[metric])
    if not vals:
        return ""
    cols = sorted(vals, key=lambda c: (order.index(c[0]), c[1]))
    rows = [["level"] + [f"{lab} {branch}" for lab, branch in cols]]
    for k in sorted({k for v in vals.values() for k in v}):
        rows.append([str(k)] + [mean_std(stats(vals[c][k])) if vals[c].get(k) else "-" for c in cols])
    return f"control branches: {metric} (%), mean ± std over seeds\n" + text_table(rows)


def _interp_log_density(points: list[tuple[float, float]], density: float) -> float | None:
    """``value`` at ``density`` from ``(density, value)`` points, linear in log(density); None outside their range."""
    pts = sorted(points, reverse=True)
    if not pts or density > pts[0][0] * (1 + 1e-9) or density < pts[-1][0] * (1 - 1e-9):
        return None
    for (d0, v0), (d1, v1) in zip(pts, pts[1:]):
        if d1 <= density <= d0 and d0 > d1:
            t = (math.log(d0) - math.log(density)) / (math.log(d0) - math.log(d1))
            return v0 + t * (v1 - v0)
    return min(pts, key=lambda p: abs(p[0] - density))[1]  # at an end point (within rounding) or a single point


def savings(runs: list[dict], metric: str = "final_test_acc") -> list[dict]:
    """Each non-lth method against each ``lth`` baseline of its (model, dataset, recipe) group.

    Keys: ``model``, ``dataset``, ``recipe``, ``method`` (the label), ``baseline``, ``seeds``, ``levels`` (mean
    number of levels), ``epochs`` (mean total), ``lth_epochs`` (lth's mean cumulative epochs through the same last
    level), ``epoch_ratio``, ``epochs_saved_pct`` (100 · (1 - ratio)), ``final_acc``, ``lth_final_acc``,
    ``acc_diff`` (points, method minus lth, each the mean over seeds of the last level's ``metric``),
    ``final_density`` (% remaining, mean over seeds) and, at that density with lth interpolated linearly in
    log(density): ``lth_epochs_at_density``, ``epoch_ratio_at_density``, ``epochs_saved_pct_at_density``,
    ``lth_acc_at_density``, ``acc_diff_at_density``. Comparisons lth cannot support are None and ``note`` says why
    (otherwise ``note`` is None).
    """
    out = []
    for group, labels in _collect(runs, metric).items():
        order = _order(labels)
        baselines = [lab for lab in order if labels[lab][0]["method"] == "lth"]
        for base in baselines:
            curve = _per_level(labels[base], metric)
            base_tot = _totals(labels[base], metric)
            for lab in order:
                if lab in baselines:
                    continue
                out.append(_compare(group, lab, labels[lab], base, curve, base_tot, metric))
    return out


def _compare(group: Group, lab: str, runs: list[dict], base: str, curve: dict[int, dict[str, Stats]],
             base_tot: dict[str, Stats], metric: str) -> dict:
    tot = _totals(runs, metric)
    notes = []
    last_levels = [_main_rows(r)[-1]["level"] for r in runs]
    if all(k in curve for k in last_levels):
        lth_epochs = statistics.fmean(curve[k]["cum_epochs"]["mean"] for k in last_levels)
    else:
        lth_epochs = None
        notes.append(f"{base} stops at level {max(curve)} but {lab} reaches level {max(last_levels)}: "
                     "no same-levels epoch comparison")
    density = tot["density"]["mean"]
    dens_pts = [(s["density"]["mean"], s) for s in curve.values()]
    lth_ep_d = _interp_log_density([(d, s["cum_epochs"]["mean"]) for d, s in dens_pts], density)
    lth_acc_d = _interp_log_density([(d, s["acc"]["mean"]) for d, s in dens_pts], density)
    if lth_ep_d is None:
        lo, hi = min(d for d, _ in dens_pts), max(d for d, _ in dens_pts)
        where = f"below {base}'s lowest density {lo:.2f}%" if density < lo else f"above {base}'s highest {hi:.2f}%"
        notes.append(f"{lab}'s final density {density:.2f}% is {where}: no equal-sparsity comparison")
    epochs = tot["epochs"]["mean"]

    def ratio(ref: float | None) -> float | None:
        return epochs / ref if ref else None

    return {
        "model": group[0], "dataset": group[1], "recipe": group[2], "method": lab, "baseline": base,
        "seeds": len(runs), "levels": tot["levels"]["mean"], "epochs": epochs, "lth_epochs": lth_epochs,
        "epoch_ratio": ratio(lth_epochs),
        "epochs_saved_pct": None if ratio(lth_epochs) is None else 100.0 * (1.0 - ratio(lth_epochs)),
        "final_acc": tot["acc"]["mean"], "lth_final_acc": base_tot["acc"]["mean"],
        "acc_diff": tot["acc"]["mean"] - base_tot["acc"]["mean"],
        "final_density": density, "lth_epochs_at_density": lth_ep_d, "epoch_ratio_at_density": ratio(lth_ep_d),
        "epochs_saved_pct_at_density": None if ratio(lth_ep_d) is None else 100.0 * (1.0 - ratio(lth_ep_d)),
        "lth_acc_at_density": lth_acc_d,
        "acc_diff_at_density": None if lth_acc_d is None else tot["acc"]["mean"] - lth_acc_d,
        "note": "; ".join(notes) or None,
    }


def savings_table(runs: list[dict], metric: str = "final_test_acc") -> str:
    """:func:`savings` as text: one table per group and baseline, notes underneath."""
    rows = savings(runs, metric)
    if not rows:
        return "(no savings to show: they need lth runs and another method in the same model/dataset/recipe group)"

    head = ["method", "levels", "epochs", "lth epochs", "saved %", "Δacc", "dens%", "lth epochs@dens",
            "saved %@dens", "lth acc@dens", "Δacc@dens"]
    blocks = []
    for key in dict.fromkeys((r["model"], r["dataset"], r["recipe"], r["baseline"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["dataset"], r["recipe"], r["baseline"]) == key]
        f = number
        body = [[r["method"], f(r["levels"], "g"), f(r["epochs"], ".1f"), f(r["lth_epochs"], ".1f"),
                 f(r["epochs_saved_pct"], ".1f"), f(r["acc_diff"], "+.2f"), f(r["final_density"]),
                 f(r["lth_epochs_at_density"], ".1f"), f(r["epochs_saved_pct_at_density"], ".1f"),
                 f(r["lth_acc_at_density"]), f(r["acc_diff_at_density"], "+.2f")] for r in sel]
        what = (f"epochs and {metric} vs {key[3]}, same levels and at equal final density (lth interpolated in "
                "log density); Δacc in points, method minus lth")
        lines = [group_title(key[:3], what), text_table([head] + body)]
        lines += [f"note ({r['method']}): {r['note']}" for r in sel if r["note"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------- plots


def _figure(groups: dict[Group, dict[str, list[dict]]]):
    """(figure, axes, colors): one subplot per group, two per row, and one color per label across groups."""
    labels = list(dict.fromkeys(lab for labs in groups.values() for lab in _order(labs)))
    fig, axes = figures.figure(len(groups), size=(6.5, 4.2), dpi=110, ncols=2)
    return fig, axes, dict(zip(labels, figures.palette(len(labels))))


def _panel_title(group: Group) -> str:
    return f"{group[0]} / {group[1]} [{group[2]}]"


def plot_accuracy(runs: list[dict], path: str | Path, metric: str = "final_test_acc", title: str | None = None) -> Path:
    """``metric`` (%) vs remaining weights (%, log axis, 100 on the left) per method: mean line, ± std band over
    seeds, and the dense level-0 accuracy as a dashed line; one subplot per (model, dataset, recipe)."""
    groups = _collect(runs, metric)
    fig, axes, colors = _figure(groups)
    for ax, labels in zip(axes, groups.values()):
        lowest = 100.0
        for lab in _order(labels):
            st = _per_level(labels[lab], metric).values()
            xs = [s["density"]["mean"] for s in st]
            ys = [s["acc"]["mean"] for s in st]
            sd = [s["acc"]["std"] for s in st]
            lowest = min(lowest, *xs)
            ax.plot(xs, ys, marker="o", ms=3, color=colors[lab], label=lab)
            ax.fill_between(xs, [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)],
                            color=colors[lab], alpha=0.2, lw=0)
        dense = [100.0 * row[metric] for runs_ in labels.values() for r in runs_ for row in _main_rows(r)
                 if row["level"] == 0]
        if dense:
            figures.reference_line(ax, statistics.fmean(dense), "dense (level 0)")
        ax.set_xscale("log")
        lo, hi = min(1.0, lowest) / 1.15, 100.0 * 1.15
        ax.set_xlim(hi, lo)  # decreasing left to right
        figures.log_ticks(ax, [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01) if lo <= t <= hi])
    panels = [Panel(ax, "remaining weights (%)", f"{metric} (%)", title=_panel_title(group), title_size="medium",
                    legend="small") for ax, group in zip(axes, groups)]
    return figures.finish(fig, path, panels, suptitle=title)


def plot_epochs(runs: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Epochs trained per IMP level (mean ± std over seeds as error bars), grouped bars per method; one subplot per
    (model, dataset, recipe)."""
    groups = _collect(runs, METRICS[0])
    fig, axes, colors = _figure(groups)
    for ax, labels in zip(axes, groups.values()):
        order = _order(labels)
        width = 0.8 / len(order)
        levels: set[int] = set()
        for i, lab in enumerate(order):
            st = _per_level(labels[lab], METRICS[0])
            levels |= set(st)
            ax.bar([k + (i - (len(order) - 1) / 2) * width for k in st], [s["epochs"]["mean"] for s in st.values()],
                   width, yerr=[s["epochs"]["std"] for s in st.values()], capsize=2, color=colors[lab], label=lab)
        ax.set_xticks(sorted(levels))
    panels = [Panel(ax, "IMP level", "epochs trained", title=_panel_title(group), title_size="medium", grid="y",
                    legend="small") for ax, group in zip(axes, groups)]
    return figures.finish(fig, path, panels, suptitle=title)


def plot_levels(runs: list[dict], folder: str | Path, stem: str, metric: str = "final_test_acc",
                title: str | None = None, ext: str = "png") -> list[Path]:
    """:func:`plot_accuracy` and :func:`plot_epochs` as ``<stem>_accuracy.<ext>`` and ``<stem>_epochs.<ext>`` in
    ``folder``."""
    folder = Path(folder)
    return [plot_accuracy(runs, folder / f"{stem}_accuracy.{ext}", metric, title=title),
            plot_epochs(runs, folder / f"{stem}_epochs.{ext}", title=title)]


def _checked(runs: list[dict]) -> list[dict]:
    """The main level rows of ``runs`` that logged stop checks."""
    return [row for r in runs for row in _main_rows(r) if row.get("checks")]


def _first_last(rows: list[dict], key: str) -> str:
    """``first→last``: a stop-check distance at the first and at the last check of the levels ``rows``, mean
    over seeds; ``-`` when not logged."""
    first = [row["checks"][0][key] for row in rows if row["checks"][0].get(key) is not None]
    last = [row["checks"][-1][key] for row in rows if row["checks"][-1].get(key) is not None]
    return f"{statistics.fmean(first):.4f}→{statistics.fmean(last):.4f}" if first and last else "-"


def flow_table(runs: list[dict]) -> str:
    """The logged stop-check distances, to calibrate ``epsilon``: per level and method, the IF and GF distance to
    the dense reference at the first and at the last check of the level (mean over seeds). Empty when no run
    logged checks."""
    blocks = []
    for group, labels in _collect(runs, "final_test_acc").items():
        checked = {lab: _checked(labels[lab]) for lab in _order(labels)}
        order = [lab for lab, rows in checked.items() if rows]
        if not order:
            continue
        table = [["level"] + [f"{lab} {k}" for lab in order for k in ("IF first→last", "GF first→last")]]
        for k in sorted({row["level"] for lab in order for row in checked[lab]}):
            at_k = {lab: [row for row in checked[lab] if row["level"] == k] for lab in order}
            table.append([str(k)] + [_first_last(at_k[lab], key) for lab in order for key in ("d_if", "d_gf")])
        title = group_title(group, "stop-check distances to the dense network, mean over seeds")
        blocks.append(title + "\n" + text_table(table))
    return "\n\n".join(blocks)


DELTAS = (-0.01, -0.005, 0.0, 0.005, 0.01, 0.02, 0.05)


def commensurate(runs: list[dict], metric: str = "final_test_acc", deltas=DELTAS) -> list[dict]:
    """The seed-002 summary: for each δ, the smallest network whose error is within δ of the dense one.

    Per (group, method): the level means over seeds (as in :func:`level_table`); the reference is level 0 (dense).
    For each δ (a fraction: 0.005 = half a point), the level with the lowest mean density among those with mean
    accuracy >= reference - δ (i.e. error <= reference error + δ). Rows: ``method``, ``delta``, ``level``,
    ``density`` and ``prune_ratio`` (%), ``acc`` and ``diff`` (points, vs dense), or None where no level qualifies.
    """
    out = []
    for group, labels in _collect(runs, metric).items():
        for lab in _order(labels):
            curve = _per_level(labels[lab], metric)
            if 0 not in curve:
                continue
            ref = curve[0]["acc"]["mean"]
            for d in deltas:
                ok = [(v["density"]["mean"], k) for k, v in curve.items() if v["acc"]["mean"] >= ref - 100.0 * d]
                row = {"group": group, "method": lab, "delta": d, "level": None, "density": None,
                       "prune_ratio": None, "acc": None, "diff": None}
                if ok:
                    dens, k = min(ok)
                    acc = curve[k]["acc"]["mean"]
                    row.update(level=k, density=dens, prune_ratio=100.0 - dens, acc=acc, diff=acc - ref)
                out.append(row)
    return out


def _pr_cell(rows: list[dict], method: str, delta: float) -> str:
    """``<prune ratio>  <Δacc>`` of ``method`` at ``delta`` in :func:`commensurate` rows, ``-`` if no level."""
    r = next(x for x in rows if x["method"] == method and x["delta"] == delta)
    return "-" if r["level"] is None else f"{r['prune_ratio']:.2f}  {r['diff']:+.2f}"


def commensurate_table(runs: list[dict], metric: str = "final_test_acc", deltas=DELTAS) -> str:
    """:func:`commensurate` as text: one row per δ, per method the prune ratio % and the accuracy difference."""
    rows = commensurate(runs, metric, deltas)
    blocks = []
    for group in dict.fromkeys(r["group"] for r in rows):
        sub = [r for r in rows if r["group"] == group]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        table = delta_rows(deltas, methods, "PR%  Δacc", functools.partial(_pr_cell, sub))
        title = group_title(group, f"smallest network within δ of the dense {metric} (PR = % of weights removed)")
        blocks.append(title + "\n" + text_table(table))
    return "\n\n".join(blocks)


def imp_report(runs: list[dict], metric: str = "final_test_acc", plot_dir: str | Path | None = None,
               name: str = "imp") -> str:
    """:func:`level_table` and :func:`savings_table`; with ``plot_dir``, also writes ``{name}_accuracy.png`` and
    ``{name}_epochs.png`` there and names them at the end."""
    parts = [level_table(runs, metric), commensurate_table(runs, metric), savings_table(runs, metric),
             flow_table(runs)]
    text = "\n\n".join(p for p in parts if p)
    if plot_dir is not None:
        acc, ep = plot_levels(runs, plot_dir, name, metric, title=name)
        text += f"\n\nplots: {acc}\n       {ep}"
    return text
