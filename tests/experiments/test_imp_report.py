"""IMP level reports: per-level tables, epoch savings vs lth (same levels and at equal density), plots, errors."""
import math
import os
import re
from statistics import fmean, stdev

import pytest

from prunekit.errors import PrunekitError
from prunekit.experiments.imp_report import (imp_report, level_table, plot_accuracy, plot_epochs, savings,
                                             savings_table)

PNG = b"\x89PNG\r\n\x1a\n"

# (method, seed) -> per-level densities, epochs, final test accuracies; giap has one level fewer than the others
SPEC = {
    ("lth", 0): ([1.0, 0.8, 0.64, 0.512], [10, 10, 10, 10], [0.980, 0.979, 0.977, 0.975]),
    ("lth", 1): ([1.0, 0.8, 0.64, 0.512], [12, 8, 10, 10], [0.982, 0.978, 0.976, 0.971]),
    ("sap", 0): ([1.0, 0.90, 0.75, 0.70], [10, 6, 5, 4], [0.980, 0.981, 0.978, 0.976]),
    ("sap", 1): ([1.0, 0.88, 0.74, 0.72], [12, 7, 5, 3], [0.982, 0.980, 0.979, 0.974]),
    ("giap", 0): ([1.0, 0.40, 0.30], [10, 5, 4], [0.980, 0.970, 0.965]),
    ("giap", 1): ([1.0, 0.42, 0.30], [12, 6, 2], [0.982, 0.972, 0.961]),
}


def make_run(method, seed, densities, epochs, accs, recipe="r1", controls=False):
    rows = []
    for k, (d, e, a) in enumerate(zip(densities, epochs, accs)):
        rows.append({"level": k, "branch": "main", "density": d, "kept": round(1000 * d), "total": 1000,
                     "epochs": e, "seconds": 1.5 * e, "check_seconds": 0.1, "stop_reason": "budget",
                     "best_val_acc": a + 0.001, "test_acc_at_best_val": a - 0.001, "final_val_acc": a,
                     "final_test_acc": a, "early_stop_epoch": None, "early_stop_test_acc": None})
        if controls and k:
            rows.append(dict(rows[-1], branch="control_reinit", final_test_acc=a - 0.05))
    return {"run_id": f"{method}{seed}" + "0" * 30, "method": method, "seed": seed, "model": "lenet_300_100",
            "dataset": "mnist", "recipe": recipe, "levels": rows}


@pytest.fixture
def runs():
    return [make_run(m, s, *spec) for (m, s), spec in SPEC.items()]


def cells(table: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first`` (cells are separated by 2+ spaces)."""
    for line in table.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in\n{table}")


def pm(values):
    return f"{fmean(values):.2f} ± {stdev(values):.2f}"


def test_level_table_means_and_stds(runs):
    text = level_table(runs)
    head = cells(text, "level")
    assert [h.split()[0] for h in head[1::3]] == ["lth", "sap", "giap"]  # method order lth, sap, ciap, giap
    row = cells(text, "2")
    col = {h: i for i, h in enumerate(head)}
    sap = [SPEC[("sap", s)] for s in (0, 1)]
    assert row[col["sap acc%"]] == pm([100 * r[2][2] for r in sap])
    assert row[col["sap epochs"]] == pm([r[1][2] for r in sap])
    assert row[col["sap dens%"]] == f"{fmean(100 * r[0][2] for r in sap):.2f}"
    # giap has no level 3
    row3 = cells(text, "3")
    assert [row3[col[f"giap {c}"]] for c in ("dens%", "acc%", "epochs")] == ["-", "-", "-"]
    assert row3[col["lth acc%"]] == pm([100 * SPEC[("lth", s)][2][3] for s in (0, 1)])
    # totals: per-run sums, then mean ± std over seeds; final = last level of each run
    assert pm([sum(SPEC[("giap", s)][1]) for s in (0, 1)]) in cells(text, "total epochs")
    assert f"{fmean(1.5 * sum(SPEC[('sap', s)][1]) for s in (0, 1)):.1f}" in cells(text, "total seconds")
    assert pm([100 * SPEC[("giap", s)][2][-1] for s in (0, 1)]) in cells(text, "final")
    assert "lth 2, sap 2, giap 2" in text


def test_other_metric_and_unknown_metric(runs):
    text = level_table(runs, metric="best_val_acc")
    assert pm([100 * (SPEC[("lth", s)][2][0] + 0.001) for s in (0, 1)]) in cells(text, "0")
    with pytest.raises(PrunekitError, match=r"unknown IMP report metric 'final_acc'.*final_test_acc"):
        level_table(runs, metric="final_acc")


def test_savings_same_levels(runs):
    rows = {r["method"]: r for r in savings(runs)}
    assert set(rows) == {"sap", "giap"} and all(r["baseline"] == "lth" for r in rows.values())
    lth_epochs = [SPEC[("lth", s)][1] for s in (0, 1)]
    for m in ("sap", "giap"):
        ep = [SPEC[(m, s)][1] for s in (0, 1)]
        n = len(ep[0])
        expected = 1 - sum(map(sum, ep)) / sum(sum(e[:n]) for e in lth_epochs)
        assert rows[m]["epochs_saved_pct"] == pytest.approx(100 * expected)
        assert rows[m]["epoch_ratio"] == pytest.approx(1 - expected)
        acc = fmean(100 * SPEC[(m, s)][2][-1] for s in (0, 1)) - fmean(100 * SPEC[("lth", s)][2][-1] for s in (0, 1))
        assert rows[m]["acc_diff"] == pytest.approx(acc)
    assert rows["giap"]["levels"] == 3 and rows["sap"]["levels"] == 4


def test_savings_equal_density_interpolates_in_log_density(runs):
    sap = {r["method"]: r for r in savings(runs)}["sap"]
    d = fmean(100 * SPEC[("sap", s)][0][-1] for s in (0, 1))  # 71%, between lth levels 1 (80%) and 2 (64%)
    assert sap["final_density"] == pytest.approx(d)
    t = (math.log(80) - math.log(d)) / (math.log(80) - math.log(64))
    cum = {k: fmean(sum(SPEC[("lth", s)][1][:k + 1]) for s in (0, 1)) for k in (1, 2)}
    acc = {k: fmean(100 * SPEC[("lth", s)][2][k] for s in (0, 1)) for k in (1, 2)}
    lth_ep = cum[1] + t * (cum[2] - cum[1])
    assert sap["lth_epochs_at_density"] == pytest.approx(lth_ep)
    assert sap["lth_epochs_at_density"] != pytest.approx(cum[1] + (80 - d) / 16 * (cum[2] - cum[1]))  # not linear
    assert sap["lth_acc_at_density"] == pytest.approx(acc[1] + t * (acc[2] - acc[1]))
    sap_total = fmean(sum(SPEC[("sap", s)][1]) for s in (0, 1))
    assert sap["epochs_saved_pct_at_density"] == pytest.approx(100 * (1 - sap_total / lth_ep))
    assert sap["acc_diff_at_density"] == pytest.approx(sap["final_acc"] - sap["lth_acc_at_density"])
    assert sap["note"] is None


def test_savings_out_of_range_density_gives_none_and_note(runs):
    giap = {r["method"]: r for r in savings(runs)}["giap"]
    assert giap["final_density"] == pytest.approx(30.0)
    for k in ("lth_epochs_at_density", "epoch_ratio_at_density", "epochs_saved_pct_at_density",
              "lth_acc_at_density", "acc_diff_at_density"):
        assert giap[k] is None
    assert "30.00%" in giap["note"] and "below lth's lowest density 51.20%" in giap["note"]
    assert giap["epochs_saved_pct"] is not None  # the same-levels comparison still holds
    text = savings_table(runs)
    assert "note (giap):" in text and cells(text, "giap")[-1] == "-"


def test_savings_method_deeper_than_lth():
    runs = [make_run("lth", 0, [1.0, 0.8], [10, 10], [0.98, 0.97]),
            make_run("sap", 0, [1.0, 0.9, 0.85], [10, 5, 5], [0.98, 0.98, 0.97])]
    (row,) = savings(runs)
    assert row["lth_epochs"] is None and row["epochs_saved_pct"] is None
    assert "no same-levels epoch comparison" in row["note"]
    assert row["lth_epochs_at_density"] is not None  # 85% lies inside lth's 100..80%


def test_recipes_are_not_averaged_and_controls_table(runs):
    other = make_run("lth", 5, [1.0, 0.5], [3, 3], [0.5, 0.4], recipe="r2", controls=True)
    text = level_table(runs + [other])
    assert text.count("[recipe r1]") == 1 and text.count("[recipe r2]") == 1
    block = text.split("\n\n")[-1]
    assert "control branches" in block and "lth control_reinit" in block
    assert cells(block, "1")[-1] == f"{100 * (0.4 - 0.05):.2f} ± 0.00"
    assert len([r for r in savings(runs + [other]) if r["recipe"] == "r2"]) == 0


def test_plots_are_png_written_atomically(runs, tmp_path):
    two_groups = runs + [make_run("lth", 0, [1.0, 0.5], [3, 3], [0.5, 0.4], recipe="r2")]
    a = plot_accuracy(two_groups, tmp_path / "acc.png", title="t")
    e = plot_epochs(runs, tmp_path / "sub" / "ep.png")
    for p in (a, e):
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    assert sorted(os.listdir(tmp_path)) == ["acc.png", "sub"] and os.listdir(tmp_path / "sub") == ["ep.png"]


def test_imp_report_writes_plots_and_names_them(runs, tmp_path):
    text = imp_report(runs, plot_dir=tmp_path, name="lenet")
    assert "total epochs" in text and "saved %" in text
    for f in ("lenet_accuracy.png", "lenet_epochs.png"):
        assert str(tmp_path / f) in text and (tmp_path / f).read_bytes()[:8] == PNG
    assert sorted(os.listdir(tmp_path)) == ["lenet_accuracy.png", "lenet_epochs.png"]


def test_missing_levels_raise(runs, tmp_path):
    with pytest.raises(PrunekitError, match="no runs to report"):
        level_table([])
    bare = dict(make_run("magnitude", 3, [], [], []), run_id="deadbeefcafe")
    only_controls = make_run("lth", 7, [1.0, 0.8], [1, 1], [0.9, 0.9])
    only_controls["levels"] = [dict(r, branch="control_reinit") for r in only_controls["levels"]]
    for fn in (level_table, savings, lambda r: plot_epochs(r, tmp_path / "x.png")):
        with pytest.raises(PrunekitError) as e:
            fn(runs + [bare, only_controls])
        msg = str(e.value)
        assert "2 of 8 run(s) have no IMP levels" in msg
        assert "deadbeef (magnitude, seed 3)" in msg and "(lth, seed 7)" in msg
        assert "lth, sap, ciap, giap" in msg
    assert not os.listdir(tmp_path)
    broken = make_run("lth", 0, [1.0], [1], [0.9])
    del broken["levels"][0]["epochs"]
    with pytest.raises(PrunekitError, match="level 0 lacks epochs"):
        level_table([broken])


def test_commensurate_smallest_within_delta(runs):
    from prunekit.experiments.imp_report import commensurate, commensurate_table

    rows = {(r["method"], r["delta"]): r for r in commensurate(runs, deltas=(0.0, 0.005, 0.02))}
    # lth level means: acc 98.10, 97.85, 97.65, 97.30; densities 100, 80, 64, 51.2 (%)
    ref = fmean([98.0, 98.2])
    assert rows[("lth", 0.0)]["level"] == 0 and rows[("lth", 0.0)]["prune_ratio"] == pytest.approx(0.0)
    assert rows[("lth", 0.005)]["level"] == 2  # 97.65 >= 98.10 - 0.5, 97.30 is not
    assert rows[("lth", 0.005)]["diff"] == pytest.approx(fmean([97.7, 97.6]) - ref)
    assert rows[("lth", 0.02)]["density"] == pytest.approx(51.2)
    # sap level 1 mean 98.05 >= 98.10 - 0.5 but level 2 (97.85) also qualifies and is smaller
    assert rows[("sap", 0.005)]["level"] == 2
    assert "PR%" in commensurate_table(runs)


def test_flow_table_means_first_and_last_checks(runs):
    from prunekit.experiments.imp_report import flow_table

    assert flow_table(runs) == ""  # no checks logged
    for r in runs:
        for row in r["levels"]:
            if row["level"] == 1:
                row["checks"] = [{"d_if": 0.1 * (1 + r["seed"]), "d_gf": 0.5}, {"d_if": 0.2, "d_gf": 0.25}]
    text = flow_table(runs)
    assert "0.1500→0.2000" in text and "0.5000→0.2500" in text
