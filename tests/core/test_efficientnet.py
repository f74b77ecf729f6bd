"""EfficientNet-Lite0: architecture sizes, TensorFlow SAME pads, BatchNorm settings, loading weights in lukemelas'
naming (strict, head replacement), the sample photos fetched from a wheel built here; the slow tests load the real
ImageNet weights, compare logits with numbers computed by lukemelas' EfficientNet-PyTorch implementation and
classify the real sample photos."""
from __future__ import annotations

import hashlib
import io
import importlib
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.data import data_dir
from prunekit.errors import DatasetMissingError, PrunekitError
from prunekit.models import (EfficientNetLite0, get_model, input_stats, load_published, model_info,
                             published_names)
from prunekit.models.efficientnet import (BN_MOMENTUM, TF_BN_MOMENTUM, load_efficientnet_lite0_imagenet,
                                          lukemelas_to_prunekit, prepare_image, set_bn_momentum)

mfetch = importlib.import_module("prunekit.models.fetch")
fetch_mod = importlib.import_module("prunekit.data.fetch")

N_PARAMS = 4_652_008  # the sum over the real ImageNet state_dict (checked in test_real_weights_load_strictly)
# EfficientNet-Lite0 as the TF model garden's efficientnet_lite_builder defines it (block strings
# r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...): (expand ratio, kernel, stride, out channels, repeats)
LITE0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
         (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def expected_params(num_classes: int) -> int:
    """Parameters counted by hand from the architecture table: convs without bias, BatchNorm weight + bias."""
    n, cin = 3 * 32 * 9 + 2 * 32, 32
    for ratio, k, _, cout, repeats in LITE0:
        for _ in range(repeats):
            mid = cin * ratio
            n += (cin * mid + 2 * mid if ratio != 1 else 0) + mid * k * k + 2 * mid + mid * cout + 2 * cout
            cin = cout
    return n + cin * 1280 + 2 * 1280 + 1280 * num_classes + num_classes


def to_lukemelas(name: str) -> str:
    """prunekit's state_dict name -> lukemelas' (their EfficientNet: _conv_stem, _bn0, _blocks.N._expand_conv,
    _bn0, _depthwise_conv, _bn1, _project_conv, _bn2, _conv_head, _bn1, _fc), written out for the test."""
    parts = name.split(".")
    if parts[0] == "blocks":
        sub = {"expand": "_expand_conv", "expand_bn": "_bn0", "depthwise": "_depthwise_conv",
               "depthwise_bn": "_bn1", "project": "_project_conv", "project_bn": "_bn2"}[parts[2]]
        return f"_blocks.{parts[1]}.{sub}.{parts[3]}"
    top = {"stem": "_conv_stem", "stem_bn": "_bn0", "head": "_conv_head", "head_bn": "_bn1", "fc": "_fc"}[parts[0]]
    return f"{top}.{parts[1]}"


_RANDOM: dict = {}


def random_lukemelas_state() -> dict[str, torch.Tensor]:
    """A state_dict in lukemelas' naming with random values everywhere (running statistics too); a new dict of the
    same tensors on each call (tests replace entries, never change tensors)."""
    if not _RANDOM:
        gen = torch.Generator().manual_seed(1)
        for name, value in EfficientNetLite0().state_dict().items():
            if value.is_floating_point():
                value = torch.rand(value.shape, generator=gen) + 0.5
            else:
                value = torch.tensor(int(torch.randint(1, 1000, (1,), generator=gen)))
            _RANDOM[to_lukemelas(name)] = value
    return dict(_RANDOM)


_SMALL: dict = {}


def small() -> EfficientNetLite0:
    """One shared 64x64 model with 10 classes (tests that use it do not change it)."""
    if not _SMALL:
        torch.manual_seed(0)
        _SMALL["m"] = get_model("efficientnet_lite0", input_shape=(3, 64, 64))
    return _SMALL["m"]


# ---------------------------------------------------------------------------------------------------------------
# architecture


def test_parameter_count_matches_the_architecture_table():
    assert expected_params(1000) == N_PARAMS
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert sum(p.numel() for p in small().parameters()) == expected_params(10)
    assert len(model.blocks) == sum(r for *_, r in LITE0) == 16
    assert len(model.state_dict()) == 296  # as many entries as the published file
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 1 + 2 * 1 + 3 * 15 and all(m.bias is None for m in convs)
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 16 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [b.residual for b in model.blocks] == [False, False, True, False, True, False, True, True, False, True,
                                                  True, False, True, True, True, False]
    assert not any(isinstance(m, (nn.SiLU, nn.Sigmoid)) for m in model.modules())  # ReLU6, no SE
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 1 + 16


@pytest.mark.parametrize("size, spatial", [(64, [32, 32, 16, 8, 4, 4, 2, 2, 2]),
                                           (224, [112, 112, 56, 28, 14, 14, 7, 7, 7])])
def test_forward_shapes(size, spatial):
    model = small() if size == 64 else get_model("efficientnet_lite0", num_classes=7)
    seen = []
    hooks = [model.stem.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))]
    for i in (0, 1, 3, 5, 8, 14, 15):  # the first block of each stage and the last block
        hooks.append(model.blocks[i].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])))
    hooks.append(model.head.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])))
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    assert seen == spatial  # TF SAME: every stride-2 layer gives ceil(n / 2)


def test_same_pads_follow_tensorflow():
    def tf_pads(n, k, s):  # TensorFlow's SAME rule: output ceil(n / s), the odd pixel after
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    for size in (224, 65, 33):
        model = EfficientNetLite0(input_shape=(3, size, size))
        n, pads = size, [model.stem_pad]
        for b in model.blocks:
            pads.append(b.pad)
        strides = [(3, 2)] + [(b.depthwise.kernel_size[0], b.depthwise.stride[0]) for b in model.blocks]
        for (k, s), pad in zip(strides, pads):
            if s == 1:
                assert isinstance(pad, nn.Identity)
                continue
            before, after = tf_pads(n, k, s)
            got = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
            assert tuple(got) == (before, after, before, after), (size, k, n)
            n = math.ceil(n / s)
    model = EfficientNetLite0(padding="symmetric")
    assert all(isinstance(b.pad, nn.Identity) and b.depthwise.padding[0] == b.depthwise.kernel_size[0] // 2
               for b in model.blocks)
    with pytest.raises(PrunekitError, match="padding must be one of same, symmetric"):
        EfficientNetLite0(padding="valid")


def test_batchnorm_momentum_and_eps():
    bns = [m for m in small().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49 and BN_MOMENTUM == 0.1 and TF_BN_MOMENTUM == 0.01
    assert all(m.momentum == 0.1 and m.eps == 1e-3 for m in bns)
    tf = EfficientNetLite0(input_shape=(3, 32, 32), bn_momentum=TF_BN_MOMENTUM)
    assert {m.momentum for m in tf.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    assert set_bn_momentum(tf, 0.2) == 49
    assert {m.momentum for m in tf.modules() if isinstance(m, nn.BatchNorm2d)} == {0.2}
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(PrunekitError, match="bn_momentum must be a number"):
            EfficientNetLite0(bn_momentum=bad)
    with pytest.raises(PrunekitError, match="dropout"):
        EfficientNetLite0(dropout=1.0)
    with pytest.raises(PrunekitError, match="input_shape"):
        get_model("efficientnet_lite0", input_shape=(3, 64))


def test_structured_pruning_sees_every_group():
    from prunekit.structured import channel_groups

    groups = channel_groups(small(), torch.randn(2, 3, 64, 64))
    # stem, 16 depthwise-tied expanded spaces (block 0 has none: its depthwise is on the stem's channels), 7
    # residual-tied stage outputs, the head; only fc (feeding the output) is not prunable
    assert len(groups) == 1 + 15 + 7 + 1 + 1
    assert [g.name for g in groups if not g.prunable] == ["fc"]


# ---------------------------------------------------------------------------------------------------------------
# weights in lukemelas' naming


def test_key_mapping_is_a_bijection():
    names = list(EfficientNetLite0().state_dict())
    mapped = [lukemelas_to_prunekit(to_lukemelas(n)) for n in names]
    assert mapped == names
    source = random_lukemelas_state()
    assert len({lukemelas_to_prunekit(k) for k in source}) == len(source) == 296
    assert lukemelas_to_prunekit("_blocks.3._bn1.running_var") == "blocks.3.depthwise_bn.running_var"
    assert lukemelas_to_prunekit("_bn1.weight") == "head_bn.weight"
    assert lukemelas_to_prunekit("_blocks.0._bn1.weight") == "blocks.0.depthwise_bn.weight"
    for bad in ("_blocks.1._se_reduce.weight", "conv_stem.weight", "_fc", "features.0.weight"):
        with pytest.raises(PrunekitError, match="lukemelas' naming"):
            lukemelas_to_prunekit(bad)


def test_load_copies_every_tensor():
    source = random_lukemelas_state()
    torch.manual_seed(5)
    model = EfficientNetLite0(input_shape=(3, 32, 32))
    assert load_efficientnet_lite0_imagenet(model, source) == []
    state = model.state_dict()
    for name, value in state.items():
        assert torch.equal(value, source[to_lukemelas(name)]), name


def test_head_replacement_keeps_backbone_and_seeded_head():
    source = random_lukemelas_state()
    heads = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        model = get_model("efficientnet_lite0", num_classes=10, input_shape=(3, 32, 32))
        fresh = model.fc.weight.detach().clone()
        assert load_efficientnet_lite0_imagenet(model, source) == ["fc.weight", "fc.bias"]
        assert torch.equal(model.fc.weight, fresh) and not model.fc.bias.any()
        for name, value in model.state_dict().items():
            if not name.startswith("fc."):
                assert torch.equal(value, source[to_lukemelas(name)]), name
        heads.append(fresh)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    bound = 1 / math.sqrt(10)
    assert heads[0].abs().max() <= bound and heads[0].abs().max() > 0.9 * bound


def test_load_errors_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = EfficientNetLite0(input_shape=(3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = []
    extra = random_lukemelas_state()
    extra["_blocks.16._bn1.weight"] = torch.ones(3)
    cases.append((extra, "maps to 'blocks.16.depthwise_bn.weight', which the model does not have"))
    missing = random_lukemelas_state()
    del missing["_blocks.7._project_conv.weight"]
    cases.append((missing, "no tensor for 1 entries of the model \\(first: 'blocks.7.project.weight'\\)"))
    shape = random_lukemelas_state()
    shape["_conv_head.weight"] = torch.ones(1280, 320)
    cases.append((shape, "'_conv_head.weight' has shape \\(1280, 320\\) but the model's 'head.weight' has"))
    foreign = random_lukemelas_state()
    foreign["_blocks.2._se_expand.bias"] = torch.ones(3)
    cases.append((foreign, "not a key of an EfficientNet-Lite state_dict"))
    for sd, match in cases:
        with pytest.raises(PrunekitError, match=match):
            load_efficientnet_lite0_imagenet(model, sd)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(PrunekitError, match="need 3 input channels"):
        load_efficientnet_lite0_imagenet(EfficientNetLite0(input_shape=(1, 32, 32)), random_lukemelas_state())
    with pytest.raises(PrunekitError, match="not into a CifarResNet"):
        load_efficientnet_lite0_imagenet(get_model("resnet20"), random_lukemelas_state())


def test_registry_published_weights(tmp_path):
    assert published_names() == ["efficientnet_lite0"]
    info = model_info("EfficientNet-Lite0")
    assert (info.name, info.family, info.default_input_shape) == ("efficientnet_lite0", "efficientnet", (3, 224, 224))
    assert input_stats("efficientnet_lite0") == (info.input_mean, info.input_std)
    assert np.allclose(info.input_mean, [0.498] * 3, atol=5e-4) and np.allclose(info.input_std, [0.502] * 3, atol=5e-4)
    assert "prunekit models fetch efficientnet_lite0" in info.weights
    assert model_info("resnet20").input_mean is None and model_info("resnet20").weights == ""
    with pytest.raises(PrunekitError, match="'resnet20' has no published weights.*efficientnet_lite0"):
        input_stats("resnet20")
    with pytest.raises(PrunekitError, match="no published weights"):
        load_published("vgg16", get_model("vgg16"))
    with pytest.raises(DatasetMissingError, match="prunekit models fetch efficientnet_lite0"):
        load_published("efficientnet_lite0", small(), root=tmp_path)


def test_prepare_image_crops_resizes_and_normalizes():
    img = torch.zeros(3, 10, 20, dtype=torch.uint8)
    img[:, :, 5:15] = 255  # the central 10x10 square is white, the sides black
    x = prepare_image(img, size=7)
    assert x.shape == (3, 7, 7) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 127/255) / (128/255) = 1
    grey = prepare_image(torch.full((3, 30, 30), 127, dtype=torch.uint8), size=4)
    assert torch.allclose(grey, torch.zeros_like(grey), atol=1e-6)
    black = prepare_image(torch.zeros(3, 8, 8, dtype=torch.uint8), size=8)
    assert torch.allclose(black, torch.full_like(black, -127 / 128))
    with pytest.raises(PrunekitError, match="uint8 RGB image of shape \\(3, H, W\\)"):
        prepare_image(torch.zeros(3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# the sample photos, fetched from a wheel built here


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def fake_photos(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = {"chelsea.png": rng.integers(0, 256, (4, 6, 3), dtype=np.uint8),
              "coffee.png": rng.integers(0, 256, (5, 3, 3), dtype=np.uint8)}
    files = {k: _png(v) for k, v in pixels.items()}
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((2, 2, 3), 9, dtype=np.uint8)).save(buf, format="JPEG")
    files["rocket.jpg"] = buf.getvalue()
    wheel = tmp_path / "scikit_image-0.24.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"skimage/data/{name}", data)
        zf.writestr("skimage/data/camera.png", b"not taken")
    for k, v in files.items():
        monkeypatch.setitem(mfetch.SAMPLE_PHOTOS.files, k, hashlib.sha256(v).hexdigest())
    return wheel, files, pixels


def test_sample_photos_fetch_and_decode(tmp_path, fake_photos, capsys):
    from prunekit.cli import main

    wheel, files, pixels = fake_photos
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="prunekit models fetch sample_photos"):
        mfetch.sample_photo("chelsea", root)
    assert main(["models", "fetch", "sample-photos", "--data-dir", str(root), "--wheel", str(wheel)]) == 0
    folder = root / "sample_photos"
    assert f"sample-photos: {folder}" in capsys.readouterr().out
    assert mfetch.sample_photos_path(root) == folder == mfetch.fetch_model("sample_photos", root)  # present: no-op
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    for name, file in (("chelsea", "chelsea.png"), ("Coffee.png", "coffee.png")):
        img = mfetch.sample_photo(name, root)
        assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(pixels[file]).permute(2, 0, 1))
    assert mfetch.sample_photo("rocket", root).shape == (3, 2, 2)
    with pytest.raises(PrunekitError, match="unknown sample photo 'chelse'.*'chelsea'"):
        mfetch.sample_photo("chelse", root)
    assert "sample_photos" not in mfetch.ASSETS  # not a model: the zoo lists weights only
    (folder / "coffee.png").write_bytes(b"garbage")
    with pytest.raises(PrunekitError, match="cannot be decoded.*prunekit models fetch sample_photos --force"):
        mfetch.sample_photo("coffee", root)


def test_sample_photos_fetch_with_pip_for_a_fixed_platform(tmp_path, fake_photos, monkeypatch):
    wheel, _, _ = fake_photos
    calls = []

    def fake_run(cmd, cwd=None, **kw):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], wheel.name).write_bytes(wheel.read_bytes())
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    folder = mfetch.fetch_model("sample_photos", root=tmp_path / "data")
    cmd = calls[0]
    assert "download" in cmd and "install" not in cmd and "--no-deps" in cmd and "scikit-image==0.24.0" in cmd
    assert cmd[cmd.index("--platform") + 1] == "manylinux2014_x86_64" and cmd[cmd.index("--abi") + 1] == "cp311"
    assert sorted(p.name for p in folder.iterdir()) == ["chelsea.png", "coffee.png", "rocket.jpg"]


# ---------------------------------------------------------------------------------------------------------------
# the real weights and photos, when fetched into the data directory (PRUNEKIT_DATA or ~/.cache/prunekit/data)


def _real(rel: str, command: str) -> Path:
    path = data_dir() / rel
    if not path.exists():
        pytest.skip(f"{path} is not there: run `{command}` to fetch the real files for this test")
    return path


_REAL: dict = {}


def imagenet_model() -> EfficientNetLite0:
    _real("models/efficientnet_lite0", "prunekit models fetch efficientnet_lite0")
    if not _REAL:
        model = get_model("efficientnet_lite0", num_classes=1000)
        assert load_published("efficientnet_lite0", model) == []
        _REAL["m"] = model.eval()
    return _REAL["m"]


@pytest.mark.slow
def test_real_weights_load_strictly():
    model = imagenet_model()
    sd = mfetch.efficientnet_lite0_state_dict()
    assert len(sd) == 296
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == N_PARAMS
    state = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(state[lukemelas_to_prunekit(key)], value), key
    torch.manual_seed(0)
    ten = get_model("efficientnet_lite0", num_classes=10, input_shape=(3, 64, 64))
    assert load_published("efficientnet_lite0", ten) == ["fc.weight", "fc.bias"]
    assert torch.equal(ten.head.weight, model.head.weight)


def _probe(n: int) -> torch.Tensor:
    """A fixed smooth (1, 3, n, n) input with structure at the borders (where SAME and symmetric pads differ)."""
    i = torch.arange(n, dtype=torch.float64)
    c = torch.arange(3, dtype=torch.float64)
    x = torch.sin(0.11 * i.view(1, n, 1) * (c.view(3, 1, 1) + 1)) * torch.cos(0.07 * i.view(1, 1, n)) * 1.5
    return x.float().unsqueeze(0)


# logits of lukemelas' EfficientNet-PyTorch (efficientnet-lite-pytorch==0.1.0, EfficientNet.from_name(
# 'efficientnet-lite0', image_size=n) with the same state_dict, eval mode) on _probe(n): top-5 and classes 0/500/999
REFERENCE = {
    224: ([(593, 5.8602), (906, 5.1520), (902, 4.9849), (783, 4.6317), (731, 4.4134)], [-0.3801, -0.1024, 0.3601]),
    97: ([(593, 6.2594), (813, 6.1048), (916, 5.4489), (531, 5.2082), (811, 4.9678)], [-0.7496, 0.4104, -0.8091]),
}


@pytest.mark.slow
@pytest.mark.parametrize("n", sorted(REFERENCE))
def test_real_weights_match_reference_implementation(n):
    model = imagenet_model()
    if n != 224:
        other = get_model("efficientnet_lite0", num_classes=1000, input_shape=(3, n, n))
        other.load_state_dict(model.state_dict())
        model = other.eval()
    with torch.no_grad():
        out = model(_probe(n))[0]
    top, fixed = REFERENCE[n]
    assert out.topk(5).indices.tolist() == [k for k, _ in top]
    assert torch.allclose(out[[k for k, _ in top]], torch.tensor([v for _, v in top]), atol=2e-3)
    assert torch.allclose(out[[0, 500, 999]], torch.tensor(fixed), atol=2e-3)
    if n == 224:  # symmetric pads are another function of the same weights
        sym = EfficientNetLite0(padding="symmetric")
        sym.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (sym.eval()(_probe(n))[0] - out).abs().max() > 0.1


CATS = {281: "tabby", 282: "tiger cat", 283: "Persian", 284: "Siamese", 285: "Egyptian cat"}


def _top5(photo: str) -> list[tuple[int, float]]:
    _real("sample_photos", "prunekit models fetch sample_photos")
    x = prepare_image(mfetch.sample_photo(photo)).unsqueeze(0)
    with torch.no_grad():
        p = imagenet_model()(x).softmax(1)[0]
    v, i = p.topk(5)
    return list(zip(i.tolist(), v.tolist()))


@pytest.mark.slow
def test_real_photos_are_classified():
    cat = _top5("chelsea")  # measured: Egyptian cat 0.40, tiger cat 0.32, tabby 0.16, lynx 0.03
    assert cat[0][0] in CATS and sum(p for k, p in cat if k in CATS) > 0.8
    coffee = _top5("coffee")  # measured: espresso 0.94, cup 0.02
    assert coffee[0][0] == 967 and coffee[0][1] > 0.8
    rocket = _top5("rocket")  # measured: missile 0.23, drilling platform 0.14, projectile 0.13, space shuttle 0.03
    assert rocket[0][0] in (657, 744, 812) and {657, 744, 812} <= {k for k, _ in rocket}
