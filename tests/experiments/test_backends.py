"""Sweep backends: store export/import, Ray tasks, Slurm arrays through submitit (local executor), errors."""
import copy
import json
import os
import signal
import sys
import threading
import time

import pytest

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.experiments import Store, config as C
from prunekit.experiments.backends import Job, make_backend
from prunekit.experiments.sweep import sweep
from tiny import fine_tune_of_dense, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = tiny("bk", grid={"prune.method": ["random", "magnitude"], "prune.sparsity": [0.5, 0.8]})

GRID20 = {**GRID, "grid": {"prune.method": ["random", "magnitude"], "prune.sparsity": [0.5, 0.6, 0.7, 0.8, 0.9],
                           "seed": [0, 1]}}

# what differs between two executions of the same run: timings, where and when it ran, its folder
VOLATILE_RUN_COLUMNS = {"created", "updated", "finished", "prune_seconds", "train_seconds", "total_seconds",
                        "versions", "hardware", "record"}
VOLATILE_RECORD_KEYS = {"run_dir", "peak_memory_mb", "cached"}


def _stable(value):
    """``value`` without timings (any key named seconds or ending in _seconds) and per-machine fields."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if k not in VOLATILE_RECORD_KEYS and k != "seconds" and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _contents(root) -> dict:
    """Per run: its stable run columns, record, epochs, layers, levels and experiment names."""
    out = {}
    with Store(root / "results.sqlite") as s:
        for row in s.runs(status=None):
            rid = row["run_id"]
            exp = s.export_run(rid)["tables"]
            out[rid] = {
                "run": {k: v for k, v in row.items() if k not in VOLATILE_RUN_COLUMNS},
                "record": _stable(json.loads(row["record"])) if row["record"] else None,
                "epochs": [{k: v for k, v in e.items() if k != "seconds"} for e in s.epochs(rid)],
                "layers": s.layers(rid),
                "levels": _stable(s.levels(rid)),
                "experiments": sorted(e["name"] for e in exp["experiments"]),
            }
    return out


def _ids(grid) -> set[str]:
    return {C.run_id(C.resolve(r)) for r in C.expand(grid)}


# ------------------------------------------------------------------------------------------------ store export
def _fake_run(store: Store, cfg: dict) -> str:
    """A run written through the store's own API: begin, two epochs, IMP levels, finish."""
    from prunekit.experiments.runner import hardware, versions

    res = C.resolve(cfg)
    rid = C.run_id(res)
    store.begin_run(rid, res["name"], res, versions(), hardware("cpu"))
    for ep in range(2):
        store.log_epoch(rid, ep, {"lr": 0.1, "train_loss": 1.0 / (ep + 1), "train_acc": 0.5, "val_acc": 0.6,
                                  "test_acc": 0.7, "seconds": 0.5, "sparsity": 0.8})
    store.log_levels(rid, [{"level": 0, "density": 1.0, "kept": 10, "total": 10, "epochs": 2},
                           {"level": 0, "branch": "control_random", "density": 1.0}])
    store.finish_run(rid, {"final_test_acc": 0.7, "best_val_acc": 0.6, "achieved_sparsity": 0.8, "collapsed": []},
                     [{"layer": "fc1.weight", "shape": "300x64", "kept": 10, "total": 50, "density": 0.2}])
    return rid


def test_store_export_import_round_trip(tmp_path):
    cfg = C.expand(GRID)[0]
    with Store(tmp_path / "a.sqlite") as a, Store(tmp_path / "b.sqlite") as b:
        rid = _fake_run(a, cfg)
        exported = a.export_run(rid)
        assert set(exported["tables"]) == {"runs", "experiments", "epochs", "layers", "levels"}
        assert all(exported["tables"][t] for t in exported["tables"])  # a row in every table
        b.link("another_experiment", rid)                   # links are added to, not replaced
        b.log_epoch(rid, 7, {"lr": 1.0})                    # stale rows of the run are replaced
        b.import_run(json.loads(json.dumps(exported)))      # as it travels: JSON
        again = b.export_run(rid)
        assert again["tables"]["epochs"] == exported["tables"]["epochs"]
        for t in ("runs", "layers", "levels"):
            assert again["tables"][t] == exported["tables"][t]
        names = sorted(r["name"] for r in again["tables"]["experiments"])
        assert names == sorted(["another_experiment", C.resolve(cfg)["name"]])
        assert b.record(rid) == a.record(rid) and b.levels(rid) == a.levels(rid)
        b.import_run(exported)  # idempotent
        assert b.export_run(rid)["tables"]["epochs"] == exported["tables"]["epochs"]

        with pytest.raises(PrunekitError, match="not a run export"):
            b.import_run({"run_id": rid})
        bad = copy.deepcopy(exported)
        bad["tables"]["epochs"][0]["gpu_watts"] = 3.0
        with pytest.raises(PrunekitError, match="gpu_watts.*newer prunekit"):
            b.import_run(bad)
        assert b.export_run(rid)["tables"]["epochs"] == exported["tables"]["epochs"]  # nothing half-written


# ---------------------------------------------------------------------------------------------------- worker side
def test_isolated_run_leaves_its_rows_for_a_stopped_sweep(tmp_path):
    """A remote worker's run (here in this process) never touches ROOT/results.sqlite; a sweep that did not collect
    it imports its rows from the run folder instead of running it again."""
    from prunekit.experiments.isolated import attempts, run_isolated

    cfg = C.expand(GRID)[0]
    rid = C.run_id(C.resolve(cfg))
    out = run_isolated(Job(rid, cfg), tmp_path, log=lambda m: None)
    assert out.ok and out.payload["tables"]["runs"][0]["status"] == "done" and out.attempts == 1
    assert not (tmp_path / "results.sqlite").exists()
    assert (tmp_path / rid / "store.json").exists() and len(attempts(tmp_path / rid)) == 1
    logs = []
    res = sweep(GRID, tmp_path, workers=1, log=logs.append)
    assert rid in res.skipped and len(res.done) == 3
    assert any("imported the records of 1 run(s)" in line for line in logs)
    with Store(tmp_path / "results.sqlite") as s:
        assert s.status(rid) == "done" and len(s.epochs(rid)) == 1


# ------------------------------------------------------------------------------------------------------------ ray
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for the Ray tests; the backend joins it and leaves it up."""
    ray = pytest.importorskip("ray", reason="the Ray backend tests need ray: pip install 'prunekit[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield ray
    ray.shutdown()


def test_ray_sweep_of_20_runs_matches_the_local_backend(tmp_path, ray_cluster):
    logs = []
    local = sweep(GRID20, tmp_path / "local", workers=1, log=lambda m: None)
    remote = sweep(GRID20, tmp_path / "ray", backend="ray", log=logs.append)
    assert local.ok and remote.ok and remote.backend == "ray"
    assert len(remote.done) == 20 and set(remote.done) == set(local.done) == _ids(GRID20)
    assert any("ETA" in line for line in logs)
    a, b = _contents(tmp_path / "local"), _contents(tmp_path / "ray")
    assert set(a) == set(b) and len(a) == 20
    for rid in a:
        assert a[rid] == b[rid], rid
    with Store(tmp_path / "ray" / "results.sqlite") as s:  # each run's folder is where the workers put it
        assert all((tmp_path / "ray" / rid / "last.pt").exists() for rid in b)
        assert all(json.loads(r["record"])["run_dir"] == str(tmp_path / "ray" / r["run_id"]) for r in s.runs())
    again = sweep(GRID20, tmp_path / "ray", backend="ray", log=lambda m: None)
    assert again.done == [] and len(again.skipped) == 20


def test_ray_failures_are_recorded_and_retried_on_request(tmp_path, ray_cluster):
    bad = copy.deepcopy(GRID)
    bad["grid"] = {"data.name": ["synthetic", "cifar10"]}  # no CIFAR archive here: that run fails
    res = sweep(bad, tmp_path, backend="ray", data_dir=tmp_path / "nodata", log=lambda m: None)
    assert len(res.done) == 1 and len(res.failed) == 1
    [(rid, err)] = res.failed.items()
    assert "cifar" in err.lower()
    with Store(tmp_path / "results.sqlite") as s:
        [row] = [r for r in s.runs(status="failed") if r["run_id"] == rid]
        assert "cifar" in row["error"].lower()
    again = sweep(bad, tmp_path, backend="ray", data_dir=tmp_path / "nodata", log=lambda m: None)
    assert again.done == [] and rid in again.failed
    retry = sweep(bad, tmp_path, backend="ray", data_dir=tmp_path / "nodata", retry_failed=True,
                  log=lambda m: None)
    assert rid in retry.failed and retry.done == []


def test_ray_runs_the_starting_point_first(tmp_path, ray_cluster):
    ft = fine_tune_of_dense(GRID, tmp_path)
    logs = []
    res = sweep(ft, tmp_path / "r", backend="ray", log=logs.append)
    assert res.ok and len(res.done) == 4
    assert any("starting point" in line for line in logs)
    pre = C.resolve(C.expand(ft)[0])["model"]["pretrained"]["run_id"]
    with Store(tmp_path / "r" / "results.sqlite") as s:
        assert s.status(pre) == "done"
        assert len(s.runs()) == 5  # the starting point once, not once per worker


# ---------------------------------------------------------------------------------------------- slurm (submitit)
def _slurm(**kw):
    pytest.importorskip("submitit", reason="the Slurm backend tests need submitit: pip install 'prunekit[slurm]'")
    from prunekit.experiments.slurm_backend import SlurmOptions

    return make_backend("slurm", slurm=SlurmOptions(executor="local", time_min=10, **kw))


def test_slurm_local_executor_sweep_records_land_in_the_store(tmp_path):
    grid = copy.deepcopy(GRID)
    grid["grid"] = {"data.name": ["synthetic", "cifar10"]}  # one run fails: no CIFAR archive here
    logs = []
    res = sweep(grid, tmp_path, backend=_slurm(array_parallelism=2), data_dir=tmp_path / "nodata",
                log=logs.append)
    assert res.backend == "slurm" and len(res.done) == 1 and len(res.failed) == 1
    assert any("ETA" in line for line in logs)
    [ok] = res.done
    [(bad, err)] = res.failed.items()
    assert "cifar" in err.lower()
    with Store(tmp_path / "results.sqlite") as s:
        assert s.status(ok) == "done" and len(s.epochs(ok)) == 1 and s.layers(ok)
        assert s.status(bad) == "failed" and "cifar" in s.runs(status="failed")[0]["error"].lower()
    assert (tmp_path / ok / "store.json").exists() and list((tmp_path / "slurm_logs").iterdir())
    again = sweep(grid, tmp_path, backend=_slurm(), data_dir=tmp_path / "nodata", log=lambda m: None)
    assert again.done == [] and bad in again.failed and again.skipped == [ok]


def test_slurm_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """Preemption as Slurm does it with submitit: the preemption signal (USR2) reaches the task's process; submitit
    calls the callable's checkpoint(), exits and the job is started again; the run resumes from its last.pt.

    (submitit's ``LocalJob._interrupt()`` signals the local executor's controller process, which does not handle the
    signal and dies without requeuing; the signal is sent to the task's own process, as Slurm does.)"""
    from prunekit.experiments.isolated import attempts

    epochs = 30
    one = copy.deepcopy(GRID)
    one.pop("grid")
    one["train"].update(epochs=epochs, batch_size=2, lr=0.01)
    rid = C.run_id(C.resolve(one))
    run_dir = tmp_path / rid
    sent = {}

    def preempt():
        deadline = time.time() + 120
        while time.time() < deadline and "pid" not in sent:
            tries = attempts(run_dir)
            if (run_dir / "last.pt").exists() and tries:
                sent["pid"] = tries[-1]["pid"]
                os.kill(sent["pid"], signal.SIGUSR2)
                return
            time.sleep(0.02)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    res = sweep(one, tmp_path, backend=_slurm(), log=lambda m: None)
    t.join(5)
    assert "pid" in sent, "the run never wrote a checkpoint"
    assert res.ok and res.done == [rid]
    tries = attempts(run_dir)
    assert len(tries) == 2, tries                         # preempted once, requeued once
    assert tries[0]["pid"] == sent["pid"] and tries[1]["pid"] != sent["pid"]
    assert 1 <= tries[1]["epochs_before"] < epochs        # the second attempt trained fewer than all epochs
    log = (tmp_path / "slurm_logs" / tries[1]["job_id"] / f"{tries[1]['job_id']}_0_log.out").read_text()
    assert "(resuming)" in log and "attempt 2" in log and "Requeued job" in log
    err = (tmp_path / "slurm_logs" / tries[1]["job_id"] / f"{tries[1]['job_id']}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in err
    with Store(tmp_path / "results.sqlite") as s:
        rows = [r for r in s.runs(status=None) if r["run_id"] == rid]
        assert len(rows) == 1 and rows[0]["status"] == "done"
        assert [e["epoch"] for e in s.epochs(rid)] == list(range(epochs))  # the first attempt's epochs kept
        assert s.record(rid)["epochs"] == epochs


def test_slurm_option_parsing():
    from prunekit.experiments.slurm_backend import parse_mem_gb, parse_time

    assert parse_time("90") == 90 and parse_time("1:30:00") == 90 and parse_time("2-00:00:00") == 2880
    assert parse_time("10:30") == 11 and parse_time("1-12") == 2160
    assert parse_mem_gb("16G") == 16.0 and parse_mem_gb("512M") == 0.5 and parse_mem_gb("1T") == 1024.0
    with pytest.raises(PrunekitError, match="HH:MM:SS"):
        parse_time("an hour")
    with pytest.raises(PrunekitError, match="16G"):
        parse_mem_gb("lots")


# --------------------------------------------------------------------------------------------------------- errors
def test_unknown_backend(tmp_path, capsys):
    with pytest.raises(PrunekitError, match="unknown sweep backend 'dask': choose one of local, ray, slurm"):
        make_backend("dask")
    with pytest.raises(PrunekitError, match="unknown sweep backend"):
        sweep(GRID, tmp_path, backend="dask", log=lambda m: None)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(path), "--root", str(tmp_path), "--backend", "dask"])
    assert e.value.code == 2 and "invalid choice: 'dask'" in capsys.readouterr().err


@pytest.mark.parametrize("backend, module", [("ray", "ray"), ("slurm", "submitit")])
def test_missing_package_names_the_install_command(tmp_path, capsys, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(PrunekitError, match=rf"needs the '{module}' package.*pip install 'prunekit\[{backend}\]'"):
        make_backend(backend).start(1)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    args = ["sweep", str(path), "--root", str(tmp_path / "r"), "--backend", backend, "--no-report"]
    if backend == "slurm":
        args += ["--slurm-executor", "local"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"pip install 'prunekit[{backend}]'" in err and "Traceback" not in err


def test_slurm_needs_sbatch_and_address_needs_ray(tmp_path, capsys):
    import shutil

    pytest.importorskip("submitit", reason="the Slurm backend tests need submitit: pip install 'prunekit[slurm]'")
    if shutil.which("sbatch") is None:
        with pytest.raises(PrunekitError, match="no sbatch on PATH.*login node.*--slurm-executor local"):
            make_backend("slurm").start(1)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    assert main(["sweep", str(path), "--root", str(tmp_path), "--address", "auto"]) == 2
    assert "add --backend ray" in capsys.readouterr().err


def test_the_local_path_imports_neither_ray_nor_submitit(tmp_path):
    import subprocess

    code = ("import sys, json\n"
            "from prunekit.experiments.sweep import sweep\n"
            f"sweep(json.loads({json.dumps(json.dumps({**GRID, 'grid': {'prune.sparsity': [0.5]}}))}), "
            f"{str(tmp_path)!r}, workers=1, log=lambda m: None)\n"
            "print(sorted(m for m in ('ray', 'submitit') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
