"""Experiments: config validation, grid expansion, run identity, the SQLite store, resume, CLI, quickstart."""
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml

from prunekit.checkpoint import load_checked
import prunekit as pk
from prunekit.cli import main
from prunekit.experiments import Store, config as C, run
from prunekit.experiments.report import aggregate, table
from tiny import die_after_epoch

BASE = {
    "name": "tiny",
    "model": "lenet_300_100",
    "data": {"name": "synthetic"},
    "train": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
    "prune": {"method": "magnitude", "sparsity": 0.8, "warmup": 1},
    "seed": 0,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("patch, match", [
    ({"train": {"optimzer": "sgd"}}, r"unknown field 'train.optimzer' \(did you mean 'optimizer'\?\)"),
    ({"train": {"optimizer": "sgdd"}}, r"field 'train.optimizer': 'sgdd' is not one of"),
    ({"train": {"epochs": "ten"}}, r"field 'train.epochs': expected an integer"),
    ({"prune": {"method": "magnitud"}}, r"field 'prune.method': unknown method 'magnitud': did you mean 'magnitude'"),
    ({"prune": {"method": "magnitude", "sparsity": 1.0}}, r"sparsity 1.0 is outside \[0, 1\)"),
    ({"prune": {"method": "magnitude", "sparsity": -0.1}}, r"outside \[0, 1\)"),
    ({"prune": {"method": "magnitude", "scop": "layer"}}, r"unknown option 'scop'.*did you mean 'scope'"),
    ({"prune": {"method": "magnitude", "scope": "per-layer"}}, r"'per-layer' is not one of 'global', 'layer'"),
    ({"prune": {"sparsity": 0.5}}, r"missing required field 'prune.method'"),
    ({"prune": {"method": "magnitude", "warmup": 9}}, r"warm-up exceed train.epochs"),
    ({"model": "resnet2"}, r"field 'model.name': unknown model 'resnet2': did you mean 'resnet20'"),
    ({"data": "cifar11"}, r"field 'data.name': unknown dataset 'cifar11'"),
    ({"train": {"lr_schedule": "multistep", "milestones": [5, 3]}}, r"train.milestones"),
    ({"grid": {"prunes.method": ["none"]}}, r"grid key 'prunes.method' does not name a config field"),
])
def test_config_errors_name_the_field(patch, match):
    data = {**BASE, **patch}
    with pytest.raises(pk.ConfigError, match=match) as e:
        for r in C.expand(data):
            C.resolve(r)
    assert "\n" not in str(e.value)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(pk.ConfigError, match="not valid YAML"):
        C.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(pk.ConfigError, match="mapping"):
        C.load(tmp_path / "list.yaml")
    with pytest.raises(pk.ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")


def test_grid_expansion_and_identity():
    data = {**BASE, "grid": {"prune.method": ["none", "random", "magnitude"], "prune.sparsity": [0.5, 0.9],
                             "seed": [0, 1]}}
    runs = C.expand(data)
    assert len(runs) == 12
    ids = {C.run_id(C.resolve(r)) for r in runs}
    assert len(ids) == 10  # 'none' ignores sparsity: 2 seeds x 1 + 2 methods x 2 sparsities x 2 seeds
    # defaults written out or left implicit are the same run; the experiment name is not part of the identity
    a = C.resolve({**BASE, "prune": {"method": "magnitude", "sparsity": 0.8, "warmup": 1, "scope": "global"}})
    b = C.resolve({**BASE, "name": "other", "train": {**BASE["train"], "device": "cpu"}})
    assert C.run_id(a) == C.run_id(b)
    c = C.resolve({**BASE, "prune": {"method": "magnitude", "density": 0.2, "warmup": 1}})
    assert C.run_id(a) == C.run_id(c)
    assert C.run_id(a) != C.run_id(C.resolve({**BASE, "seed": 1}))


def test_overrides():
    d = C.apply_overrides(BASE, ["train.epochs=7", "prune.sparsity=0.95", "model=mlpnet", "train.milestones=[2, 4]"])
    assert d["train"]["epochs"] == 7 and d["prune"]["sparsity"] == 0.95 and d["model"] == "mlpnet"
    assert d["train"]["milestones"] == [2, 4]
    assert BASE["train"]["epochs"] == 3  # no mutation
    with pytest.raises(pk.ConfigError, match="expected form is KEY=VALUE"):
        C.apply_overrides(BASE, ["train.epochs"])


def _weights(run_dir: Path):
    return load_checked(run_dir / "last.pt", map_location="cpu")["model"]


def test_run_store_and_noop_rerun(tmp_path):
    rec = run(BASE, tmp_path, log=lambda m: None)
    assert not rec.cached and rec.method == "magnitude" and rec.achieved_sparsity == pytest.approx(0.8, abs=1e-4)
    assert rec.final_test_acc > 0.5  # the synthetic task is learnable
    with Store(tmp_path / "results.sqlite") as s:
        rows = s.runs(name="tiny")
        assert len(rows) == 1 and rows[0]["status"] == "done"
        assert [e["epoch"] for e in s.epochs(rec.run_id)] == [0, 1, 2]
        layers = s.layers(rec.run_id)
        assert [l["layer"] for l in layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
        assert sum(l["kept"] for l in layers) == pk.keep_count(sum(l["total"] for l in layers), 0.8)
        assert json.loads(rows[0]["config"])["prune"]["method"] == "magnitude"
        assert json.loads(rows[0]["versions"])["torch"] == torch.__version__
    # sparsity in the epochs table: dense during warm-up, pruned after
    with Store(tmp_path / "results.sqlite") as s:
        sp = [e["sparsity"] for e in s.epochs(rec.run_id)]
    assert sp[0] == 0.0 and sp[1] == pytest.approx(0.8, abs=1e-4)
    mtime = (Path(rec.run_dir) / "last.pt").stat().st_mtime_ns
    again = run(BASE, tmp_path, log=lambda m: None)
    assert again.cached and again.final_test_acc == rec.final_test_acc
    assert (Path(rec.run_dir) / "last.pt").stat().st_mtime_ns == mtime  # nothing retrained
    # the saved best model loads into a fresh model with its masks
    from prunekit.models import get_model

    fresh = get_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=4)
    masks = pk.load(Path(rec.run_dir) / "best.pt", fresh)
    assert masks is not None and masks.sparsity() == pytest.approx(0.8, abs=1e-4)
    assert pk.sparsity(fresh) == pytest.approx(masks.sparsity())


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = run(BASE, tmp_path / "a", log=lambda m: None)

    undo = die_after_epoch(monkeypatch, 1)  # dies after epoch 1 is logged but before its checkpoint is written
    with pytest.raises(KeyboardInterrupt):
        run(BASE, tmp_path / "b", log=lambda m: None)
    with Store(tmp_path / "b" / "results.sqlite") as s:
        assert s.status(straight.run_id) == "failed"
        assert s.runs(status="done") == []
    undo()
    resumed = run(BASE, tmp_path / "b", log=lambda m: None)
    assert resumed.run_id == straight.run_id and not resumed.cached
    assert resumed.final_test_acc == straight.final_test_acc
    wa, wb = _weights(Path(straight.run_dir)), _weights(Path(resumed.run_dir))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with Store(tmp_path / "b" / "results.sqlite") as s:
        assert [e["epoch"] for e in s.epochs(resumed.run_id)] == [0, 1, 2]
        assert s.status(resumed.run_id) == "done"
        assert len(s.runs(status="done")) == 1


def test_store_transactions_roll_back(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        with pytest.raises(RuntimeError):
            with s.transaction() as c:
                c.execute("INSERT INTO experiments (name, run_id, added) VALUES ('x', 'y', 0)")
                raise RuntimeError("crash mid-write")
        assert s.experiment_names() == []


def test_report_table_equals_direct_computation(tmp_path):
    data = {**BASE, "train": {**BASE["train"], "epochs": 1}, "prune": {"method": "random", "sparsity": 0.5},
            "grid": {"seed": [0, 1, 2]}}
    recs = [run(r, tmp_path, log=lambda m: None) for r in C.expand(data)]
    with Store(tmp_path / "results.sqlite") as s:
        rows = s.runs(name="tiny")
    agg = aggregate(rows)
    (cell,) = agg.values()
    vals = [100 * r.final_test_acc for r in recs]
    mean = sum(vals) / 3
    std = (sum((v - mean) ** 2 for v in vals) / 2) ** 0.5
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(mean) and cell["std"] == pytest.approx(std)
    assert f"{mean:.2f} ± {std:.2f}" in table(rows)


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "prune": {"method": "snipp", "sparsity": 0.9}}))
    assert main(["run", str(cfg), "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prunekit: error: field 'prune.method': unknown method 'snipp': did you mean 'snip'?"] or (
        len(err) == 1 and "unknown method 'snipp'" in err[0])
    assert main(["run", str(cfg), "--set", "prune.method=random", "--set", "prune.sparsity=1.5",
                 "--root", str(tmp_path / "runs")]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err
    assert main(["report", "--root", str(tmp_path / "nothing")]) == 2
    assert "run an experiment first" in capsys.readouterr().err


def test_missing_dataset_names_the_fetch_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "empty"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "data": "mnist"}))
    assert main(["run", str(cfg), "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prunekit: error:") and "prunekit data fetch mnist" in last
    assert "Traceback" not in err


def test_cli_run_grid_report_and_methods(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "train": {**BASE["train"], "epochs": 2},
                                   "grid": {"prune.method": ["none", "random", "magnitude"]}}))
    assert main(["run", str(cfg), "--root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "dense (none)" in out and "random" in out and "magnitude" in out
    assert (tmp_path / "runs" / "tiny.png").stat().st_size > 1000
    assert main(["report", "--root", str(tmp_path / "runs"), "--name", "tiny"]) == 0
    assert "0.8" in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for code in ("none", "random", "magnitude", "grad_norm", "snip", "grasp", "fisher_diag", "fisher_pruner", "fts",
                 "fbss", "synflow", "px"):
        assert f"\n{code} " in out
    assert main(["methods", "fbss"]) == 0
    out = capsys.readouterr().out
    assert "damp " in out and "1e-05" in out and "scope" in out
    assert main(["methods", "fbs"]) == 2
    assert "did you mean 'fbss'" in capsys.readouterr().err


MNIST = Path(os.environ.get("PRUNEKIT_DATA", Path.home() / ".cache/prunekit/data")) / "mnist" / "mnist.pkl.gz"


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.exists(), reason="real MNIST absent: run `prunekit data fetch mnist` (make test does)")
def test_quickstart_on_real_mnist(tmp_path, capsys):
    """The README's default experiment end to end: 15 LeNet-300-100 runs on real MNIST."""
    torch.set_num_threads(2)
    root = Path(__file__).resolve().parents[2]
    assert main(["run", str(root / "configs" / "quickstart.yaml"), "--root", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dense (none)" in out
    with Store(tmp_path / "results.sqlite") as s:
        agg = {(k[3], k[4]): v for k, v in aggregate(s.runs(name="quickstart")).items()}
    assert agg[("none", 0.0)]["mean"] > 97.5
    assert agg[("magnitude", 0.9)]["mean"] > 97.0
    assert agg[("magnitude", 0.98)]["mean"] > agg[("random", 0.98)]["mean"] + 5
    assert all(v["n"] == 3 for v in agg.values())
    assert (tmp_path / "quickstart.png").stat().st_size > 1000


def test_pretrained_config_and_one_shot_evaluation(tmp_path):
    """A one-shot run (train.epochs 0) starts from a dense run named by its config, which runs first if needed."""
    dense = {**BASE, "name": "dense", "prune": {"method": "none"}}
    dense_file = tmp_path / "dense.yaml"
    dense_file.write_text(yaml.safe_dump(dense))
    oneshot = {**BASE, "name": "oneshot", "model": {"name": "lenet_300_100", "pretrained": str(dense_file)},
               "train": {**BASE["train"], "epochs": 0}, "prune": {"method": "magnitude", "sparsity": 0.7}}
    rec = run(oneshot, tmp_path / "runs", log=lambda m: None)
    with Store(tmp_path / "runs" / "results.sqlite") as s:
        assert {r["method"] for r in s.runs()} == {"none", "magnitude"}  # the dense run ran first
        dense_id = [r["run_id"] for r in s.runs() if r["method"] == "none"][0]
        assert [e["epoch"] for e in s.epochs(rec.run_id)] == [0]
    # the recorded accuracy is that of the dense final weights pruned by magnitude, with no training
    from prunekit.data import load_dataset, loaders
    from prunekit.models import get_model

    splits = load_dataset("synthetic")
    model = get_model("lenet_300_100", num_classes=splits.num_classes, input_shape=splits.input_shape)
    model.load_state_dict(load_checked(tmp_path / "runs" / dense_id / "last.pt")["model"])
    pk.prune(model, "magnitude", sparsity=0.7, seed=0)
    _, _, test_dl = loaders(splits, 64)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_dl)
    assert rec.final_test_acc == pytest.approx(correct / len(splits.test.y))
    assert rec.achieved_sparsity == pytest.approx(0.7, abs=1e-4)
    # the identity follows the dense run, not the file's path
    moved = tmp_path / "elsewhere.yaml"
    moved.write_text(dense_file.read_text())
    moved_cfg = {**oneshot, "model": {"name": "lenet_300_100", "pretrained": str(moved)}}
    assert C.run_id(C.resolve(moved_cfg)) == rec.run_id
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**dense, "seed": 5}))
    assert C.run_id(C.resolve({**oneshot, "model": {"name": "lenet_300_100", "pretrained": str(changed)}})) != rec.run_id


def test_pretrained_model_file(tmp_path):
    from prunekit.models import get_model

    torch.manual_seed(3)
    model = get_model("lenet_300_100", num_classes=4, input_shape=(1, 8, 8))
    masks = pk.prune(model, "random", sparsity=0.5)
    pk.save(tmp_path / "start.pt", model, masks)
    cfg = {**BASE, "model": {"name": "lenet_300_100", "pretrained": str(tmp_path / "start.pt")},
           "prune": {"method": "magnitude", "sparsity": 0.8}}
    rec = run(cfg, tmp_path / "runs", log=lambda m: None)
    assert rec.achieved_sparsity == pytest.approx(0.8, abs=1e-4)
    final = load_checked(Path(rec.run_dir) / "last.pt")["masks"]
    assert all(not bool((final[n] & ~masks[n]).any()) for n in masks.names())  # nested in the starting masks
    with pytest.raises(pk.ConfigError, match="not found"):
        C.resolve({**cfg, "model": {"name": "lenet_300_100", "pretrained": str(tmp_path / "nope.pt")}})


def test_grid_mapping_entries_merge_into_their_section():
    data = {**BASE, "grid": {"prune": [{"method": "magnitude", "scope": "layer"}, {"method": "random"}],
                             "prune.sparsity": [0.5, 0.9]}}
    runs = [C.resolve(r)["prune"] for r in C.expand(data)]
    assert [(p["method"], p["sparsity"], p["options"]["scope"]) for p in runs] == [
        ("magnitude", 0.5, "layer"), ("magnitude", 0.9, "layer"), ("random", 0.5, "global"), ("random", 0.9, "global")]
    assert all(p["warmup"] == 1 for p in runs)  # the base section's other keys are kept


def test_unusable_device_is_one_line_and_writes_no_run(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    assert main(["run", str(cfg), "--device", "cuda", "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prunekit: error: device 'cuda' is not usable")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["results.sqlite"]
    with Store(tmp_path / "runs" / "results.sqlite") as s:
        assert s.runs(status=None) == []


def test_grid_runs_load_their_dataset_once(tmp_path, monkeypatch):
    import prunekit.data as D
    from prunekit.experiments import runner

    calls = []
    real = D.load_dataset
    monkeypatch.setattr(D, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    runner._LAST_DATASET.clear()
    data = {**BASE, "train": {**BASE["train"], "epochs": 1}, "grid": {"seed": [0, 1]}}
    for r in C.expand(data):
        run(r, tmp_path, log=lambda m: None)
    assert len(calls) == 1


def test_structured_run_records_the_shrunk_model(tmp_path):
    from prunekit.structured import load_shrunk

    cfg = {**BASE, "prune": {"method": "filter_l1", "sparsity": 0.5, "warmup": 1}}
    rec = run(cfg, tmp_path)
    st = rec.structured
    assert st is not None and st["params_shrunk"] < st["params_dense"] and 0 < st["macs_ratio"] < 1
    assert {(r["model"], r["batch_size"]) for r in st["latency"]} == {
        (m, b) for m in ("dense", "masked", "shrunk") for b in (1, 16, 64)}
    small = load_shrunk(tmp_path / rec.run_id / "shrunk.pt")
    assert sum(p.numel() for p in small.parameters()) == st["params_shrunk"]
    with Store(tmp_path / "results.sqlite") as s:
        from prunekit.experiments.report import structured_table

        assert "filter_l1" in structured_table(s.runs())


@pytest.mark.parametrize("path", sorted(str(p.relative_to(Path(__file__).resolve().parents[2]))
                                        for p in (Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml")))
def test_every_shipped_config_resolves(path, monkeypatch):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # configs name their pretrained configs relative to the repository root
    runs = C.expand(C.load(root / path))
    ids = {C.run_id(C.resolve(r)) for r in runs}
    assert runs and ids


def test_fairness_notes_flag_missed_sparsity_and_mixed_recipes():
    from prunekit.experiments.report import fairness_notes

    def row(rid, method, req, got, lr):
        cfg = {"model": {"name": "m"}, "data": {"name": "d"}, "train": {"lr": lr}}
        return {"run_id": rid, "method": method, "seed": 0, "sparsity": req, "achieved_sparsity": got,
                "model": "m", "dataset": "d", "config": json.dumps(cfg)}

    ok = [row("a", "snip", 0.9, 0.9, 0.1), row("b", "pfp", 0.9, 0.9004, 0.1)]  # 0.4% of the kept 10%: fine
    assert fairness_notes(ok) == ""
    bad = ok + [row("c", "filter_l1", 0.9, 0.901, 0.1)]  # 1% of the kept weights
    assert "c filter_l1" in fairness_notes(bad) and "budget" not in fairness_notes(bad)
    mixed = ok + [row("d", "snip", 0.9, 0.9, 0.05)]
    assert "2 different recipes" in fairness_notes(mixed)


def test_record_has_before_finetune_accuracy_compression_speedup_memory(tmp_path):
    rec = run(BASE, tmp_path)  # magnitude 0.8 after one warm-up epoch, then 2 more epochs
    assert rec.test_acc_before_finetune is not None and 0.0 <= rec.test_acc_before_finetune <= 1.0
    assert rec.val_acc_before_finetune is not None
    assert rec.compression == pytest.approx(1.0 / (1.0 - rec.achieved_sparsity))
    assert rec.theoretical_speedup > 1.0 and rec.peak_memory_mb > 0
    # one-shot (no training): before and after fine-tuning are the same model
    one = {**BASE, "train": {**BASE["train"], "epochs": 0}, "prune": {**BASE["prune"], "warmup": 0}}
    rec0 = run(one, tmp_path)
    assert rec0.test_acc_before_finetune == pytest.approx(rec0.final_test_acc)


def test_report_before_finetune_metric_reads_the_record(tmp_path):
    from prunekit.experiments.report import aggregate

    rec = run(BASE, tmp_path)
    with Store(tmp_path / "results.sqlite") as s:
        agg = aggregate(s.runs(), "test_acc_before_finetune")
    [(key, v)] = agg.items()
    assert key[3] == "magnitude" and v["mean"] == pytest.approx(100 * rec.test_acc_before_finetune)


def test_speedup_and_layer_plots(tmp_path, capsys):
    from prunekit.experiments.report import plot_layers, plot_speedup

    rec = run(BASE, tmp_path)
    run({**BASE, "prune": {"method": "none"}}, tmp_path)
    with Store(tmp_path / "results.sqlite") as s:
        out = plot_speedup(s.runs(), tmp_path / "sp.png")
        lay = plot_layers(s, rec.run_id, tmp_path / "layers.png")
        with pytest.raises(pk.PrunekitError, match="no per-layer rows"):
            plot_layers(s, "nope", tmp_path / "x.png")
    for f in (out, lay):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 1000
    assert main(["report", "--root", str(tmp_path), "--layers", rec.run_id, "--plot", str(tmp_path / "l2.png")]) == 0
    assert (tmp_path / "l2.png").exists()
    assert main(["report", "--root", str(tmp_path), "--plot", str(tmp_path / "acc.png")]) == 0
    assert (tmp_path / "acc_speedup.png").exists()


def test_results_page_has_every_experiment(tmp_path, monkeypatch):
    from prunekit.experiments.results_doc import write_results

    run(BASE, tmp_path / "a")
    run({**BASE, "name": "other", "prune": {"method": "random", "sparsity": 0.5}}, tmp_path / "b")
    cfgs = tmp_path / "configs"
    cfgs.mkdir()
    (cfgs / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    out = write_results(tmp_path / "results.md", [tmp_path / "a", tmp_path / "b"], config_dir=cfgs)
    text = out.read_text()
    assert "## tiny" in text and "## other" in text
    assert f"prunekit run {cfgs / 'tiny.yaml'}" in text and "magnitude" in text and "random" in text
    with pytest.raises(pk.PrunekitError, match="no results store"):
        write_results(tmp_path / "x.md", [tmp_path / "missing"])


def test_set_reaches_dotted_grid_keys():
    data = {**BASE, "grid": {"prune.method": ["random"]}}
    out = C.apply_overrides(data, ["grid.prune.method=[snip, magnitude]", "grid.seed=[0, 1]"])
    assert out["grid"] == {"prune.method": ["snip", "magnitude"], "seed": [0, 1]}
    assert len(C.expand(out)) == 4
