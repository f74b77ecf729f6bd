"""prunekit sweep: idempotent runs on a process pool, resume, failures recorded and retried on request."""
import copy

import pytest
import yaml

from prunekit.cli import main
from prunekit.experiments import Store, config as C
from prunekit.experiments.sweep import sweep
from tiny import fine_tune_of_dense, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = tiny("sw", grid={"prune.method": ["random", "magnitude"], "prune.sparsity": [0.5, 0.8]})


def test_sweep_runs_everything_once_and_skips_on_restart(tmp_path):
    logs = []
    res = sweep(GRID, tmp_path, workers=1, log=logs.append)
    ids = {C.run_id(C.resolve(r)) for r in C.expand(GRID)}
    assert res.ok and set(res.done) == ids and res.total == 4
    assert any("ETA" in line for line in logs)
    again = sweep(GRID, tmp_path, workers=1, log=lambda m: None)
    assert again.done == [] and set(again.skipped) == ids
    with Store(tmp_path / "results.sqlite") as s:
        assert {r["run_id"] for r in s.runs(name="sw")} == ids


def test_interrupted_run_is_resumed(tmp_path):
    one = copy.deepcopy(GRID)
    one["grid"] = {"prune.sparsity": [0.5]}
    [cfg] = C.expand(one)
    rid = C.run_id(C.resolve(cfg))
    with Store(tmp_path / "results.sqlite") as s:  # a run left "running" by a killed sweep
        from prunekit.experiments.runner import hardware, versions

        s.begin_run(rid, "sw", C.resolve(cfg), versions(), hardware("cpu"))
        assert s.status(rid) == "running"
    res = sweep(one, tmp_path, workers=1, log=lambda m: None)
    assert res.done == [rid]
    with Store(tmp_path / "results.sqlite") as s:
        assert s.status(rid) == "done"


def test_failures_are_recorded_and_retried_on_request(tmp_path):
    bad = copy.deepcopy(GRID)
    bad["grid"] = {"data.name": ["synthetic", "cifar10"]}  # no CIFAR archive here: that run fails
    res = sweep(bad, tmp_path, workers=1, data_dir=tmp_path / "nodata", log=lambda m: None)
    assert len(res.done) == 1 and len(res.failed) == 1
    [(rid, err)] = res.failed.items()
    assert "cifar" in err.lower()
    with Store(tmp_path / "results.sqlite") as s:
        assert s.status(rid) == "failed"
    again = sweep(bad, tmp_path, workers=1, data_dir=tmp_path / "nodata", log=lambda m: None)
    assert again.done == [] and rid in again.failed  # not retried silently, still reported
    retry = sweep(bad, tmp_path, workers=1, data_dir=tmp_path / "nodata", retry_failed=True, log=lambda m: None)
    assert rid in retry.failed and retry.done == []


@pytest.mark.slow
def test_process_pool_and_cli(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    assert main(["sweep", str(path), "--root", str(tmp_path / "r"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "random" in out
    with Store(tmp_path / "r" / "results.sqlite") as s:
        assert len(s.runs(name="sw")) == 4


def test_pretrained_dependency_runs_first(tmp_path):
    ft = fine_tune_of_dense(GRID, tmp_path)
    logs = []
    res = sweep(ft, tmp_path / "r", workers=1, log=logs.append)
    assert res.ok and len(res.done) == 4
    assert any("starting point" in line for line in logs)
    pre = C.resolve(C.expand(ft)[0])["model"]["pretrained"]["run_id"]
    with Store(tmp_path / "r" / "results.sqlite") as s:
        assert s.status(pre) == "done"


def test_baselines_join_a_method_grid_unless_switched_off():
    from prunekit.experiments.sweep import with_baselines

    g = copy.deepcopy(GRID)
    g["grid"]["prune.method"] = ["snip"]
    assert with_baselines(g)["grid"]["prune.method"] == ["snip", "random", "magnitude"]
    g2 = copy.deepcopy(GRID)
    g2["grid"] = {"prune": [{"method": "snip"}, {"method": "magnitude"}]}
    assert with_baselines(g2)["grid"]["prune"] == [{"method": "snip"}, {"method": "magnitude"}, {"method": "random"}]
    imp = copy.deepcopy(GRID)
    imp["grid"] = {"prune.method": ["lth", "ciap"]}
    assert with_baselines(imp) == imp  # IMP codes compare among themselves
    assert with_baselines(GRID) == GRID  # both baselines already there
    plain = {k: v for k, v in GRID.items() if k != "grid"}
    assert with_baselines(plain) == plain


def test_a_run_held_by_another_process_is_skipped_not_failed(tmp_path):
    from prunekit.io import acquire_lock, release_lock

    cfgs = C.expand(GRID)
    busy_id = C.run_id(C.resolve(cfgs[0]))
    lock = acquire_lock(tmp_path / busy_id / ".lock")  # as if another sweep were running it
    try:
        res = sweep(GRID, tmp_path, workers=1, log=lambda m: None)
    finally:
        release_lock(lock)
    assert res.busy == [busy_id] and len(res.done) == 3 and not res.failed
    with Store(tmp_path / "results.sqlite") as s:
        assert s.status(busy_id) != "done"
    again = sweep(GRID, tmp_path, workers=1, log=lambda m: None)
    assert again.done == [busy_id]


def test_workers_exit_when_the_sweep_dies():
    import os
    import subprocess
    import sys
    import textwrap
    import time

    code = textwrap.dedent("""
        import os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp
        from prunekit.experiments.sweep import worker_init
        pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=worker_init, initargs=(1,))
        fut = pool.submit(os.getpid)
        print(fut.result(), flush=True)
        pool.submit(time.sleep, 60)
        time.sleep(1)
        os._exit(0)  # the sweep dies without shutting the pool down
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    worker = int(out.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, 9)
    raise AssertionError("the worker outlived its sweep by 10 s")


def test_a_run_stopped_by_ctrl_c_resumes_without_retry_failed(tmp_path):
    one = copy.deepcopy(GRID)
    one["grid"] = {"prune.sparsity": [0.5]}
    [cfg] = C.expand(one)
    rid = C.run_id(C.resolve(cfg))
    with Store(tmp_path / "results.sqlite") as s:  # what the runner records when a worker gets the SIGINT
        from prunekit.experiments.runner import hardware, versions

        s.begin_run(rid, "sw", C.resolve(cfg), versions(), hardware("cpu"))
        s.fail_run(rid, "interrupted")
    res = sweep(one, tmp_path, workers=1, log=lambda m: None)
    assert res.done == [rid] and not res.failed
