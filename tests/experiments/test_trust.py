"""Files from elsewhere are data, never code; a damaged or foreign checkpoint is never trusted.

Each test plants a malicious or damaged file where prunekit reads one and checks that no code ran (a marker file
never appears), that the error names the file, and that a run ends with the numbers of an uninterrupted run.
"""
import errno
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.checkpoint import (MAGIC, CheckpointError, CorruptCheckpointWarning, encode, load_checked,
                                 save_checked)
from prunekit.errors import PrunekitError
from prunekit.experiments import Store, config as C, run
from prunekit.io import WriteError
from tiny import die_after_epoch

SRC = Path(__file__).resolve().parents[2] / "src"

BASE = {"name": "trust", "model": "lenet_300_100", "data": {"name": "synthetic"},
        "train": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
        "prune": {"method": "magnitude", "sparsity": 0.8, "warmup": 1}, "seed": 0}


class Plant:
    """An object whose unpickling touches a marker file: loading it with code execution allowed leaves a trace."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def malicious_pickle(path: Path, marker: Path) -> None:
    """A torch.save file whose payload runs code when unpickled without ``weights_only``."""
    torch.save({"format": "prunekit.train.checkpoint/1", "model": Plant(marker)}, path)


def forged_checkpoint(path: Path, marker: Path, owner: str | None) -> None:
    """The same payload under a valid header and checksum: only weights-only loading stops it."""
    import hashlib
    import io
    import json

    buf = io.BytesIO()
    torch.save({"format": "prunekit.train.checkpoint/1", "model": Plant(marker)}, buf)
    payload = buf.getvalue()
    header = {"owner": owner, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)


def test_no_source_file_loads_with_weights_only_false():
    hits = []
    for p in SRC.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "weights_only=False" in line.replace(" ", ""):
                hits.append(f"{p.relative_to(SRC)}:{i}")
    assert hits == []


# ------------------------------------------------------------------------------------------- the checked format
def test_checked_checkpoint_round_trip_and_every_damage_is_named(tmp_path):
    path = tmp_path / "c.pt"
    obj = {"w": torch.arange(6.0).view(2, 3), "n": 3, "rng": (1, (2, 3), None)}
    save_checked(obj, path, "run-a")
    back = load_checked(path, "run-a")
    assert torch.equal(back["w"], obj["w"]) and back["n"] == 3 and back["rng"] == (1, (2, 3), None)
    good = path.read_bytes()

    def damaged(data: bytes, match: str, owner="run-a"):
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=match) as e:
            load_checked(path, owner)
        assert str(path) in str(e.value)

    flipped = bytearray(good)
    for i in range(len(good) - 200, len(good) - 150):  # 50 flipped bytes inside the payload
        flipped[i] ^= 0xFF
    damaged(bytes(flipped), "checksum mismatch")
    damaged(good[: len(good) // 2], "truncated")
    damaged(b"", "empty file")
    damaged(good, "belongs to 'run-a', not to 'run-b'", owner="run-b")
    damaged(b"\x80\x04junk", "no prunekit checkpoint header")


def test_numpy_values_are_stored_as_plain_data(tmp_path):
    import numpy as np

    save_checked({"a": np.arange(3), "s": np.float64(2.5)}, tmp_path / "n.pt", None)
    back = load_checked(tmp_path / "n.pt")
    assert torch.equal(back["a"], torch.arange(3)) and back["s"] == 2.5 and type(back["s"]) is float


def test_malicious_payloads_never_run(tmp_path):
    marker = tmp_path / "pwned"
    bare, forged = tmp_path / "bare.pt", tmp_path / "forged.pt"
    malicious_pickle(bare, marker)
    forged_checkpoint(forged, marker, "x")
    with pytest.raises(CheckpointError, match="no prunekit checkpoint header"):
        load_checked(bare)
    with pytest.raises(CheckpointError, match="never loads") as e:
        load_checked(forged, "x")
    assert "weights_only=False" not in str(e.value) and str(forged) in str(e.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- runs that resume
def _interrupted(root: Path, monkeypatch, cfg=BASE) -> str:
    """Run ``cfg`` into ``root`` until it dies after epoch 1 is logged (last.pt holds epoch 1); returns its id."""
    undo = die_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, root, log=lambda m: None)
    undo()
    rid = C.run_id(C.resolve(cfg))
    assert (root / rid / "last.pt").exists()
    return rid


def _final(root: Path, rid: str) -> tuple:
    state = load_checked(root / rid / "last.pt", rid)
    with Store(root / "results.sqlite") as s:
        rec = s.record(rid)
        epochs = [(e["epoch"], e["test_acc"]) for e in s.epochs(rid)]
    return rec["final_test_acc"], rec["best_val_acc"], epochs, state["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    rec = run(BASE, root, log=lambda m: None)
    other = run({**BASE, "seed": 1}, root, log=lambda m: None)
    return root, rec.run_id, other.run_id


def _tamper(kind: str, path: Path, other: Path, marker: Path, rid: str) -> None:
    data = path.read_bytes()
    if kind == "flipped":
        b = bytearray(data)
        for i in range(len(b) // 2, len(b) // 2 + 50):
            b[i] ^= 0x5A
        path.write_bytes(bytes(b))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        shutil.copyfile(other, path)
    elif kind == "pickle":
        malicious_pickle(path, marker)
    elif kind == "forged":
        forged_checkpoint(path, marker, rid)


@pytest.mark.parametrize("kind", ["flipped", "truncated", "empty", "foreign", "pickle", "forged"])
def test_untrusted_last_pt_restarts_the_run_to_the_uninterrupted_result(tmp_path, monkeypatch, straight, kind):
    ref_root, ref_id, other_id = straight
    root = tmp_path / "runs"
    rid = _interrupted(root, monkeypatch)
    assert rid == ref_id
    marker = tmp_path / "pwned"
    last = root / rid / "last.pt"
    _tamper(kind, last, ref_root / other_id / "last.pt", marker, rid)
    tampered = last.read_bytes()
    with pytest.warns(CorruptCheckpointWarning, match="last.pt") as w:
        run(BASE, root, log=lambda m: None)
    assert "training starts from scratch" in str(w[0].message)
    assert not marker.exists()
    assert (root / rid / "last.pt.corrupt").read_bytes() == tampered  # moved aside, never deleted
    got, want = _final(root, rid), _final(ref_root, ref_id)
    assert got[:3] == want[:3]
    assert all(torch.equal(got[3][k], want[3][k]) for k in want[3])


def test_no_restart_corrupt_stops_with_the_file_named(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    rid = _interrupted(root, monkeypatch)
    last = root / rid / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    monkeypatch.setenv("PRUNEKIT_ON_CORRUPT", "error")
    with pytest.raises(CheckpointError, match="no-restart-corrupt") as e:
        run(BASE, root, log=lambda m: None)
    assert str(last) in str(e.value)
    assert last.exists() and not (root / rid / "last.pt.corrupt").exists()  # left for the user to look at
    with Store(root / "results.sqlite") as s:
        row = s.runs(status="failed")[0]
        assert row["run_id"] == rid and "truncated" in row["error"]


def test_cli_no_restart_corrupt_flag(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    rid = _interrupted(root, monkeypatch)
    (root / rid / "last.pt").write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(BASE))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_ON_CORRUPT", None)
    out = subprocess.run([sys.executable, "-m", "prunekit", "run", str(cfg), "--root", str(root), "--no-progress",
                          "--no-restart-corrupt"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "last.pt: empty file" in out.stderr and "Traceback" not in out.stderr


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight):
    ref_root, ref_id, _ = straight
    root = tmp_path / "runs"
    import prunekit.io as pio

    real_fsync, calls = os.fsync, {"n": 0}

    def full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".last.pt." in name:
            calls["n"] += 1
            if calls["n"] == 2:  # the second epoch's checkpoint finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(pio.os, "fsync", full)
    with pytest.raises(WriteError, match="disk is full") as e:
        run(BASE, root, log=lambda m: None)
    assert "last.pt" in str(e.value)
    rid = ref_id
    assert load_checked(root / rid / "last.pt", rid)["epoch"] == 1  # the previous one, intact
    assert not [p for p in (root / rid).iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    with Store(root / "results.sqlite") as s:
        assert s.status(rid) == "failed"
    monkeypatch.setattr(pio.os, "fsync", real_fsync)
    run(BASE, root, log=lambda m: None)
    got, want = _final(root, rid), _final(ref_root, ref_id)
    assert got[:3] == want[:3]


def test_pretrained_run_with_damaged_weights_is_refused(tmp_path):
    from tiny import fine_tune_of_dense

    cfg = {**BASE, "train": {**BASE["train"], "epochs": 1}, "prune": {"method": "magnitude", "sparsity": 0.5}}
    ft = fine_tune_of_dense(cfg, tmp_path)
    dense = C.resolve(C.load(tmp_path / "dense.yaml"))
    root = tmp_path / "runs"
    run(C.load(tmp_path / "dense.yaml"), root, log=lambda m: None)
    last = root / C.run_id(dense) / "last.pt"
    b = bytearray(last.read_bytes())
    b[len(b) // 2] ^= 1
    last.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        run(ft, root, log=lambda m: None)
    assert str(last) in str(e.value)


# --------------------------------------------------------------------------------------- IMP level files
IMP = {**BASE, "train": {**BASE["train"], "epochs": 2},
       "prune": {"method": "lth", "levels": 2, "prune_fraction": 0.5, "rewind": "step:1ep"}}


@pytest.fixture(scope="module")
def imp_straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    return root, run(IMP, root, log=lambda m: None)


@pytest.mark.parametrize("damage", ["level_1", "level_0_and_rewind"])
def test_damaged_level_files_are_moved_aside_and_redone(tmp_path, imp_straight, damage):
    ref_root, straight = imp_straight
    root = tmp_path / "b"
    run(IMP, root, log=lambda m: None)
    rid = straight.run_id
    imp = root / rid / "imp"
    with Store(root / "results.sqlite") as s:  # forget that the run finished, as if it had died at the end
        with s.transaction() as c:
            c.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", (rid,))
    if damage == "level_1":
        lvl = imp / "level_1.pt"
        lvl.write_bytes(lvl.read_bytes()[:-10])
        moved = ["level_1.pt"]
    else:  # level 0 is redone; its last.pt is past the rewind point, so it trains again from scratch
        l0 = bytearray((imp / "level_0.pt").read_bytes())
        l0[-100] ^= 1
        (imp / "level_0.pt").write_bytes(bytes(l0))
        (imp / "level_0" / "rewind.pt").write_bytes(b"")
        moved = ["level_0.pt", "level_0/rewind.pt", "level_0/last.pt"]
    with pytest.warns(CorruptCheckpointWarning):
        again = run(IMP, root, log=lambda m: None)
    for m in moved:
        assert (imp / f"{m}.corrupt").exists()
    assert again.final_test_acc == straight.final_test_acc
    a = load_checked(ref_root / rid / "imp" / "level_2.pt")
    b = load_checked(imp / "level_2.pt")
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert all(torch.equal(a["final_state"][k], b["final_state"][k]) for k in a["final_state"])


# ----------------------------------------------------------------------------------------- shrunk archives
def _archive(tmp_path) -> tuple[Path, dict]:
    from prunekit.models import get_model
    from prunekit.structured import save_shrunk

    model = get_model("lenet5_caffe", num_classes=10).eval()
    path = tmp_path / "ok.pt"
    save_shrunk(path, model)
    return path, torch.load(path, weights_only=True)


def _write(tmp_path, blob, name="bad.pt") -> Path:
    p = tmp_path / name
    torch.save(blob, p)
    return p


def _check_refused(path: Path, marker: Path, match: str):
    from prunekit.structured import load_shrunk

    with pytest.raises(PrunekitError, match=match) as e:
        gm = load_shrunk(path)
        gm(torch.randn(1, 1, 28, 28))  # were it built, its forward would run the payload
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_archive_placeholder_target_injection_is_refused(tmp_path):
    path, blob = _archive(tmp_path)
    marker = tmp_path / "pwned"
    inject = f"x):\n    __import__('pathlib').Path({str(marker)!r}).touch()\n    def f(y"
    ph = next(n for n in blob["nodes"] if n["op"] == "placeholder")
    ph["target"] = inject
    _check_refused(_write(tmp_path, blob), marker, "not a plain identifier")
    ph["target"], ph["name"] = "x", inject
    _check_refused(_write(tmp_path, blob, "b2.pt"), marker, "not a new plain identifier")


def test_archive_walk_to_globals_is_refused(tmp_path):
    """getattr(x, '__class__') ... '__globals__' ... then a call: each step is refused before building."""
    path, blob = _archive(tmp_path)
    marker = tmp_path / "pwned"
    first = next(n for n in blob["nodes"] if n["op"] == "placeholder")["name"]
    out = blob["nodes"].pop()  # output
    walk = [
        {"name": "c", "op": "call_function", "target": "builtins:getattr",
         "args": {"__tuple__": [{"__node__": first}, "__class__"]}, "kwargs": {"__dict__": []}},
        {"name": "g", "op": "call_function", "target": "builtins:getattr",
         "args": {"__tuple__": [{"__node__": "c"}, "__init__"]}, "kwargs": {"__dict__": []}},
    ]
    blob["nodes"] += walk + [out]
    _check_refused(_write(tmp_path, blob), marker, "reads an attribute other than")
    # a call through operator.call / getitem of __globals__ / eval
    for target in ("_operator:call", "builtins:eval", "operator:attrgetter", "torch:load", "torch:from_file"):
        b2 = torch.load(path, weights_only=True)
        o = b2["nodes"].pop()
        b2["nodes"] += [{"name": "z", "op": "call_function", "target": target,
                         "args": {"__tuple__": [{"__node__": first}]}, "kwargs": {"__dict__": []}}, o]
        _check_refused(_write(tmp_path, b2, "b3.pt"), marker, "not an allowed function")
    b3 = torch.load(path, weights_only=True)
    o = b3["nodes"].pop()
    b3["nodes"] += [{"name": "z", "op": "call_method", "target": "__reduce_ex__",
                     "args": {"__tuple__": [{"__node__": first}, 2]}, "kwargs": {"__dict__": []}}, o]
    _check_refused(_write(tmp_path, b3, "b4.pt"), marker, "not an allowed tensor method")


def test_archive_module_and_keyword_injection_are_refused(tmp_path):
    path, blob = _archive(tmp_path)
    marker = tmp_path / "pwned"
    b = torch.load(path, weights_only=True)
    b["modules"][0]["type"] = "Module"
    _check_refused(_write(tmp_path, b), marker, "not allowed")
    b = torch.load(path, weights_only=True)
    call = next(n for n in b["nodes"] if n["op"] == "call_module")
    call["kwargs"] = {"__dict__": [[f"a=__import__('os').system('touch {marker}'),b", 1]]}
    _check_refused(_write(tmp_path, b, "k.pt"), marker, "keyword argument named")
    b = torch.load(path, weights_only=True)
    call = next(n for n in b["nodes"] if n["op"] == "call_module")
    call["target"] = "__class__"
    _check_refused(_write(tmp_path, b, "m.pt"), marker, "not a module of the archive")


def test_archive_that_is_a_pickle_bomb_is_refused(tmp_path):
    from prunekit.structured import load_shrunk

    marker = tmp_path / "pwned"
    p = tmp_path / "bomb.pt"
    malicious_pickle(p, marker)
    with pytest.raises(PrunekitError, match="never loads") as e:
        load_shrunk(p)
    assert str(p) in str(e.value) and "weights_only=False" not in str(e.value)
    p.write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(PrunekitError):
        load_shrunk(p)
    assert not marker.exists()


def test_valid_archive_still_loads(tmp_path):
    from prunekit.structured import load_shrunk

    path, _ = _archive(tmp_path)
    gm = load_shrunk(path)
    assert gm(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_failure_after_training_is_recorded_as_failed(tmp_path, monkeypatch):
    from prunekit.experiments import measure

    def broken(masks):
        raise RuntimeError("layer rows exploded")

    monkeypatch.setattr(measure, "layer_rows", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        run(BASE, tmp_path, log=lambda m: None)
    rid = C.run_id(C.resolve(BASE))
    with Store(tmp_path / "results.sqlite") as s:
        row = [r for r in s.runs(status=None) if r["run_id"] == rid][0]
    assert row["status"] == "failed" and "layer rows exploded" in row["error"]
    assert "exploded" in (tmp_path / rid / "error.txt").read_text()


def test_on_corrupt_policy_values(monkeypatch):
    from prunekit.checkpoint import on_corrupt_policy

    monkeypatch.delenv("PRUNEKIT_ON_CORRUPT", raising=False)
    assert on_corrupt_policy() == "restart"
    monkeypatch.setenv("PRUNEKIT_ON_CORRUPT", "Error")
    assert on_corrupt_policy() == "error"
    monkeypatch.setenv("PRUNEKIT_ON_CORRUPT", "ignore")
    with pytest.raises(PrunekitError, match="PRUNEKIT_ON_CORRUPT='ignore'.*'restart'.*'error'"):
        on_corrupt_policy()


def test_rank_store_reads_skips_writes_and_refuses_the_rest(tmp_path):
    from prunekit.experiments.runner import RankStore

    with Store(tmp_path / "results.sqlite") as s:
        s.begin_run("r1", "x", C.resolve(BASE), {}, {})
        rank = RankStore(s)
        assert rank.status("r1") == "running" and rank.record("r1") is None
        rank.fail_run("r1", "boom")  # rank 0's job: nothing happens here
        assert s.status("r1") == "running"
        rank.import_run({"tables": {}})  # a write too: skipped
        with pytest.raises(AttributeError, match="has no 'transaction'.*reads.*skips"):
            rank.transaction()


def test_every_test_named_in_docs_reliability_exists():
    """docs/reliability.md is the table of cases and the tests that prove them: each named test must exist."""
    import re

    root = SRC.parent
    text = (root / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))
    assert len(named) > 40
    for path, name in named:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name}"
