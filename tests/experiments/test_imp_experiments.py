"""IMP codes (lth, sap, ciap, giap) as experiments: config, seed-001 flags, trainer stop/start, the level runner,
resume, the levels table and the report."""
import copy
import math

import pytest
import torch

from prunekit.checkpoint import load_checked
import prunekit as pk
from prunekit.experiments import Store, config as C, run
from prunekit.experiments.report import render
from prunekit.lottery import kept_after
from prunekit.train import Callback, Trainer
from prunekit.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "name": "imp",
    "model": "lenet_300_100",
    "data": {"name": "synthetic"},
    "train": {"epochs": 4, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "progress": False},
    "prune": {"method": "lth", "levels": 3, "chunk_epochs": 2},
    "seed": 0,
}


def cfg(**prune):
    d = copy.deepcopy(BASE)
    d["prune"].update(prune)
    return d


# ---------------------------------------------------------------------------------------------- trainer hooks


def _toy(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            trainer.stop_training = True


def test_stop_training_ends_fit_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 2))
    tcfg = TrainConfig(epochs=6, batch_size=16, lr=0.1, progress=False)
    t = Trainer(model, tcfg, _toy(), callbacks=[StopAt(1)], run_dir=tmp_path)
    assert len(t.fit()) == 2
    w = model[0].weight.detach().clone()
    t2 = Trainer(model, tcfg, _toy(), callbacks=[StopAt(1)], run_dir=tmp_path)
    assert len(t2.fit()) == 2  # the checkpoint says stopped: nothing more is trained
    assert torch.equal(model[0].weight, w)


def test_start_at_advances_schedule_and_epochs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 2))
    tcfg = TrainConfig(epochs=6, batch_size=16, lr=0.1, lr_schedule="multistep", milestones=(2, 4), gamma=0.1,
                       progress=False)
    t = Trainer(model, tcfg, _toy())
    t.start_at(3)
    h = t.fit()
    assert [m["epoch"] for m in h] == [3, 4, 5]
    assert [m["lr"] for m in h] == pytest.approx([0.01, 0.001, 0.001])
    with pytest.raises(pk.PrunekitError, match=r"start_at\(7\)"):
        Trainer(model, tcfg, _toy()).start_at(7)


# --------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("prune, match", [
    ({"method": "sap", "p": 1.0, "q": 1.0}, r"0 < p < q"),
    ({"method": "ciap", "p": 2.0, "q": 1.0}, r"0 < p < q"),
    ({"levels": 0}, r"levels must be at least 1"),
    ({"rewind": "step:9ep"}, r"after the end of training \(train.epochs = 4\)"),
    ({"rewind": "late"}, r"unknown rewind 'late'"),
    ({"sparsity": 0.9}, r"'prune.sparsity' does not apply to 'lth'"),
    ({"warmup": 1}, r"rewind: step:<k>ep"),
    ({"prune_fraction": 1.0}, r"prune_fraction 1.0 is outside \(0, 1\)"),
    ({"control": "shuffle"}, r"'shuffle' is not one of"),
    ({"levles": 3}, r"did you mean 'levels'"),
])
def test_imp_config_errors(prune, match):
    with pytest.raises(pk.ConfigError, match=match):
        C.resolve(cfg(**prune))


def test_defaults_per_code():
    lth = C.resolve(cfg())["prune"]
    assert lth["sparsity"] is None and lth["options"]["scope"] == "layer"
    ciap = C.resolve(cfg(method="incop_if"))["prune"]
    assert ciap["method"] == "ciap" and ciap["options"]["scope"] == "global"


def test_one_shot_api_refuses_imp_codes():
    with pytest.raises(pk.PrunekitError, match=r"iterative magnitude pruning.*prunekit run.*'magnitude'"):
        pk.prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), "giap", 0.5)


def test_seed001_flags_translate():
    data = {"name": "s", "net_arch": "vgg16", "net_dataset": "MNIST", "net_lr": 0.01, "net_train_epochs": 20,
            "net_warmup": 10, "net_pretrained": 0, "prune_method": "ciap", "prune_p": 1.0, "prune_q": 2.0,
            "exper_imp_total_iter": 15, "exper_num_trial": 3, "data": {"resize": 32}}
    runs = C.expand(data)
    assert [r["seed"] for r in runs] == [0, 1, 2] if all("seed" in r for r in runs) else False
    r = C.resolve(runs[0])
    assert r["model"]["name"] == "vgg16_bn" and r["data"]["name"] == "mnist" and r["data"]["resize"] == 32
    t, p = r["train"], r["prune"]
    assert (t["optimizer"], t["lr"], t["momentum"], t["batch_size"], t["weight_decay"]) == ("sgd", 0.01, 0.0, 64, 5e-4)
    assert t["epochs"] == (10 + 20) * 2
    o = p["method_options"]
    assert (p["method"], o["levels"], o["p"], o["q"], o["max_chunks"], o["chunk_epochs"], o["rewind"]) == \
        ("ciap", 14, 1.0, 2.0, 20, 2, "step:20ep")


@pytest.mark.parametrize("extra, match", [
    ({"net_lr": 0.01, "train": {"lr": 0.1}}, r"net_lr=0.01 and train.lr=0.1 both set it"),
    ({"net_pretrained": 1}, r"net_pretrained: 0"),
    ({"net_arch": "alexnet"}, r"net_arch='alexnet' has no prunekit model"),
    ({"net_dataset": "FashionMNIST"}, r"not available in prunekit"),
    ({"exper_imp_total_iter": 1}, r"exper_imp_total_iter must be a whole number >= 2"),
])
def test_seed001_errors(extra, match):
    with pytest.raises(pk.ConfigError, match=match):
        for r in C.expand({"name": "s", "prune_method": "lth", **extra}):
            C.resolve(r)


# ------------------------------------------------------------------------------------------------ end to end


def _levels(root, rec):
    with Store(root / "results.sqlite") as s:
        return s.levels(rec.run_id)


def test_lth_run_exact_counts_nested_and_stored(tmp_path):
    rec = run(cfg(output_fraction=0.1), tmp_path)
    rows = _levels(tmp_path, rec)
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    assert all(r["epochs"] == 4 and r["stop_reason"] == "budget" for r in rows)
    # exact kept counts: ceil-based removal per tensor, 20% hidden, 10% output
    blobs = [load_checked(tmp_path / rec.run_id / "imp" / f"level_{k}.pt") for k in range(4)]
    n = [m.numel() for m in blobs[0]["masks"].values()]
    assert len(n) == 3
    for r in rows:
        k = r["level"]
        assert r["kept"] == sum(kept_after(k, n[:2], [0.2, 0.2])) + kept_after(k, n[2:], [0.1])[0]
    for a, b in zip(blobs, blobs[1:]):
        for name in a["masks"]:
            assert not (b["masks"][name] & ~a["masks"][name]).any()
    assert rec.levels == rows and rec.epochs == 16
    assert math.isclose(rec.achieved_sparsity, 1 - rows[-1]["density"])
    # lth logs the flow distances it would be judged by (checks every 2 epochs at levels >= 1)
    assert [len(r["checks"]) for r in rows] == [0, 2, 2, 2]
    text, _ = render(Store(tmp_path / "results.sqlite"), [r for r in Store(tmp_path / "results.sqlite").runs()])
    assert "per IMP level" in text


def test_sap_prunes_by_pq_and_ciap_stops_early(tmp_path):
    sap = run(cfg(method="sap"), tmp_path)
    ciap = run(cfg(method="ciap", acc_tol=1.0), tmp_path)  # the accuracy guard always passes: one chunk per level
    s_rows, c_rows = _levels(tmp_path, sap), _levels(tmp_path, ciap)
    assert s_rows[1]["prune"]["n_prune"] > 0 and 0 < s_rows[1]["prune"]["fraction"] <= 0.9
    assert [r["stop_reason"] for r in c_rows[1:]] == ["accuracy"] * 3
    assert [r["epochs"] for r in c_rows] == [4, 2, 2, 2]
    assert ciap.epochs == 10 < sap.epochs == 16
    # level 1 of both starts from the same trained dense network: the same PQ mask
    assert s_rows[1]["kept"] == c_rows[1]["kept"]


def test_rewind_to_epoch_restarts_levels_there(tmp_path):
    rec = run(cfg(rewind="step:1ep"), tmp_path)
    d = tmp_path / rec.run_id / "imp"
    rewind = load_checked(d / "level_0" / "rewind.pt")["state"]
    blob = load_checked(d / "level_0.pt")
    assert all(torch.equal(rewind[k], blob["rewind_state"][k]) for k in rewind)
    lvl1 = load_checked(d / "level_1" / "last.pt")
    assert [h["epoch"] for h in lvl1["history"]] == [1, 2, 3]  # the schedule and data order resume at epoch 1
    assert _levels(tmp_path, rec)[1]["epochs"] == 3


def test_rewind_to_iteration_resumes_mid_epoch(tmp_path):
    rec = run(cfg(rewind="step:10it"), tmp_path)  # synthetic: 512 samples / 64 = 8 steps per epoch
    d = tmp_path / rec.run_id / "imp"
    theta0 = load_checked(d / "init.pt")
    rewind = load_checked(d / "level_0" / "rewind.pt")["state"]
    final0 = load_checked(d / "level_0.pt")["final_state"]
    w = "fc1.weight" if "fc1.weight" in rewind else next(k for k in rewind if k.endswith("weight"))
    assert not torch.equal(rewind[w], theta0[w]) and not torch.equal(rewind[w], final0[w])
    lvl1 = load_checked(d / "level_1" / "last.pt")
    assert [h["epoch"] for h in lvl1["history"]] == [1, 2, 3] and lvl1["global_step"] == 4 * 8
    with pytest.raises(pk.PrunekitError, match=r"step:1000it.*after the end of training \(4 epochs x 8 steps"):
        run(cfg(rewind="step:1000it"), tmp_path)


def test_original_mode_runs_with_seed_statistics(tmp_path):
    rec = run(cfg(method="giap", stop_mode="original", rewind="step:2ep"), tmp_path)
    blob = load_checked(tmp_path / rec.run_id / "imp" / "level_0.pt")
    ref = blob["record"]["summary"]["reference"]
    assert len(ref["gf"]) == 3 and len(ref["if"]) == 2 and 0 <= ref["acc"] <= 1
    rows = _levels(tmp_path, rec)
    assert all(r["stop_reason"] in ("accuracy", "flow", "max_chunks") for r in rows[1:])


class Boom(Exception):
    pass


def test_interrupted_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    c = cfg(method="ciap", epsilon=1e-9, acc_guard=False)  # never passes: checks, then the cap of 2 chunks
    ref = run(c, tmp_path / "a")
    ref_rows = _levels(tmp_path / "a", ref)

    calls = {"n": 0}
    orig = Trainer._train_epoch

    def flaky(self, epoch):
        calls["n"] += 1
        if calls["n"] == 4 + 4 + 3:  # level 2, third epoch: mid-level, after one stop check
            raise Boom()
        return orig(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", flaky)
    with pytest.raises(Boom):
        run(c, tmp_path / "b")
    with Store(tmp_path / "b" / "results.sqlite") as s:
        assert s.status(ref.run_id) == "failed"
        assert [r["level"] for r in s.levels(ref.run_id)] == [0, 1]  # finished levels were stored as they ended
    monkeypatch.setattr(Trainer, "_train_epoch", orig)
    rec = run(c, tmp_path / "b")
    rows = _levels(tmp_path / "b", rec)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref_rows)
    assert rec.final_test_acc == ref.final_test_acc


def test_cli_report_shows_levels(tmp_path, capsys):
    from prunekit.cli import main
    import yaml

    path = tmp_path / "c.yaml"
    data = cfg()
    data["grid"] = {"prune.method": ["lth", "giap"]}
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--root", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "lth acc%" in out and "giap acc%" in out and "saved %" in out
    assert (tmp_path / "r" / "imp_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("name, n_runs", [("vgg16_mnist.yaml", 21), ("lenet300_mnist_cpu.yaml", 12)])
def test_seed001_configs_resolve(name, n_runs):
    from pathlib import Path

    from prunekit.models import get_model

    runs = C.expand(C.load(Path(__file__).resolve().parents[2] / "configs" / "seed001" / name))
    resolved = [C.resolve(r) for r in runs]
    assert len({C.run_id(r) for r in resolved}) == n_runs
    r = resolved[0]
    shape = (1, r["data"]["resize"] or 28, r["data"]["resize"] or 28)
    model = get_model(r["model"]["name"], num_classes=10, input_shape=shape)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_resize_keeps_labels_and_values():
    from prunekit.data import load_dataset, resized

    s = load_dataset("synthetic")
    same = resized(s, s.input_shape[1])  # the same size is the identity
    assert torch.allclose(same.train.x, s.train.x) and torch.equal(same.train.y, s.train.y)
    s.train.x[:] = 0.25  # a constant image stays constant at any size
    r = resized(s, 20)
    assert r.input_shape[1:] == (20, 20) and r.train.x.shape[-2:] == (20, 20)
    assert torch.allclose(r.train.x, torch.full_like(r.train.x, 0.25))
    with pytest.raises(pk.PrunekitError, match="resize must be a positive whole number"):
        resized(s, 0)


# ------------------------------------------------------------------------------------------------- cascade


def cascade_cfg(**cascade):
    d = copy.deepcopy(BASE)
    d["train"]["epochs"] = 2
    d["prune"] = {"method": "magnitude", "cascade": {"ratios": [0.5, 0.3, 0.2], "retrain_epochs": 1, **cascade}}
    return d


def test_cascade_prunes_in_turn_and_retrains(tmp_path):
    rec = run(cascade_cfg(), tmp_path)
    rows = _levels(tmp_path, rec)
    total = rows[0]["total"]
    assert [r["kept"] for r in rows] == [total] + [round(k * total) for k in (0.5, 0.3, 0.2)]
    assert [r["epochs"] for r in rows] == [2, 1, 1, 1]
    assert math.isclose(rec.sparsity, 0.8) and rec.epochs == 5
    d = tmp_path / rec.run_id / "cascade"
    blobs = [load_checked(d / f"level_{k}.pt") for k in range(4)]
    for a, b in zip(blobs, blobs[1:]):  # nested, and each level starts from the last one's weights (pruned)
        for name in a["masks"]:
            assert not (b["masks"][name] & ~a["masks"][name]).any()
    theta0 = load_checked(d / "init.pt")
    start2 = blobs[1]["final_state"]  # level 2 starts here: level 1's weights, pruned, never rewound
    for name, m in blobs[2]["masks"].items():
        assert (start2[name][~m] == 0).all() and not torch.equal(start2[name][m], theta0[name][m])


def test_cascade_chunks_and_errors():
    r = C.resolve(cascade_cfg(ratios=None, start=0.8, end=0.1, n=4, retrain_iterations=2))["prune"]["cascade"]
    assert r["ratios"] == pytest.approx([0.8, 0.8 * (0.125 ** (1 / 3)), 0.8 * (0.125 ** (2 / 3)), 0.1])
    from prunekit.schedules import Cascade

    assert Cascade(ratios=(0.9, 0.8, 0.7, 0.6, 0.5), retrain_iterations=2).chunks() == [[0.9, 0.8, 0.7], [0.6, 0.5]]
    with pytest.raises(pk.ConfigError, match="must decrease strictly"):
        C.resolve(cascade_cfg(ratios=[0.5, 0.6]))
    bad = cascade_cfg()
    bad["prune"]["sparsity"] = 0.9
    with pytest.raises(pk.ConfigError, match="does not combine with prune.cascade"):
        C.resolve(bad)


def test_cascade_resumes_after_interruption(tmp_path, monkeypatch):
    c = cascade_cfg()
    ref = run(c, tmp_path / "a")
    orig = Trainer._train_epoch
    calls = {"n": 0}

    def flaky(self, epoch):
        calls["n"] += 1
        if calls["n"] == 4:  # level 2's retraining
            raise Boom()
        return orig(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", flaky)
    with pytest.raises(Boom):
        run(c, tmp_path / "b")
    monkeypatch.setattr(Trainer, "_train_epoch", orig)
    rec = run(c, tmp_path / "b")
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    a, b = _levels(tmp_path / "a", ref), _levels(tmp_path / "b", rec)
    for r in a + b:
        r.get("prune", {}).pop("seconds", None)
    assert strip(a) == strip(b)


@pytest.mark.parametrize("control", ["reinit", "random_prune"])
def test_control_branches_are_stored_beside_the_ticket(tmp_path, control):
    rec = run(cfg(control=control, control_levels=[2]), tmp_path)
    rows = _levels(tmp_path, rec)
    ctrl = [r for r in rows if r["branch"] != "main"]
    assert [(r["level"], r["branch"]) for r in ctrl] == [(2, f"control_{control}")]
    ticket = next(r for r in rows if r["level"] == 2 and r["branch"] == "main")
    assert ctrl[0]["kept"] == ticket["kept"] and ctrl[0]["epochs"] == 4
    assert [r["level"] for r in rows if r["branch"] == "main"] == [0, 1, 2, 3]  # controls never feed back


def test_structured_cascade_ends_with_a_shrunk_model(tmp_path):
    d = cascade_cfg()
    d["prune"]["method"] = "filter_l1"
    rec = run(d, tmp_path)
    assert rec.structured is not None and rec.structured["params_shrunk"] < rec.structured["params_dense"]
    assert (tmp_path / rec.run_id / "shrunk.pt").exists()
