"""`prunekit run|sweep --dry-run`: every run of the grid with its id and its status in the store, nothing run or
written; and `prunekit run` going through the sweep's grid executor in its own process."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from prunekit.cli import main
from prunekit.experiments import Store, config as C
from prunekit.experiments.runner import hardware, versions
from prunekit.experiments.store import INTERRUPTED
from prunekit.experiments.sweep import sweep, sweep_runs

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"name": "dr", "model": "lenet_300_100", "data": {"name": "synthetic"},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
        "prune": {"method": "magnitude", "sparsity": 0.8}, "seed": 0}
ROW = re.compile(r"^([0-9a-f]{16})\s+(\S+)\s+(\S+)\s+(\d+)\s+(\S+)\s*(.*)$")


def _config(tmp_path: Path, name: str = "grid.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**copy.deepcopy(BASE), **sections}))
    return path


def _with_dense_start(tmp_path: Path, **sections) -> Path:
    """A grid config whose runs start from the dense run of the same recipe (model.pretrained)."""
    dense = _config(tmp_path, "dense.yaml", prune={"method": "none"})
    return _config(tmp_path, model={"name": "lenet_300_100", "pretrained": str(dense)}, **sections)


def _listing(capsys, argv: list[str]) -> tuple[list[tuple[str, ...]], str]:
    """(rows (run id, method, sparsity, seed, status, note), last line) of a --dry-run."""
    assert main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return [m.groups() for m in map(ROW.match, out) if m], out[-1]


def _ids(data: dict, baselines: bool = True) -> list[str]:
    return list(dict.fromkeys(C.run_id(C.resolve(r)) for r in sweep_runs(data, baselines)))


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_listed_ids_are_the_cells_run_ids_and_what_the_sweep_then_stores(tmp_path, capsys):
    path = _with_dense_start(tmp_path, grid={"prune.method": ["random"], "prune.sparsity": [0.5, 0.8]})
    data = C.load(path)
    root = tmp_path / "runs"
    rows, last = _listing(capsys, ["sweep", str(path), "--root", str(root)])
    start = C.resolve(C.expand(data)[0])["model"]["pretrained"]["run_id"]
    cells = _ids(data)
    assert [r[0] for r in rows] == [start] + cells  # the starting point first, then every cell in grid order
    assert len(cells) == 4 and all(r[4] == "new" for r in rows)
    assert rows[0][5] == "starting point" and rows[0][1] == "none"
    assert [(r[1], r[2], r[3], r[5]) for r in rows[1:]] == [
        ("random", "0.5", "0", ""), ("random", "0.8", "0", ""), ("magnitude", "0.5", "0", "baseline"),
        ("magnitude", "0.8", "0", "baseline")]
    assert last == "5 run(s): 0 done, 0 running, 0 failed, 0 interrupted, 5 new"
    assert not root.exists()

    res = sweep(data, root, workers=1, log=lambda m: None)
    assert res.ok and sorted(res.done) == sorted(cells)
    with Store(root / "results.sqlite") as s:
        assert {r["run_id"] for r in s.runs(status=None)} == {r[0] for r in rows}
    rows, last = _listing(capsys, ["sweep", str(path), "--root", str(root)])
    assert [r[0] for r in rows] == [start] + cells and {r[4] for r in rows} == {"done"}
    assert last == "5 run(s): 5 done, 0 running, 0 failed, 0 interrupted, 0 new"


def test_statuses_after_a_partial_sweep(tmp_path, capsys):
    nodata = str(tmp_path / "nodata")
    first = {"data.name": ["synthetic", "cifar10"], "prune.sparsity": [0.5]}  # no CIFAR here: that run fails
    assert not sweep({**BASE, "grid": first}, tmp_path / "runs", workers=1, data_dir=nodata, log=lambda m: None).ok
    path = _config(tmp_path, grid={"data.name": ["synthetic", "cifar10"], "prune.sparsity": [0.5, 0.6, 0.7]})
    data = C.load(path)
    runs = C.expand(data)  # synthetic 0.5, 0.6, 0.7, cifar10 0.5, 0.6, 0.7
    ids = [C.run_id(C.resolve(r)) for r in runs]
    argv = ["sweep", str(path), "--root", str(tmp_path / "runs"), "--no-baselines"]
    expected = list(zip(ids, ["done", "running", "interrupted", "failed", "new", "new"]))
    with Store(tmp_path / "runs" / "results.sqlite") as s:  # one run going on, one stopped by Ctrl-C
        s.begin_run(ids[1], "dr", C.resolve(runs[1]), versions(), hardware("cpu"))
        s.begin_run(ids[2], "dr", C.resolve(runs[2]), versions(), hardware("cpu"))
        s.fail_run(ids[2], INTERRUPTED)
        live, _ = _listing(capsys, argv)  # read while a writer has the store open
    assert [(r[0], r[4]) for r in live] == expected
    rows, last = _listing(capsys, argv)
    assert rows == live
    assert last == "6 run(s): 1 done, 1 running, 1 failed, 1 interrupted, 2 new"
    run_rows, run_last = _listing(capsys, ["run", str(path), "--root", str(tmp_path / "runs")])
    assert run_rows == rows and run_last == last


def test_dry_run_writes_nothing(tmp_path, capsys):
    path = _with_dense_start(tmp_path, grid={"prune.method": ["random"]})
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "a.yaml").write_text(path.read_text())
    root = tmp_path / "runs"
    commands = [["sweep", str(path)], ["run", str(path)], ["run", str(folder)]]
    for argv in commands:
        _listing(capsys, argv + ["--root", str(root)])
        assert not root.exists()  # no store, no run folder, not even the root
    sweep(C.load(path), root, workers=1, baselines=False, log=lambda m: None)
    before = _tree(root)
    assert "results.sqlite" in before and len([p for p in before if "/" not in p and before[p] is None]) == 2
    for argv in commands:
        rows, _ = _listing(capsys, argv + ["--root", str(root)])
        assert rows and _tree(root) == before


def test_run_and_sweep_list_the_same_runs_but_the_baselines(tmp_path, capsys):
    path = _with_dense_start(tmp_path, grid={"prune.method": ["snip", "random"], "seed": [0, 1]})
    root = ["--root", str(tmp_path / "runs")]
    run_rows, run_last = _listing(capsys, ["run", str(path)] + root)
    sweep_rows, _ = _listing(capsys, ["sweep", str(path)] + root)
    assert [r for r in sweep_rows if r[5] != "baseline"] == run_rows
    assert {r[1] for r in sweep_rows if r[5] == "baseline"} == {"magnitude"}
    assert len(sweep_rows) == len(run_rows) + 2
    assert _listing(capsys, ["sweep", str(path), "--no-baselines"] + root) == (run_rows, run_last)
    assert [r[0] for r in run_rows[1:]] == _ids(C.load(path), baselines=False)
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "grid.yaml").write_text(path.read_text())
    assert _listing(capsys, ["run", str(folder)] + root) == (run_rows, run_last)


def test_run_reports_every_run_in_grid_order_finished_ones_looked_up(tmp_path, capsys):
    path = _config(tmp_path, grid={"prune.sparsity": [0.5, 0.6, 0.7]})
    data = C.load(path)
    runs = C.expand(data)
    one = {**{k: v for k, v in data.items() if k != "grid"}, "grid": {"prune.sparsity": [0.6]}}
    assert sweep(one, tmp_path / "runs", workers=1, log=lambda m: None).ok
    ids = [C.run_id(C.resolve(r)) for r in runs]
    with Store(tmp_path / "runs" / "results.sqlite") as s:  # a run that failed before is run again by `run`
        s.begin_run(ids[2], "dr", C.resolve(runs[2]), versions(), hardware("cpu"))
        s.fail_run(ids[2], "RuntimeError: boom")
    assert main(["run", str(path), "--root", str(tmp_path / "runs"), "--no-report"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"dr: 3 run(s) -> {tmp_path / 'runs'}/"
    lines = [e for e in err if re.match(r"\[\d/3\]", e)]
    assert [line[:5] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "sparsity 0.5 " in lines[0] and "already done" not in lines[0]
    assert "sparsity 0.6 " in lines[1] and lines[1].endswith("already done)")
    assert "sparsity 0.7 " in lines[2] and "already done" not in lines[2]
    assert next(e for e in err if e.startswith("[")).startswith(f"[{ids[0]}]")  # the runner's own line first
    with Store(tmp_path / "runs" / "results.sqlite") as s:
        assert [s.status(rid) for rid in ids] == ["done"] * 3


def test_an_unusable_store_is_one_line_naming_it(tmp_path, capsys):
    path = _config(tmp_path, grid={"prune.sparsity": [0.5, 0.8]})
    root = tmp_path / "runs"
    root.mkdir()
    (root / "results.sqlite").write_text("my notes, not a database\n" * 40)
    assert main(["sweep", str(path), "--root", str(root), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"prunekit: error: {root / 'results.sqlite'} is not a prunekit results store (file is not a "
                    "database): move it aside or point --root elsewhere")]
    assert sorted(p.name for p in root.iterdir()) == ["results.sqlite"]
