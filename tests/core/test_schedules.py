"""Schedules: one-shot, gradual (cubic) with recompute sub-steps, and their use in experiments."""
import pytest
import torch

from prunekit.checkpoint import load_checked
import prunekit as pk
from prunekit.experiments import Store, config as C, run
from prunekit.schedules import Gradual, OneShot
from tiny import die_after_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradual_matches_the_reference_resnet50_table():
    g = Gradual(0.90, start=1, freq=5, end=40, initial_sparsity=0.05, reference_compat=True)
    assert g.epochs() == [1, 6, 11, 16, 21, 26, 31, 36]
    got = [round(s, 3) for _, s in g.events()]
    assert got == [0.050, 0.337, 0.551, 0.702, 0.802, 0.861, 0.890, 0.899]
    fixed = Gradual(0.90, start=1, freq=5, end=40, initial_sparsity=0.05)
    assert fixed.epochs()[-1] == 40 and fixed.events()[-1][1] == pytest.approx(0.90)


@pytest.mark.parametrize("degree", [1, 3, 5])
def test_gradual_formula(degree):
    g = Gradual(0.8, start=2, freq=3, end=14, initial_sparsity=0.1, degree=degree)
    for e in g.epochs():
        frac = min(1.0, (e - 2) / 12)
        assert g.sparsity_at(e) == pytest.approx(0.8 - 0.7 * (1 - frac) ** degree)
    assert g.target(3) is None and g.target(5) == pytest.approx(g.sparsity_at(5))


def test_gradual_skips_the_launch_step_at_zero_initial_sparsity():
    assert Gradual(0.9, start=0, freq=2, end=6).epochs() == [2, 4, 6]
    assert Gradual(0.9, start=0, freq=2, end=6, prune_at_launch=True).epochs() == [0, 2, 4, 6]


def test_recompute_substeps():
    g = Gradual(0.9, recompute_num=2, recompute_schedule="poly", recompute_degree=2)
    subs = g.substeps(0.5, 0.8)
    assert subs == pytest.approx([0.5 + 0.3 * (1 - (1 - r / 3) ** 2) for r in (1, 2, 3)])
    assert subs[-1] == pytest.approx(0.8)
    assert Gradual(0.9, recompute_num=3).substeps(0.0, 0.4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_one_shot():
    assert OneShot(0.9, at_epoch=2).target(2) == 0.9 and OneShot(0.9, at_epoch=2).target(1) is None


BASE = {
    "name": "gradual", "model": "lenet_300_100", "data": {"name": "synthetic"},
    "train": {"epochs": 6, "batch_size": 64, "lr": 0.05, "weight_decay": 1e-3, "weight_decay_after_prune": False,
              "progress": False},
    "prune": {"method": "magnitude", "sparsity": 0.9, "gradual": {"start": 1, "freq": 2, "end": 4,
                                                                   "initial_sparsity": 0.3, "recompute_num": 1}},
}


def test_gradual_run_follows_the_schedule_and_resumes(tmp_path, monkeypatch):
    rec = run(BASE, tmp_path / "a", log=lambda m: None)
    g = Gradual(0.9, start=1, freq=2, end=4, initial_sparsity=0.3, recompute_num=1)
    with Store(tmp_path / "a" / "results.sqlite") as s:
        sp = [e["sparsity"] for e in s.epochs(rec.run_id)]
    assert sp[0] == 0.0
    for e, target in g.events():  # the epoch's sparsity is the scheduled one (exact counts)
        assert sp[e] == pytest.approx(target, abs=1e-4)
    assert sp[5] == pytest.approx(0.9, abs=1e-4)
    assert [(ev["epoch"], ev["substep"]) for ev in rec.prune_events] == [(1, 0), (1, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    ckpt = load_checked(tmp_path / "a" / rec.run_id / "last.pt")
    assert ckpt["weight_decay_off"] is True
    # killed after epoch 2: resumes between two pruning steps and ends identical
    undo = die_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(BASE, tmp_path / "b", log=lambda m: None)
    undo()
    again = run(BASE, tmp_path / "b", log=lambda m: None)
    def no_time(events):
        return [{k: v for k, v in e.items() if k not in ("seconds", "diagnostics_seconds")} for e in events]

    assert again.final_test_acc == rec.final_test_acc and no_time(again.prune_events) == no_time(rec.prune_events)
    w1 = load_checked(tmp_path / "a" / rec.run_id / "last.pt")["model"]
    w2 = load_checked(tmp_path / "b" / rec.run_id / "last.pt")["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("patch, match", [
    ({"gradual": {"start": 1, "end": 9}}, "set train.epochs to at least 10"),
    ({"gradual": {"start": 3, "end": 1}}, "start <= end"),
    ({"gradual": {"start": 1, "end": 2}, "warmup": 1}, "exclude each other"),
    ({"gradual": {"strt": 1}}, "did you mean 'start'"),
    ({"gradual": {"start": 1, "end": 3, "target_sparsity": 0.5}}, "the target is prune.sparsity"),
])
def test_gradual_config_errors(patch, match):
    data = {**BASE, "prune": {"method": "magnitude", "sparsity": 0.9, **patch}}
    with pytest.raises(pk.ConfigError, match=match):
        C.resolve(data)
