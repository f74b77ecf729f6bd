"""Every config, command-line and results-store mistake is one line that names the problem and the fix, raised
before any work is done (issue 14, part 5): nothing is trained and no run folder or plot is written."""
import copy
import json
import os
from pathlib import Path

import pytest
import yaml

import prunekit as pk
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.experiments import Store, config as C, seed000
from prunekit.experiments.store import StoreError
from prunekit.experiments.sweep import sweep, sweep_runs
from tiny import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _cli_error(capsys, argv: list[str]) -> str:
    """The one-line error of a CLI call that must fail with status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("prunekit: error: ")
    return err[-1]


def _nothing_written(root: Path) -> None:
    assert not root.exists() or [p.name for p in root.iterdir()] in ([], ["results.sqlite"])


# ------------------------------------------------------------------------------------------------ 1. not UTF-8
def test_config_that_is_not_utf8_names_the_file_offset_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(tiny("t")).encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(pk.ConfigError) as e:
        C.load(path)
    msg = str(e.value)
    lines = path.read_bytes().count(b"\n")
    offset = path.read_bytes().index(b"\xe9")
    assert str(path) in msg and f"offset {offset}" in msg and f"line {lines}" in msg and "0xe9" in msg
    assert "save the file as UTF-8" in msg and "\n" not in msg
    root = tmp_path / "runs"
    line = _cli_error(capsys, ["run", str(path), "--root", str(root)])
    assert "not UTF-8" in line
    _nothing_written(root)
    bom = tmp_path / "bom.json"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(tiny("bom")).encode())
    assert C.load(bom)["name"] == "bom"


# ------------------------------------------------------------------------------------------ 2. syntax errors
def test_yaml_and_json_syntax_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nprune:\n  method: magnitude\n   sparsity: 0.5\n")
    with pytest.raises(pk.ConfigError) as e:
        C.load(bad)
    assert f"{bad}, line 4, column 12: not valid YAML: mapping values are not allowed here" in str(e.value)
    assert "fix the syntax there" in str(e.value) and "\n" not in str(e.value)
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: t\nmodel: [unclosed\n")
    with pytest.raises(pk.ConfigError, match=r"flow.yaml, line 3, column 1: not valid YAML: expected ',' or ']'.*"
                                             r"flow sequence that starts at line 2, column 8"):
        C.load(flow)
    tab = tmp_path / "tab.yaml"
    tab.write_text("name: t\ntrain:\n\tepochs: 1\n")
    with pytest.raises(pk.ConfigError, match=r"tab.yaml, line 3, column 1: .*spaces, not tabs"):
        C.load(tab)
    js = tmp_path / "bad.json"
    js.write_text('{"name": "t",\n "prune": {"method": "magnitude",}}\n')
    with pytest.raises(pk.ConfigError, match=r"bad.json, line 2, column 34: not valid JSON: Expecting property name"):
        C.load(js)


# ------------------------------------------------------------------------------------------ 3. duplicate keys
def test_duplicate_keys_are_rejected_with_both_lines(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: t\nmodel: lenet_300_100\ndata: synthetic\nprune:\n  method: magnitude\n  sparsity: 0.5\n"
                   "  scope: layer\n  sparsity: 0.9\n")
    with pytest.raises(pk.ConfigError) as e:
        C.load(dup)
    assert f"{dup}: key 'sparsity' is given twice (on lines 6 and 8)" in str(e.value)
    top = tmp_path / "top.yaml"
    top.write_text("name: t\nseed: 0\nseed: 1\n")
    with pytest.raises(pk.ConfigError, match=r"key 'seed' is given twice \(on lines 2 and 3\)"):
        C.load(top)
    root = tmp_path / "runs"
    assert "given twice" in _cli_error(capsys, ["run", str(dup), "--root", str(root)])
    _nothing_written(root)
    # a merge (<<: *anchor) may be overridden, as YAML allows; otherwise safe_load's result
    merge = tmp_path / "merge.yaml"
    merge.write_text("x: &p {method: magnitude, sparsity: 0.5}\nprune:\n  <<: *p\n  sparsity: 0.9\n")
    assert C.load(merge)["prune"] == {"method": "magnitude", "sparsity": 0.9}
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(tiny("ok", grid={"seed": [0, 1]})))
    assert C.load(ok) == yaml.safe_load(ok.read_text())
    js = tmp_path / "dup.json"
    js.write_text('{\n "name": "t",\n "prune": {"method": "magnitude",\n   "sparsity": 0.5,\n   "sparsity": 0.9}\n}\n')
    with pytest.raises(pk.ConfigError, match=r"dup.json: key 'sparsity' is given twice in 'prune' \(on lines 4 and 5\)"):
        C.load(js)
    with pytest.raises(pk.ConfigError, match="given twice"):  # --set values are YAML too
        C.apply_overrides(tiny("t"), ["prune={method: snip, method: grasp}"])


# ------------------------------------------------------------------------------------ 4. seed 000 unknown keys
SEED000 = json.loads((ROOT / "configs" / "seed000" / "lenet300_mnist_fts.json").read_text())


def test_seed000_unknown_key_is_an_error_with_a_suggestion_known_ones_stay_a_note(tmp_path, capsys):
    typo = copy.deepcopy(SEED000)
    typo["training"]["compressor"]["sparsty"] = 0.5
    with pytest.raises(pk.ConfigError) as e:
        C.expand(typo)
    assert "'training.compressor.sparsty' (did you mean 'sparsity'?)" in str(e.value)
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(typo))
    root = tmp_path / "runs"
    line = _cli_error(capsys, ["run", str(path), "--root", str(root)])
    assert str(path) in line and "training.compressor.sparsty" in line and "did you mean 'sparsity'" in line
    _nothing_written(root)
    for where, key, near in ((("general",), "seeed", "seed"), (("training", "optimizer"), "learnig_rate",
                                                                 "learning_rate"), ((), "validaton", "validation")):
        d = copy.deepcopy(SEED000)
        node = d
        for k in where:
            node = node[k]
        node[key] = 1
        with pytest.raises(pk.ConfigError, match=rf"{'.'.join(where + (key,))}' \(did you mean '{near}'\?\)"):
            seed000.notes(d)
    # the seed's own keys without a prunekit meaning are still only a note
    known = copy.deepcopy(SEED000)
    known["training"]["compressor"]["percentile"] = 3
    [note] = [n for n in seed000.notes(known) if n.startswith("keys with no prunekit meaning")]
    for key in ("general.description", "general.output_dir", "general.gpu.gpu_id", "training.compressor.percentile"):
        assert key in note
    assert C.resolve(C.expand(known)[0])["prune"]["sparsity"] == 0.98


# -------------------------------------------------------------------------------- 5. --set and experiment names
def test_set_without_a_key_and_names_that_are_paths(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tiny("t")))
    root = tmp_path / "runs"
    line = _cli_error(capsys, ["run", str(path), "--root", str(root), "--set", "=3"])
    assert "--set '=3' has no key before '='" in line and "KEY=VALUE" in line
    assert "empty part" in _cli_error(capsys, ["run", str(path), "--root", str(root), "--set", "train..epochs=3"])
    for name in ("../x", str(tmp_path / "abs"), ".hidden", "a b"):
        line = _cli_error(capsys, ["run", str(path), "--root", str(root), "--set", f"name={name}"])
        assert f"field 'name': {name!r}" in line and "letters, digits" in line
        line = _cli_error(capsys, ["sweep", str(path), "--root", str(root), "--workers", "1", "--set",
                                   f"name={name}"])
        assert f"field 'name': {name!r}" in line
    _nothing_written(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "t.yaml"] or not root.exists()
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "abs.png").exists()
    with pytest.raises(pk.ConfigError, match="path separator"):
        C.resolve(tiny("a/b"))
    assert C.resolve(tiny("mnist_pai-2.b"))["name"] == "mnist_pai-2.b"
    assert C.file_stem("../x") == "_._x" and C.file_stem(".h") == "_h" and C.file_stem("a/b") == "a_b"


def test_export_of_an_unsafe_stored_name_stays_in_its_folder(tmp_path):
    from prunekit.experiments import run
    from prunekit.experiments.export import export

    cfg = tiny("ok", train={"epochs": 0, "batch_size": 64, "progress": False},
               prune={"method": "magnitude", "sparsity": 0.5, "scope": "layer"})
    rec = run(cfg, tmp_path / "runs", log=lambda m: None)
    with Store(tmp_path / "runs" / "results.sqlite") as s:
        s.link("../../evil", rec.run_id)  # as an older prunekit, which did not check names, could have stored it
        written = export(s, tmp_path / "out" / "ex", name="../../evil")
    out = (tmp_path / "out" / "ex").resolve()
    assert written and all(Path(p).resolve().is_relative_to(out) for p in written)
    assert not list(tmp_path.glob("evil*")) and not list((tmp_path / "out").glob("evil*"))


# -------------------------------------------------------------------------------- 6. workers and empty grid axes
def test_workers_below_one_and_empty_grid_axes_are_rejected(tmp_path, capsys):
    grid = tiny("g", grid={"prune.method": ["snip"], "prune.sparsity": [0.5]})
    for workers in (0, -2):
        with pytest.raises(PrunekitError, match=rf"--workers must be a whole number >= 1.*got {workers}"):
            sweep(grid, tmp_path / "runs", workers=workers, log=lambda m: None)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    root = tmp_path / "runs"
    assert "--workers must be a whole number >= 1" in _cli_error(capsys, ["sweep", str(path), "--root", str(root),
                                                                          "--workers", "0"])
    line = _cli_error(capsys, ["sweep", str(path), "--root", str(root), "--workers", "1", "--set",
                               "grid.prune.method=[]"])
    assert "grid field 'prune.method' is an empty list" in line
    with pytest.raises(pk.ConfigError, match="grid field 'prune' is an empty list"):
        sweep_runs(tiny("g", grid={"prune": []}))
    with pytest.raises(pk.ConfigError, match="grid field 'seed' is an empty list"):
        C.expand(tiny("g", grid={"seed": []}))
    _nothing_written(root)


# ------------------------------------------------------------------------------------------ 7. the results store
def _store_with_rows(path: Path, n: int = 300) -> None:
    resolved = C.resolve(tiny("s"))
    with Store(path) as s:
        for i in range(n):
            s.begin_run(f"run{i:04d}", "s", resolved, {"v": "x" * 100}, {})


def test_junk_or_truncated_store_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tiny("t")))
    root = tmp_path / "runs"
    root.mkdir()
    (root / "results.sqlite").write_text("these are my notes, not a database\n" * 40)
    line = _cli_error(capsys, ["run", str(path), "--root", str(root)])
    assert f"{root / 'results.sqlite'} is not a prunekit results store (file is not a database): move it aside or " \
           "point --root elsewhere" in line
    assert sorted(p.name for p in root.iterdir()) == ["results.sqlite"]  # no run folder, no journal files
    assert "is not a prunekit results store" in _cli_error(capsys, ["report", "--root", str(root)])
    full = tmp_path / "full.sqlite"
    _store_with_rows(full)
    data = full.read_bytes()
    cut = tmp_path / "cut" / "results.sqlite"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=rf"{cut} is damaged \(database disk image is malformed.*restore it from a "
                                         "backup"):
        Store(cut)
    assert "is damaged" in _cli_error(capsys, ["report", "--root", str(cut.parent)])


def test_read_only_store_refuses_writes_up_front_and_reports_still_read_it(tmp_path, capsys, monkeypatch):
    from prunekit.experiments import store as store_mod
    from prunekit.experiments.report import report

    root = tmp_path / "runs"
    db = root / "results.sqlite"
    _store_with_rows(db, 3)
    before = db.read_bytes()
    real = os.access

    def access(p, mode, *a, **k):  # the tests may run as root, for whom chmod changes nothing
        if Path(p) == db and mode & os.W_OK:
            return False
        return real(p, mode, *a, **k)

    monkeypatch.setattr(store_mod.os, "access", access)
    with pytest.raises(StoreError) as e:
        Store(db)
    assert f"{db} cannot be written (the file is read-only)" in str(e.value)
    assert f"reports can still read it (prunekit report --root {root})" in str(e.value)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tiny("t")))
    assert "cannot be written" in _cli_error(capsys, ["run", str(path), "--root", str(root)])
    assert sorted(p.name for p in root.iterdir()) == ["results.sqlite"]
    assert "(no finished runs)" in report(root)  # opened with mode=ro
    with Store(db, readonly=True) as s:
        assert len(s.runs(status=None)) == 3
        with pytest.raises(StoreError, match="opened read-only"):
            s.link("x", "run0000")
    assert db.read_bytes() == before


def test_disk_full_while_writing_says_so_and_keeps_nothing_half_written(tmp_path):
    db = tmp_path / "results.sqlite"
    resolved = C.resolve(tiny("s"))
    with Store(db) as s:
        s.begin_run("r1", "s", resolved, {}, {})
        pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
        s._conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "database or disk is full" from here on
        layers = [{"layer": f"l{i}", "shape": "[300, 784]", "kept": 1, "total": 3, "density": 0.3} for i in range(2000)]
        with pytest.raises(StoreError) as e:
            s.finish_run("r1", {"final_test_acc": 0.5, "notes": "x" * 100_000}, layers)
        assert str(e.value).startswith(f"{db}: disk full") and "rolled back" in str(e.value)
        assert s.status("r1") == "running" and s.layers("r1") == []  # the transaction left nothing behind
        s._conn.execute(f"PRAGMA max_page_count={10 ** 6}")
        s.fail_run("r1", "boom")  # the store is usable again once there is room
        assert s.status("r1") == "failed"


# ---------------------------------------------------------------------------- 8. baselines of a method grid
WF = tiny("wf", prune={"method": "woodfisher", "sparsity": 0.8, "fisher_samples": 16, "fisher_batch": 4,
                       "fisher_damp": 1e-4, "scope": "layer", "exclude_output": True})


@pytest.mark.parametrize("grid", [{"prune.method": ["woodfisher"], "seed": [0, 1]},
                                  {"prune": [{"method": "woodfisher"}], "seed": [0, 1]},
                                  {"prune.fisher_samples": [16, 32], "prune.method": ["woodfisher"]}])
def test_sweep_baselines_get_only_the_shared_options(grid):
    cfg = {**WF, "grid": grid}
    plain = C.expand(cfg)
    [C.resolve(r) for r in plain]  # prunekit run accepts it
    cells = sweep_runs(cfg)
    resolved = [C.resolve(r) for r in cells]  # ... and so does the sweep, baselines included
    ids = {C.run_id(r) for r in resolved}
    assert {C.run_id(C.resolve(r)) for r in plain} <= ids  # the grid's own cells are unchanged
    for method in ("random", "magnitude"):
        got = {C.run_id(r) for r in resolved if r["prune"]["method"] == method}
        seeds = sorted({r["seed"] for r in resolved})
        by_hand = {C.run_id(C.resolve(tiny("wf", prune={"method": method, "sparsity": 0.8, "scope": "layer",
                                                         "exclude_output": True}, seed=s))) for s in seeds}
        assert got == by_hand and len(got) == len(seeds)
    assert len(ids) == len({C.run_id(C.resolve(r)) for r in plain}) + 2 * len(seeds)


def test_sweep_of_the_seed003_imagenet_config_expands_and_validates():
    data = C.load(ROOT / "configs" / "seed003" / "resnet50_imagenet_gradual.yaml")
    own = [C.run_id(C.resolve(r)) for r in C.expand(data)]
    assert own == ["b0460d79bc00473e", "cdf4ff608e3378d5", "df260e9c651c4a22", "f7b0de175a3ad01a"]  # unchanged
    cells = [C.resolve(r) for r in sweep_runs(data)]
    assert [C.run_id(r) for r in cells[:4]] == own
    assert sorted(r["prune"]["method"] for r in cells[4:]) == ["magnitude", "random"]
    assert all(r["prune"]["method_options"] == {} for r in cells[4:])


# ------------------------------------------------------------------------------------ 9. the dense baseline
def test_none_ignores_method_options_and_keeps_its_run_id():
    dense = C.load(ROOT / "configs" / "seed002" / "lenet300_mnist_dense.yaml")
    rid = "d9e1bf58695f8c8d"  # its run id before this change: stored runs keep theirs
    assert C.run_id(C.resolve(dense)) == rid
    noisy = copy.deepcopy(dense)
    noisy["prune"] = {"method": "none", "fisher_samples": 8, "scope": "not-a-scope", "rounds": 0, "sparsity": 0.9,
                      "warmup": 0}
    assert C.run_id(C.resolve(noisy)) == rid
    with pytest.raises(pk.ConfigError, match=r"unknown option 'fisher_sampels': no method has it \(did you mean "
                                             r"'fisher_samples'\?\)"):
        C.resolve({**dense, "prune": {"method": "none", "fisher_sampels": 8}})
    # a grid with the dense baseline and a method with its own options: `run` accepts it now
    grid = {**WF, "grid": {"prune.method": ["none", "woodfisher"]}}
    resolved = [C.resolve(r) for r in C.expand(grid)]
    assert resolved[0]["prune"]["method_options"] == {} and resolved[0]["prune"]["options"] == \
        C.resolve(tiny("wf", prune={"method": "none"}))["prune"]["options"]
