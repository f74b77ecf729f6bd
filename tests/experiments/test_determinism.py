"""Results do not depend on how a sweep was launched: every run computes with its own intra-op thread count."""
import torch

from prunekit.checkpoint import load_checked
from prunekit.experiments import Store, config as C, run
from prunekit.experiments.sweep import sweep
from tiny import tiny

# a convolutional model: its CPU kernels split work by thread count, so results differ bit for bit with it
CONV = dict(model="lenet5_caffe", data={"name": "synthetic", "resize": 16},
            train={"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False})
GRID = tiny("det", grid={"prune.sparsity": [0.3, 0.5]}, **CONV)


def _rows(root, ids):
    out = {}
    with Store(root / "results.sqlite") as s:
        for rid in ids:
            rec = s.record(rid)
            hw = [r for r in s.runs(status="done") if r["run_id"] == rid][0]
            out[rid] = (rec["final_test_acc"], rec["best_val_acc"], rec["achieved_sparsity"],
                        [(e["epoch"], e["train_loss"], e["val_loss"], e["test_acc"]) for e in s.epochs(rid)],
                        hw["hardware"])
    return out


def test_workers_1_and_2_give_bit_identical_rows(tmp_path):
    ids = [C.run_id(C.resolve(r)) for r in C.expand(GRID)]
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # `--workers 1` runs in the sweep's own process, with the process's threads
    try:
        sweep(GRID, tmp_path / "one", workers=1, baselines=False, log=lambda m: None)
        assert torch.get_num_threads() == 2  # the run's setting does not leak into the caller
    finally:
        torch.set_num_threads(n)
    sweep(GRID, tmp_path / "two", workers=2, baselines=False, log=lambda m: None)
    a, b = _rows(tmp_path / "one", ids), _rows(tmp_path / "two", ids)
    assert len(a) == 2 and a == b
    assert all('"torch_threads": 1' in row[4] for row in a.values())  # recorded with the run
    for rid in ids:
        wa = load_checked(tmp_path / "one" / rid / "last.pt", rid)["model"]
        wb = load_checked(tmp_path / "two" / rid / "last.pt", rid)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_threads_sets_the_count_and_joins_the_identity_only_when_set(tmp_path):
    cfg = tiny("det1", prune={"method": "magnitude", "sparsity": 0.5}, **CONV)
    two = {**cfg, "train": {**cfg["train"], "threads": 2}}
    assert C.run_id(C.resolve(cfg)) != C.run_id(C.resolve(two))
    assert "threads" not in str(C.resolve(cfg)["train"].get("threads") or "")  # unset: old ids unchanged
    r1, r2 = run(cfg, tmp_path, log=lambda m: None), run(two, tmp_path, log=lambda m: None)
    with Store(tmp_path / "results.sqlite") as s:
        hw = {r["run_id"]: r["hardware"] for r in s.runs(status="done")}
    assert '"torch_threads": 1' in hw[r1.run_id] and '"torch_threads": 2' in hw[r2.run_id]
    w1 = load_checked(tmp_path / r1.run_id / "last.pt")["model"]
    w2 = load_checked(tmp_path / r2.run_id / "last.pt")["model"]
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)  # why the count must be fixed per run
