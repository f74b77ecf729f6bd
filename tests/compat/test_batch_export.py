"""`prunekit run DIR/` (batch of configs), seed 000's JSON layout, `prunekit report --export`, and the WoodFisher
flag table of docs/woodfisher_flags.md."""
import copy
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from prunekit.cli import main
from prunekit.errors import ConfigError
from prunekit.experiments import Store, config as C
from prunekit.experiments import seed000
from tiny import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]

TINY = tiny("tiny")

# seed 000's JSON layout (its README's compressor keys, its exp_configs/*.json sections) for the same tiny run
SEED000 = {
    "general": {"id": "tiny000", "description": "a test", "gpu": {"ngpus": 0, "gpu_id": 0}, "experiment": "pbt",
                "seed": 0, "output_dir": "./outputs"},
    "dataset": {"class": "synthetic", "batch_size": 64},
    "model": {"class": "lenet_300_100"},
    "training": {"num_steps": 1, "criterion": {"class": "CE"},
                 "optimizer": {"class": "sgd", "learning_rate": 0.05, "momentum": 0.9, "w_decay": 0.0005,
                               "lr_drops": [1], "lr_drop_factor": 0.2},
                 "compressor": {"class": "snip", "mask": "layer", "sparsity": 0.8, "warmup": 0, "batch_size": 4}},
    "validation": {"metric": "acc", "frequency": 1},
}
# ... and its prunekit equivalent
NATIVE000 = {
    "name": "tiny000",
    "model": {"name": "lenet_300_100"},
    "data": {"name": "synthetic"},
    "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005,
              "lr_schedule": "multistep", "milestones": [1], "gamma": 0.2, "device": "cpu"},
    "prune": {"method": "snip", "scope": "layer", "sparsity": 0.8, "warmup": 0, "batch_size": 4,
              "exclude_output": True},
    "seed": 0,
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "exp_configs"
    d.mkdir()
    a = copy.deepcopy(TINY)
    a["name"] = "a"
    a["prune"]["sparsity"] = 0.5
    _write(d / "a.yaml", a)
    b = copy.deepcopy(TINY)
    b["name"] = "b"
    b["grid"] = {"prune.method": ["random", "magnitude"]}  # a grid expands into its runs
    _write(d / "b.yml", b)
    bad = copy.deepcopy(TINY)
    bad["name"] = "bad"
    bad["data"] = {"name": "cifar10"}  # no CIFAR archive in the data folder: this run fails when it starts
    _write(d / "c_bad.yaml", bad)
    (d / "notes.txt").write_text("not a config")
    (d / "done").mkdir()  # seed 000 keeps done/ and fail/ folders beside the configs: left alone
    return d


def test_folder_runs_the_good_configs_records_the_bad_one_and_fails(tmp_path, capsys):
    d = _folder(tmp_path)
    root = tmp_path / "runs"
    argv = ["run", str(d), "--root", str(root), "--data-dir", str(tmp_path / "nodata"), "--no-progress",
            "--no-report"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "3 config file(s), 4 run(s): 3 done, 0 skipped (finished before), 1 failed" in out
    assert re.search(r"FAILED\s+c_bad\.yaml", out) and re.search(r"ok\s+a\.yaml", out)
    with Store(root / "results.sqlite") as s:
        assert len(s.runs(name="a")) == 1 and len(s.runs(name="b")) == 2
        [failed] = s.runs(status="failed")
        assert "cifar" in failed["error"].lower() and failed["error"] in out

    # again: the finished runs are skipped, the failed one is tried again (and fails again)
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "4 run(s): 0 done, 3 skipped (finished before), 1 failed" in out
    # with the bad file gone, the batch succeeds and does nothing
    (d / "c_bad.yaml").unlink()
    assert main(argv) == 0
    assert "2 config file(s), 3 run(s): 0 done, 3 skipped" in capsys.readouterr().out


def test_folder_reports_a_config_that_does_not_validate_and_applies_set_to_every_file(tmp_path, capsys):
    from prunekit.experiments.batch import run_folder, summary

    d = tmp_path / "cfgs"
    d.mkdir()
    typo = copy.deepcopy(TINY)
    typo["train"]["optimizer"] = "sgdd"
    _write(d / "1_typo.yaml", typo)
    _write(d / "2_seed000.json", SEED000)
    res = run_folder(d, tmp_path / "runs", overrides=["train.epochs=0"], progress=False, log=lambda m: None)
    assert not res.ok and res.failed == 1 and res.done == 1
    assert "train.optimizer" in res.files[0].error
    [rid] = res.files[1].done
    text = summary(res)
    assert "1_typo.yaml (config)" in text and "sgdd" in text
    with Store(tmp_path / "runs" / "results.sqlite") as s:
        [row] = s.runs(name="tiny000")
        assert row["run_id"] == rid and json.loads(row["config"])["train"]["epochs"] == 0  # --set reached it


def test_seed000_json_is_the_same_run_as_its_native_equivalent(tmp_path, capsys):
    path = _write(tmp_path / "exp_snip.json", SEED000)
    data = C.load(path)
    err = capsys.readouterr().err
    assert "seed 000's layout" in err
    for key in ("general.description", "general.output_dir", "general.gpu.gpu_id"):
        assert key in err
    [run] = C.expand(data)
    [native] = C.expand(NATIVE000)
    assert C.resolve(run) == C.resolve(native)
    assert C.run_id(C.resolve(run)) == C.run_id(C.resolve(native))
    # the seed's own Table 1 file (ResNet-18, CIFAR-10, FTS at 0.9) is a cell of configs/seed000/resnet18_cifar10.yaml
    fts = copy.deepcopy(SEED000)
    fts["dataset"] = {"class": "cifar10", "batch_size": 512}
    fts["model"] = {"class": "resnet18", "num_classes": 10}
    fts["general"]["gpu"] = {"ngpus": 1, "gpu_id": 0}
    fts["training"] = {"num_steps": 160, "criterion": {"class": "CE"},
                       "optimizer": {"class": "sgd", "learning_rate": 0.01, "momentum": 0.9, "w_decay": 0.0005,
                                     "lr_drops": [60, 120], "lr_drop_factor": 0.2},
                       "compressor": {"class": "fts", "mask": "global", "sparsity": 0.9, "warmup": 0,
                                      "batch_size": 1}}
    [cell] = C.expand(fts)
    table1 = {C.run_id(C.resolve(r)) for r in C.expand(C.load(ROOT / "configs" / "seed000" / "resnet18_cifar10.yaml"))}
    assert C.run_id(C.resolve(cell)) in table1


def test_seed000_example_config_and_sweep_accept_the_layout(tmp_path):
    [run] = C.expand(C.load(ROOT / "configs" / "seed000" / "lenet300_mnist_fts.json"))
    res = C.resolve(run)
    assert (res["model"]["name"], res["data"]["name"], res["prune"]["method"], res["prune"]["sparsity"]) == \
        ("lenet_300_100", "mnist", "fts", 0.98)
    assert res["prune"]["method_options"]["batch_size"] == 1 and res["prune"]["options"]["scope"] == "global"
    from prunekit.experiments.sweep import sweep

    data = C.apply_overrides(copy.deepcopy(SEED000), ["train.epochs=0"])  # prunekit fields win over the seed's
    out = sweep(data, tmp_path, workers=1, baselines=False, log=lambda m: None)
    assert out.ok and len(out.done) == 1


def test_seed000_note_lists_meaningless_keys_and_errors_name_the_key():
    data = copy.deepcopy(SEED000)
    data["training"]["compressor"]["percentile"] = 3
    data["train"] = {"epochs": 5}  # a prunekit field beside the seed's: it wins, and the note says so
    lines = seed000.notes(data)
    ignored = lines[0]
    for key in ("general.description", "general.output_dir", "general.gpu.gpu_id",
                "training.compressor.percentile"):  # the seed's own keys without a prunekit meaning: a note
        assert key in ignored
    unknown = copy.deepcopy(data)  # keys that are not the seed's: an error naming each (issue 14)
    unknown["general"]["owner"] = "me"
    unknown["training"]["optimizer"]["nesterov"] = True
    unknown["extra_section"] = {"a": 1}
    with pytest.raises(ConfigError, match=r"unknown keys 'general\.owner', 'training\.optimizer\.nesterov', "
                                          r"'extra_section'"):
        C.expand(unknown)
    assert any("train.epochs=5 replaces training.num_steps" in line for line in lines)
    assert C.resolve(C.expand(data)[0])["train"]["epochs"] == 5
    # data-free compressors ignore the scoring batch size, as in the seed
    rnd = copy.deepcopy(SEED000)
    rnd["training"]["compressor"]["class"] = "random"
    assert any("no effect for 'random'" in line for line in seed000.notes(rnd))
    assert "batch_size" not in C.resolve(C.expand(rnd)[0])["prune"]["method_options"]
    bad = [
        (("validation", "metric"), "f1", r"validation\.metric='f1'.*set it to acc"),
        (("validation", "frequency"), 5, r"validation\.frequency=5.*set it to 1"),
        (("model", "class"), "resnet50", r"model\.class='resnet50'.*resnet18 or VGG19"),
        (("dataset", "class"), "svhn", r"dataset\.class='svhn' is not available"),
        (("training", "compressor", "class"), "obd", r"training\.compressor\.class"),
        (("training", "compressor", "mask"), "local", r"training\.compressor\.mask='local'"),
        (("training", "criterion", "class"), "MSE", r"training\.criterion\.class='MSE'"),
        (("general", "experiment"), "pat", r"general\.experiment='pat'"),
    ]
    for keys, value, match in bad:
        d = copy.deepcopy(SEED000)
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        with pytest.raises(ConfigError, match=match):
            C.expand(d)
    vgg = copy.deepcopy(SEED000)
    vgg["model"] = {"class": "VGG19", "num_classes": 100}
    vgg["dataset"]["class"] = "cifar100"
    assert C.resolve(C.expand(vgg)[0])["model"]["name"] == "vgg19_kuangliu"
    vgg["model"]["num_classes"] = 10
    with pytest.raises(ConfigError, match=r"model\.num_classes=10 does not match"):
        C.expand(vgg)
    seeds = copy.deepcopy(SEED000)
    seeds["general"]["seed"] = [0, 42, 123]  # three seeds: a grid
    assert [r["seed"] for r in C.expand(seeds)] == [0, 42, 123]


def _float(text: str):
    return None if text == "" else float(text)


def test_export_round_trips_to_the_store(tmp_path, capsys):
    from prunekit.experiments.export import RUN_COLUMNS, TEXT_COLUMNS
    from prunekit.experiments.sweep import sweep

    grid = copy.deepcopy(TINY)
    grid["grid"] = {"prune.method": ["none", "magnitude"], "seed": [0, 1]}
    root = tmp_path / "runs"
    assert sweep(grid, root, workers=1, baselines=False, log=lambda m: None).ok
    out = tmp_path / "export"
    assert main(["report", "--root", str(root), "--name", "tiny", "--export", str(out)]) == 0
    assert "export:" in capsys.readouterr().out
    with Store(root / "results.sqlite") as s:
        runs = {r["run_id"]: r for r in s.runs(name="tiny")}
        records = {rid: json.loads(r["record"]) for rid, r in runs.items()}
        epochs = {rid: s.epochs(rid) for rid in runs}
        layers = {rid: s.layers(rid) for rid in runs}
    assert len(runs) == 4  # none and magnitude, seeds 0 and 1
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["run_id"] for r in rows] == list(runs) and list(rows[0]) == list(RUN_COLUMNS)
    npz = np.load(out / "runs.npz")
    assert list(npz["run_id"]) == list(runs)
    for i, row in enumerate(rows):
        rid = row["run_id"]
        st, rec = runs[rid], records[rid]
        for col in ("final_test_acc", "test_acc_at_best_val", "best_val_acc", "achieved_sparsity", "prune_seconds",
                    "train_seconds", "total_seconds", "sparsity"):
            assert _float(row[col]) == st[col]
            assert npz[col][i] == st[col]
        for col in ("compression", "theoretical_speedup", "test_acc_before_finetune", "peak_memory_mb", "epochs"):
            want = rec[col]
            assert _float(row[col]) == want
            assert (math.isnan(npz[col][i]) if want is None else npz[col][i] == want)
        assert row["method"] == st["method"] and npz["method"][i] == st["method"] and row["experiment"] == "tiny"
        assert int(row["seed"]) == st["seed"] == npz["seed"][i]
        one = np.load(out / rid / "run.npz")
        assert one["final_test_acc"] == st["final_test_acc"] and one["run_id"] == rid
        assert list(one["epoch"]) == [e["epoch"] for e in epochs[rid]]
        assert list(one["epoch_test_acc"]) == [e["test_acc"] for e in epochs[rid]]
        assert list(one["epoch_lr"]) == [e["lr"] for e in epochs[rid]]
        ep_rows = list(csv.DictReader((out / rid / "epochs.csv").open()))
        assert [float(e["val_acc"]) for e in ep_rows] == [e["val_acc"] for e in epochs[rid]]
        assert list(one["layer_name"]) == [l["layer"] for l in layers[rid]]
        assert list(one["layer_kept"]) == [l["kept"] for l in layers[rid]]
        assert list(one["layer_density"]) == [l["density"] for l in layers[rid]]
        l_rows = list(csv.DictReader((out / rid / "layers.csv").open()))
        assert [(l["layer"], int(l["kept"]), float(l["sparsity"])) for l in l_rows] == \
            [(l["layer"], l["kept"], 1.0 - l["density"]) for l in layers[rid]]
        assert list(csv.DictReader((out / rid / "metrics.csv").open())) == [row]
    all_layers = list(csv.DictReader((out / "layers.csv").open()))
    assert len(all_layers) == sum(len(v) for v in layers.values())
    assert len(list(csv.DictReader((out / "epochs.csv").open()))) == sum(len(v) for v in epochs.values())
    for stem in ("tiny", "tiny_speedup"):
        for ext in ("png", "pdf"):
            f = out / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000
    assert (out / "tiny.pdf").read_bytes().startswith(b"%PDF") and (out / "tiny.png").read_bytes()[1:4] == b"PNG"
    assert not list(out.rglob(".*"))  # no temporary files left behind
    assert set(TEXT_COLUMNS) <= set(RUN_COLUMNS)


def test_export_writes_the_levels_and_plots_of_imp_runs(tmp_path):
    from prunekit.experiments.export import export
    from prunekit.experiments.sweep import sweep

    imp = copy.deepcopy(TINY)
    imp["name"] = "imp"
    imp["prune"] = {"method": "lth", "levels": 2}
    assert sweep(imp, tmp_path, workers=1, log=lambda m: None).ok
    with Store(tmp_path / "results.sqlite") as s:
        [run] = s.runs(name="imp")
        levels = s.levels(run["run_id"])
        written = export(s, tmp_path / "ex", name="imp")
    d = tmp_path / "ex" / run["run_id"]
    assert d / "levels.csv" in written
    rows = list(csv.DictReader((d / "levels.csv").open()))
    assert [(int(r["level"]), float(r["density"])) for r in rows] == [(lv["level"], lv["density"]) for lv in levels]
    z = np.load(d / "run.npz")
    assert list(z["level"]) == [lv["level"] for lv in levels] and list(z["level_branch"]) == ["main"] * len(levels)
    for stem in ("imp_accuracy", "imp_epochs"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "ex" / f"{stem}.{ext}").stat().st_size > 1000


# ------------------------------------------------------------------------------------ docs/woodfisher_flags.md

WF_BASE = {"model": "mlpnet", "data": "mnist", "train": {"epochs": 10},
           "prune": {"method": "woodfisherblock", "sparsity": 0.9}}


def _wf_rows() -> list[tuple[str, str, list[str]]]:
    """(flag cell, key cell, example `--set` items) of every table row of docs/woodfisher_flags.md."""
    rows = []
    for line in (ROOT / "docs" / "woodfisher_flags.md").read_text().splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4, line
        rows.append((cells[0], cells[1], re.findall(r"`([^`]+)`", cells[2])))
    return rows


def test_woodfisher_doc_covers_the_readme_flags():
    rows = _wf_rows()
    documented = {f for cell, _, _ in rows for f in re.findall(r"--[A-Za-z0-9_-]+", cell)}
    seeds = ROOT.parent / "shared" / "seeds"  # the seed READMEs, where this checkout has them
    readme = next(seeds.glob("003_*.txt"), None) if seeds.is_dir() else None
    flags = {"--update-config", "--prune-class", "--target-sparsity", "--fisher-subsample-size", "--fisher-mini-bsz",
             "--prune-start", "--prune-end", "--prune-freq", "--num_samples", "--fisher-damp", "--fisher-cpu",
             "--fisher-split-grads", "--woodtaylor-abs", "--offload-inv", "--offload-grads", "--epochs",
             "--disable-wdecay-after-prune", "--scale-prune-update", "--label-smoothing", "--recompute-num",
             "--recompute-schedule", "--recompute-degree", "--fittable-params", "--fisher-parts", "--flops-power",
             "--flops-target", "--prune-wdecay"}
    if readme is not None:
        flags |= set(re.findall(r"--[a-z][a-z0-9_-]*[a-z0-9]", readme.read_text()))
    assert flags <= documented, sorted(flags - documented)
    for cell, key, example in rows:
        assert key == "none" or example, f"{cell}: a key without a checked example"


def _lookup(resolved: dict, key: str):
    """Where a documented key lands in the resolved config."""
    section, _, rest = key.partition(".")
    if section == "prune" and rest not in ("method", "sparsity", "warmup", "samples"):
        p = resolved["prune"]
        if rest.startswith("gradual."):
            return p["gradual"][rest.split(".", 1)[1]]
        assert rest in p["options"] or rest in p["method_options"], f"{rest} is not an option of {p['method']}"
        return p["options"][rest] if rest in p["options"] else p["method_options"][rest]
    node = resolved
    for k in key.split("."):
        node = node[k]
    return node


def _same(got, value) -> bool:
    if isinstance(got, bool) or value is None:
        return got == value
    if isinstance(got, float):
        return got == float(value)
    if isinstance(got, (list, tuple)):
        return list(got) == list(value)
    return got == value


@pytest.mark.parametrize("flag,key,example", [r for r in _wf_rows() if r[2]], ids=lambda v: str(v)[:40])
def test_woodfisher_doc_keys_resolve(flag, key, example, monkeypatch):
    monkeypatch.chdir(ROOT)  # model.pretrained names a config relative to the repository root
    key = key.strip("`")
    values = dict(item.split("=", 1) for item in example)
    assert key in values, f"{flag}: the example does not set {key}"
    data = C.apply_overrides(copy.deepcopy(WF_BASE), example)
    [run] = C.expand(data)
    resolved = C.resolve(run)
    got = _lookup(resolved, key)
    want = C.parse_value(values[key])
    if key == "model.pretrained":
        assert got["run_id"] and got["config"]["name"] == "seed003_mlpnet_dense"
    else:
        assert _same(got, want), f"{flag}: --set {key}={values[key]} resolved to {got!r}"
