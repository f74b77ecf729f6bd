"""DDP: every data-dependent method gives, on 2 gloo processes that share the scoring work, the masks of one process
on the same data (and the same OBS-updated weights to float tolerance); every rank holds the identical mask."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunekit.checkpoint import load_checked
import prunekit as pk
from prunekit import distributed
from prunekit.registry import methods

pytestmark = pytest.mark.usefixtures("one_thread")

#: Small sizes so that every method splits its work into several units (the test checks that rank 1 had some).
OPTIONS = {
    "grad_norm": {}, "snip": {}, "fisher_diag": {}, "fisher_pruner": {}, "fts": {}, "fbss": {},
    "grasp": {"batch_size": 64},
    "px": {"rounds": 3, "batch_size": 64},
    "sipp": {"sample_size": 150},
    "pfp": {"sample_size": 150},
    "diagfisher": {"diag_fisher_samples": 600},
    "naivehess": {"hess_samples": 300, "hess_batch": 50},
    "kfac": {"kfac_samples": 400, "kfac_batch": 50},
    "sparsegpt": {}, "wanda": {}, "obc": {},
}
OBS = {"fisher_samples": 64, "max_micro_batch": 16, "block_size": 40}
OBS_OVERRIDES = {"woodfisher": {"block_size": None}, "woodtaylor": {"block_size": None},
                 "woodfisherblockgroup": {"block_size": 60}}


def data_methods() -> list[str]:
    return sorted(m.name for m in methods() if m.needs_data in ("inputs", "labels"))


def options(method: str) -> dict:
    if method.startswith("wood"):
        return {**OBS, **OBS_OVERRIDES.get(method, {})}
    return OPTIONS[method]


def setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(600, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (600,), generator=g)
    return model, [(x[i:i + 50], y[i:i + 50]) for i in range(0, 600, 50)]


def prune_one(method: str):
    model, data = setup()
    masks = pk.prune(model, method, sparsity=0.6, data=data, **options(method))
    return ({n: m.clone() for n, m in masks.as_dict().items()},
            {n: p.detach().clone() for n, p in model.named_parameters()})


def flows():
    """InCoP's information- and gradient-flow statistics of the test model."""
    from prunekit.incop import gradient_flow, information_flow

    model, data = setup()
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.3
             for n, p in model.named_parameters() if n.endswith("weight")}
    return (information_flow(model, data, layers=["0", "2", "4"], stat="mean_abs"),
            gradient_flow(model, masks, data, stat="mean_abs"))


def shrink_then_train():
    """Train a small conv net, prune half its filters (filter_l1), shrink it, train the smaller copy: under DDP the
    second fit wraps the new, smaller model."""
    from prunekit.train import Trainer
    from prunekit.train.config import TrainConfig

    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False)
    Trainer(model, cfg, data, val_data=data).fit()
    masks = pk.prune(model, "filter_l1", sparsity=0.5, data=data)
    small = pk.shrink(model, masks, x[:2])
    trainer = Trainer(small, cfg, data, val_data=data)
    history = trainer.fit()
    return {n: p.detach().clone() for n, p in small.named_parameters()}, history[-1]["val_acc"]


def _worker(rank: int, world: int, folder: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    counts = {"mine": 0, "theirs": 0}
    owns = distributed.owns

    def counting(index: int) -> bool:
        ok = owns(index)
        counts["mine" if ok else "theirs"] += 1
        return ok

    distributed.owns = counting  # distributed.mine asks owns too
    out = {}
    try:
        for name in names:
            counts.update(mine=0, theirs=0)
            masks, weights = prune_one(name)
            out[name] = (masks, weights, dict(counts))
        out["_flow"] = flows()
        out["_shrink"] = shrink_then_train()
    finally:
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    names = data_methods()
    mp.spawn(_worker, args=(2, str(folder), names), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]


def test_every_data_method_is_covered():
    missing = [m for m in data_methods() if not m.startswith("wood") and m not in OPTIONS]
    assert not missing, f"add {missing} to OPTIONS so the DDP test covers them"


@pytest.mark.parametrize("method", data_methods())
def test_two_ranks_give_the_one_process_mask(two_ranks, method):
    ref_masks, ref_weights = prune_one(method)
    r0, r1 = (ranks[method] for ranks in two_ranks)
    for name, m in ref_masks.items():
        assert torch.equal(r0[0][name], r1[0][name]), f"{method}: ranks disagree on {name}"
        assert torch.equal(r0[0][name], m), f"{method}: 2-process mask of {name} differs from 1 process"
    for name, w in ref_weights.items():
        assert torch.equal(r0[1][name], r1[1][name]), f"{method}: ranks hold different weights for {name}"
        torch.testing.assert_close(r0[1][name], w, rtol=1e-9, atol=1e-12)
    # the work was shared: rank 1 computed some units itself and skipped rank 0's
    counts = r1[2]
    single_unit = method in ("woodfisher", "woodtaylor")  # one global block: the owner (rank 0) inverts it
    assert counts["mine"] >= 1 and counts["theirs"] >= 1, f"{method}: rank 1 did not share the work: {counts}"
    assert single_unit or r0[2]["mine"] >= 1


def test_helpers_are_no_ops_without_a_process_group():
    t = torch.arange(3.0)
    distributed.all_sum(t)
    distributed.all_max(t)
    assert torch.equal(t, torch.arange(3.0))
    assert distributed.mine([1, 2, 3]) == [1, 2, 3] and distributed.is_main() and distributed.world_size() == 1
    assert torch.equal(distributed.all_cat(t), t)


def test_flow_statistics_are_reduced_over_ranks(two_ranks):
    ref = flows()
    for ranks in two_ranks:
        for got, want in zip(ranks["_flow"], ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


BASE = {"name": "ddp", "model": "lenet_300_100", "data": {"name": "synthetic"}, "seed": 0,
        "train": {"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "progress": False}}
SCHEDULES = {
    "one-shot snip": {"prune": {"method": "snip", "sparsity": 0.9}},
    "gradual woodfisherblock": {"train": {**BASE["train"], "epochs": 3},
                                "prune": {"method": "woodfisherblock", "sparsity": 0.8, "fisher_samples": 64,
                                          "block_size": 100, "samples": {"random": 256},
                                          "gradual": {"start": 0, "end": 2, "freq": 1}}},
    "imp lth with a step rewind": {"prune": {"method": "lth", "levels": 2, "prune_fraction": 0.5,
                                             "rewind": "step:3it"}},
}


def torchrun_matches_one_process(tmp_path, cfg):
    """`torchrun --nproc_per_node 2 -m prunekit run CFG` (gloo): the one-process masks, the one-process weights to
    float tolerance, one record in the store written by rank 0."""
    import subprocess
    import sys

    import yaml

    from prunekit.experiments import Store, run
    from prunekit.experiments import config as C

    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = run(cfg, tmp_path / "one", log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "prunekit", "run", str(path), "--root", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rid = C.run_id(C.resolve(cfg))
    # the final weights and masks: the trainer's last.pt, or the last IMP level's file
    last = f"imp/level_{one.levels[-1]['level']}.pt" if one.levels else "last.pt"
    a = load_checked(tmp_path / "one" / rid / last)
    b = load_checked(tmp_path / "two" / rid / last)
    weights = "final_state" if one.levels else "model"
    assert a["masks"].keys() == b["masks"].keys()
    for name, m in a["masks"].items():
        assert torch.equal(m, b["masks"][name]), f"mask of {name} differs between 1 and 2 processes"
    for name, w in a[weights].items():
        torch.testing.assert_close(b[weights][name], w, rtol=1e-4, atol=1e-5)
    with Store(tmp_path / "two" / "results.sqlite") as s:
        [row] = s.runs(name="ddp")
        assert row["status"] == "done"
        rec = s.record(rid)
    assert abs(rec["final_test_acc"] - one.final_test_acc) < 0.02
    return rec, one


def test_torchrun_run_matches_one_process(tmp_path):
    torchrun_matches_one_process(tmp_path, {**BASE, **SCHEDULES["one-shot snip"]})


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [k for k in SCHEDULES if k != "one-shot snip"])
def test_torchrun_every_schedule(tmp_path, schedule):
    rec, one = torchrun_matches_one_process(tmp_path, {**BASE, **SCHEDULES[schedule]})
    assert rec["achieved_sparsity"] == pytest.approx(one.achieved_sparsity, abs=1e-12)
    if one.levels:
        assert [lv["density"] for lv in rec["levels"]] == pytest.approx([lv["density"] for lv in one.levels])


def test_a_shrunk_model_is_wrapped_again(two_ranks):
    weights, acc = shrink_then_train()
    for ranks in two_ranks:
        got, got_acc = ranks["_shrink"]
        assert got.keys() == weights.keys()
        for n, w in weights.items():
            assert got[n].shape == w.shape
            torch.testing.assert_close(got[n], w, rtol=1e-4, atol=1e-5)
        assert got_acc == acc
    assert two_ranks[0]["_shrink"][0]["0.weight"].shape[0] < 6  # filters are gone: the model that trained is smaller
