"""ImageNet: the torchvision-style ResNet-50, the ImageFolder dataset decoded from disk, and the seed-003 configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.data import load_dataset, loaders, scoring_data
from prunekit.errors import DatasetMissingError, PrunekitError
from prunekit.models import get_model, model_info

ROOT = Path(__file__).resolve().parents[2]
WNIDS = ["n01440764", "n01443537", "n01484850"]  # created in shuffled order below; labels follow sorted order


# ---------------------------------------------------------------------------------------------------------------
# model


def test_resnet50_size_names_and_forward():
    torch.manual_seed(0)
    model = get_model("resnet50", num_classes=1000)
    assert model_info("resnet-50").default_input_shape == (3, 224, 224)
    assert model.input_shape == (3, 224, 224)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    names = dict(model.named_parameters())
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.bias", "layer4.2.bn3.weight", "fc.weight", "fc.bias"):
        assert key in names
    assert "layer1.1.downsample.0.weight" not in names
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53
    assert all(torch.all(m.weight == 1) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    w = model.layer3[0].conv2.weight  # Kaiming normal, fan-out: std = sqrt(2 / (out * k * k))
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 0.05 * (2 / (256 * 9)) ** 0.5
    small = get_model("resnet50", num_classes=5, input_shape=(3, 64, 64)).eval()
    with torch.no_grad():
        out = small(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# dataset


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """<root>/imagenet/{train,val}/<wnid>/*.JPEG: 3 classes x 6 train and 2 val JPEGs of random sizes."""
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write and decode JPEGs")
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for c in (2, 0, 1):
            folder = root / "imagenet" / split / WNIDS[c]
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
                pixels = np.full((h, w, 3), 60 * c + 30, np.uint8) + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{WNIDS[c]}_{k}.JPEG", quality=90)
    (root / "imagenet" / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    return root


def _load(tree, **kw):
    opts = dict(val_size=3, image_size=32, resize_size=40, workers=0)
    opts.update(kw)
    return load_dataset("imagenet", root=tree, **opts)


def test_labels_classes_and_splits(tree):
    s = _load(tree)
    assert (s.name, s.num_classes, s.input_shape, s.augment) == ("imagenet", 3, (3, 32, 32), True)
    assert s.train.classes == WNIDS
    assert (len(s.train), len(s.val), len(s.test)) == (15, 3, 6)
    assert torch.bincount(s.val.y).tolist() == [1, 1, 1]  # stratified
    assert torch.bincount(s.test.y).tolist() == [2, 2, 2]
    for data in (s.train, s.val, s.test):
        for path, label in zip(data.paths, data.y.tolist()):
            assert Path(path).parent.name == WNIDS[label] and path.endswith(".JPEG")
    assert not set(s.train.paths) & set(s.val.paths)
    assert _load(tree).val.paths == s.val.paths  # split_seed fixes the hold-out
    assert len(_load(tree, subset=6).train) == 6


def test_batches_shapes_determinism_and_eval(tree):
    s = _load(tree)
    train, val, test = loaders(s, 4, eval_batch_size=5, seed=3)
    batches = list(train)
    assert len(batches) == len(train) == 4
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 3 and train.epoch == 1
    again, _, _ = loaders(s, 4, eval_batch_size=5, seed=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))  # (seed, 0)
    epoch1 = list(train)
    assert not torch.equal(epoch1[0][0], batches[0][0])  # a new order and new crops
    train.set_epoch(0)
    assert torch.equal(next(iter(train))[0], batches[0][0])
    other, _, _ = loaders(s, 4, seed=4)
    assert not torch.equal(next(iter(other))[0], batches[0][0])
    ev1, ev2 = list(test), list(test)
    assert [b[0].shape[0] for b in ev1] == [5, 1]
    assert torch.equal(torch.cat([b[1] for b in ev1]), s.test.y)  # in file order
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev1, ev2))  # no randomness in evaluation
    with_workers = list(loaders(_load(tree, workers=2), 4, seed=3)[0])  # same batches whatever the worker count
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, with_workers))


def test_scoring_set_replays_the_same_images(tree):
    s = _load(tree)
    data = scoring_data(s, {"per_class": 2}, batch_size=3, seed=0, transform="train")
    first, second = list(data), list(data)
    assert sum(b[0].shape[0] for b in first) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))


def test_missing_folder_and_bad_options(tmp_path, tree):
    with pytest.raises(DatasetMissingError, match=r"imagenet/train/<wnid>/\*\.JPEG"):
        load_dataset("imagenet", root=tmp_path)
    with pytest.raises(PrunekitError, match="takes no option 'n_train'"):
        load_dataset("imagenet", root=tree, n_train=3)
    with pytest.raises(PrunekitError, match="val_size"):
        _load(tree, val_size=18)


def test_run_end_to_end(tree, tmp_path, monkeypatch):
    from prunekit.data import imagenet
    from prunekit.experiments import run

    monkeypatch.setitem(imagenet.DEFAULTS, "image_size", 32)  # configs cannot pass dataset options
    monkeypatch.setitem(imagenet.DEFAULTS, "resize_size", 36)
    monkeypatch.setitem(imagenet.DEFAULTS, "workers", 0)
    cfg = {"name": "tiny_imagenet", "model": "resnet20", "data": {"name": "imagenet", "val_size": 3},
           "train": {"epochs": 2, "batch_size": 5, "eval_batch_size": 8, "lr": 0.01, "device": "cpu",
                     "progress": False},
           "prune": {"method": "woodfisherblock", "sparsity": 0.5, "warmup": 1, "fisher_samples": 6,
                     "block_size": None, "samples": {"per_class": 2}}}
    rec = run(cfg, tmp_path / "runs", data_dir=tree, log=lambda m: None)
    assert rec.epochs == 2 and rec.dataset == "imagenet" and rec.final_test_acc is not None
    assert abs(rec.achieved_sparsity - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name", ["resnet50_imagenet_dense.yaml", "resnet50_imagenet_gradual.yaml"])
def test_seed003_imagenet_configs_resolve(name, monkeypatch):
    from prunekit.experiments.config import expand, load, resolve
    from prunekit.schedules import Gradual

    monkeypatch.chdir(ROOT)  # pretrained paths are relative to the repository
    runs = expand(load(ROOT / "configs" / "seed003" / name))
    assert runs
    for cfg in runs:
        r = resolve(cfg)
        assert r["model"]["name"] == "resnet50" and r["data"]["name"] == "imagenet"
        if r["prune"]["method"] != "none":
            p = r["prune"]
            assert p["method"] == "woodfisherblock" and r["train"]["epochs"] == 100
            assert p["method_options"]["block_size"] == (1000 if p["sparsity"] == 0.98 else 2000)
            assert not p["options"]["exclude_first"] and not p["options"]["exclude_output"]
            g = Gradual(p["sparsity"], **p["gradual"])
            if p["sparsity"] == 0.9:
                steps = [round(g.sparsity_at(e), 3) for e in (1, 6, 11, 16, 21, 26, 31, 36)]
                assert steps == [0.05, 0.337, 0.551, 0.702, 0.802, 0.861, 0.89, 0.899]
