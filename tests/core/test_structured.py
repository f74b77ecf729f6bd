"""Channel groups, physical shrinking and shrunk-model archives (prunekit.structured)."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.models import get_model
from nets import randomize_batchnorm
from prunekit.structured import (channel_groups, channel_masks_from_masks, channel_masks_to_masks, export_onnx,
                                 load_shrunk, make_exact, save_shrunk, shrink, shrink_report)

shrink_module = sys.modules["prunekit.structured.shrink"]  # the package attribute `shrink` is the function

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "lenet_300_100": (1, 28, 28),
    "lenet5_caffe": (1, 28, 28),
    "vgg11_bn": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet18": (3, 16, 16),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = get_model(name, num_classes=10, input_shape=MODELS[name])
    randomize_norms(model)
    return model.eval()


@torch.no_grad()
def randomize_norms(model):
    """Non-trivial BN statistics and affine parameters, so a forgotten BN slice or shift shows up."""
    randomize_batchnorm(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.uniform_(-0.2, 0.2)


def example(name, batch=2, seed=1):
    return torch.randn(batch, *MODELS[name], generator=torch.Generator().manual_seed(seed))


def random_keep(groups, fraction=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        if g.prunable:
            keep = torch.zeros(g.size, dtype=torch.bool)
            keep[torch.randperm(g.size, generator=gen)[: max(1, round(fraction * g.size))]] = True
            out[g.name] = keep
    return out


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def masked_via_masks(model, groups, keep):
    """The masked model built through the public Masks object: weights zeroed, then made exact."""
    import copy

    masked = copy.deepcopy(model)
    weight_masks = channel_masks_to_masks(masked, groups, keep)
    pk.Masks.from_state_dict(masked, weight_masks)  # applies them
    make_exact(masked, groups, keep)
    return masked


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ shrinking
@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_equals_masked_and_reloads_bit_identically(name, tmp_path):
    model = build(name)
    x = example(name)
    groups = channel_groups(model, x)
    keep = random_keep(groups)
    assert keep and all(0 < int(k.sum()) < k.numel() or k.numel() == 1 for k in keep.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    small = shrink(model, keep, x, groups=groups)
    # (a) same function as the masked model, in eval mode
    with torch.no_grad():
        ref, got = masked_via_masks(model, groups, keep)(x), small(x)
    assert got.shape == ref.shape
    assert rel(got, ref) <= 1e-5
    # the input model is untouched and the result is smaller
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert n_params(small) < n_params(model)
    assert type(small) is type(model)
    # (c) archive: a fresh object, not the model's class, bit-identical outputs
    path = tmp_path / "small.pt"
    save_shrunk(path, small)
    again = load_shrunk(path)
    assert isinstance(again, torch.fx.GraphModule) and not isinstance(again, type(model))
    assert n_params(again) == n_params(small)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert again.input_shape == MODELS[name]
    assert not again.training


def kept(keep, name):
    return int(keep[name].sum())


def test_lenet5_parameter_count_by_hand():
    model = build("lenet5_caffe")
    x = example("lenet5_caffe")
    groups = channel_groups(model, x)
    assert [(g.name, g.prunable) for g in groups] == [("conv1", True), ("conv2", True), ("fc1", True), ("fc2", False)]
    assert dict(groups[1].consumers) == {"fc1": 16}  # 50 channels of 4x4 after the flatten
    keep = random_keep(groups, 0.5, seed=3)
    k1, k2, k3 = kept(keep, "conv1"), kept(keep, "conv2"), kept(keep, "fc1")
    small = shrink(model, keep, x)
    expected = (k1 * 25 + k1) + (k2 * k1 * 25 + k2) + (k3 * k2 * 16 + k3) + (10 * k3 + 10)
    assert n_params(small) == expected
    assert (small.conv2.in_channels, small.conv2.out_channels, small.fc1.in_features) == (k1, k2, 16 * k2)


def test_lenet_300_100_parameter_count_by_hand():
    model = build("lenet_300_100")
    x = example("lenet_300_100")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.3, seed=4)
    k1, k2 = kept(keep, "fc1"), kept(keep, "fc2")
    small = shrink(model, keep, x)
    assert n_params(small) == (784 * k1 + k1) + (k1 * k2 + k2) + (k2 * 10 + 10)


def test_vgg11_parameter_count_by_hand():
    model = build("vgg11_bn")
    x = example("vgg11_bn")
    groups = channel_groups(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [g.name for g in groups] == convs + ["fc"]
    keep = random_keep(groups, 0.5, seed=5)
    small = shrink(model, keep, x)
    expected, prev = 0, 3
    for c in convs:
        k = kept(keep, c)
        expected += prev * k * 9 + k + 2 * k  # conv weight + bias, BN gamma + beta
        prev = k
    expected += prev * 10 + 10
    assert n_params(small) == expected
    bn = dict(small.named_modules())["features.1"]
    assert bn.num_features == bn.running_mean.numel() == bn.running_var.numel() == kept(keep, "features.0")


def test_resnet20_residual_groups_and_parameter_count():
    model = build("resnet20")
    x = example("resnet20")
    groups = channel_groups(model, x)
    by = {g.name: g for g in groups}
    # (d) each stage's residual channels form one group with several producers
    stage1 = by["add:conv"]
    assert stage1.producers == ["conv", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert stage1.norms == ["bn", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    assert ("layer2.0.shortcut.0", 1) in stage1.consumers and stage1.prunable
    stage2 = by["add:layer2.0.conv2"]
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"}
    assert "layer2.0.shortcut.1" in stage2.norms
    assert by["fc"].prunable is False and "output" in by["fc"].reason
    every = [p for g in groups for p in g.producers]
    assert sorted(every) == sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    keep = random_keep(groups, 0.5, seed=6)
    small = shrink(model, keep, x, groups=groups)
    s = [kept(keep, "add:conv"), kept(keep, "add:layer2.0.conv2"), kept(keep, "add:layer3.0.conv2")]
    expected = 3 * 9 * s[0] + 2 * s[0]
    prev = s[0]
    for stage in range(3):
        for b in range(3):
            m = kept(keep, f"layer{stage + 1}.{b}.conv1")
            expected += prev * 9 * m + 2 * m + m * 9 * s[stage] + 2 * s[stage]
            if stage > 0 and b == 0:
                expected += prev * s[stage] + 2 * s[stage]  # 1x1 projection shortcut + BN
            prev = s[stage]
    expected += s[2] * 10 + 10
    assert n_params(small) == expected


def test_producer_zeroing_plus_make_exact_matches_shrunk():
    """Independent of the consumer-side masks: zero only the producers' rows (filter pruning), make exact."""
    model = build("vgg11_bn")
    x = example("vgg11_bn")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.5, seed=7)
    small = shrink(model, keep, x, groups=groups)
    import copy

    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for g in groups:
            if g.name in keep:
                for p in g.producers:
                    mods[p].weight[~keep[g.name]] = 0
        plain = masked(x)
        make_exact(masked, groups, keep)
        exact = masked(x)
        ref = small(x)
    assert rel(exact, ref) <= 1e-5
    assert rel(plain, ref) > 1e-3  # the constant BN shift that make_exact removes


def test_all_channels_kept_gives_an_equal_model():
    model = build("resnet20")
    x = example("resnet20")
    groups = channel_groups(model, x)
    keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
    small = shrink(model, keep, x, groups=groups)
    assert n_params(small) == n_params(model) and small is not model
    with torch.no_grad():
        assert torch.equal(small(x), model(x))
    rep = shrink_report(model, small, x)
    assert rep["params_ratio"] == 1.0 and rep["macs_ratio"] == 1.0


def test_shrink_report_counts_params_and_macs():
    model = build("lenet5_caffe")
    x = example("lenet5_caffe")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.5, seed=8)
    small = shrink(model, keep, x, groups=groups)
    rep = shrink_report(model, small, x, latency_runs=2)
    k1, k2, k3 = kept(keep, "conv1"), kept(keep, "conv2"), kept(keep, "fc1")
    assert rep["macs_dense"] == 20 * 25 * 576 + 50 * 20 * 25 * 64 + 800 * 500 + 500 * 10
    assert rep["macs_shrunk"] == k1 * 25 * 576 + k2 * k1 * 25 * 64 + 16 * k2 * k3 + k3 * 10
    assert rep["params_shrunk"] == n_params(small) and rep["params_dense"] == n_params(model)
    assert rep["params_ratio"] == pytest.approx(n_params(small) / n_params(model))
    assert rep["latency_dense_s"] > 0 and rep["latency_shrunk_s"] > 0


# ------------------------------------------------------------------------------------------------ errors
def test_masks_that_do_not_fit_are_rejected():
    model = build("lenet5_caffe")
    x = example("lenet5_caffe")
    groups = channel_groups(model, x)
    with pytest.raises(PrunekitError, match="not prunable"):
        shrink(model, {"fc2": torch.arange(10) < 5}, x, groups=groups)
    with pytest.raises(PrunekitError, match="unknown group 'conv3'"):
        shrink(model, {"conv3": torch.ones(20, dtype=torch.bool)}, x, groups=groups)
    with pytest.raises(PrunekitError, match="has 19 entries"):
        shrink(model, {"conv1": torch.ones(19, dtype=torch.bool)}, x, groups=groups)
    with pytest.raises(PrunekitError, match="every channel"):
        shrink(model, {"conv1": torch.zeros(20, dtype=torch.bool)}, x, groups=groups)
    with pytest.raises(PrunekitError, match="example_input"):
        shrink(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {})


def test_check_catches_a_wrong_shrink(monkeypatch):
    model = build("vgg11_bn")
    x = example("vgg11_bn")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.5, seed=9)
    # a consumer missing from a group: the shrunk model cannot even run
    bad = [dataclasses.replace(g, consumers=[]) if g.name == "features.0" else g for g in groups]
    with pytest.raises(PrunekitError, match="fails on the example input"):
        shrink(model, keep, x, groups=bad)
    # BN entries sliced in the wrong order: runs, but computes something else
    real = shrink_module._shrink_norm
    monkeypatch.setattr(shrink_module, "_shrink_norm", lambda mod, idx: real(mod, idx.flip(0)))
    with pytest.raises(PrunekitError, match="differs from the masked one"):
        shrink(model, keep, x, groups=groups)
    assert shrink(model, keep, x, groups=groups, check=False) is not None


# ------------------------------------------------------------------------------------------------ custom graphs
class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class Mixer(nn.Module):
    """conv1 -> bn1 -> relu -> MIX -> conv2 -> bn2 -> relu -> conv3 -> relu -> pool -> flatten -> fc."""

    def __init__(self, mix: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mix = mix
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x):
        x = self.mix(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("mix, op", [(Roll(), "torch.roll"), (Transpose(), "Tensor.transpose")])
def test_unsupported_channel_op_blocks_only_its_group(mix, op):
    torch.manual_seed(0)
    model = Mixer(mix).eval()
    x = torch.randn(2, 3, 8, 8)
    by = {g.name: g for g in channel_groups(model, x)}
    assert by["conv1"].prunable is False and op in by["conv1"].reason
    assert by["conv2"].prunable and by["conv3"].prunable
    assert by["conv3"].consumers == [("fc", 4)]
    keep = random_keep(by.values(), 0.5, seed=1)
    assert set(keep) == {"conv2", "conv3"}
    small = shrink(model, keep, x)
    assert small.conv2.out_channels == kept(keep, "conv2") and small.fc.in_features == 4 * kept(keep, "conv3")


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_submodule_needs_exclude_and_is_then_opaque():
    torch.manual_seed(0)
    model = Mixer(Gate()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PrunekitError, match="exclude"):
        channel_groups(model, x)
    by = {g.name: g for g in channel_groups(model, x, exclude=["mix"])}
    assert not by["conv1"].prunable and "module 'mix' (Gate)" in by["conv1"].reason
    assert by["conv2"].prunable
    small = shrink(model, random_keep(by.values(), 0.5), x, exclude=["mix"])
    assert small.conv2.out_channels == 4


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        x = self.up(F.max_pool2d(x, 2))
        return self.head(F.relu(x)).mean((2, 3))


def test_depthwise_and_transposed_convs(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 8, 8)
    by = {g.name: g for g in channel_groups(model, x)}
    assert by["stem"].producers == ["stem", "dw"] and by["stem"].norms == ["bn0", "bn1"]
    assert by["stem"].consumers == [("pw", 1)]
    assert by["pw"].consumers == [("up", 1)] and by["up"].consumers == [("head", 1)]
    keep = random_keep(by.values(), 0.5, seed=2)
    small = shrink(model, keep, x)
    k = kept(keep, "stem")
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (k, k, k)
    assert small.up.in_channels == kept(keep, "pw") and small.up.out_channels == kept(keep, "up")
    save_shrunk(tmp_path / "dw.pt", small)
    with torch.no_grad():
        assert torch.equal(load_shrunk(tmp_path / "dw.pt")(x), small(x))


class OptionA(nn.Module):
    """A residual block whose shortcut pads channels with zeros (He et al.'s option A)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.inner(F.relu(self.conv(x)))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.fc(F.relu(out + short).mean((2, 3)))


def test_option_a_shortcut_is_not_prunable():
    model = OptionA().eval()
    by = {g.name: g for g in channel_groups(model, torch.randn(2, 3, 8, 8))}
    assert not by["stem"].prunable and "option-A" in by["stem"].reason
    assert not by["inner"].prunable and "option-A" in by["inner"].reason
    assert by["conv"].prunable


def test_channel_masks_from_weight_masks():
    model = build("resnet20")
    x = example("resnet20")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.5, seed=10)
    weight_masks = channel_masks_to_masks(model, groups, keep)
    got = channel_masks_from_masks(model, groups, weight_masks)
    assert set(got) == {g.name for g in groups if g.prunable}
    assert all(torch.equal(got[k], keep[k]) for k in keep)
    # residual-tied: a channel dropped by one producer only stays
    tied = next(g for g in groups if g.name == "add:conv")
    only_one = {"layer1.0.conv2.weight": torch.ones_like(model.layer1[0].conv2.weight, dtype=torch.bool)}
    only_one["layer1.0.conv2.weight"][0] = False
    assert bool(channel_masks_from_masks(model, [tied], only_one, side="producers")["add:conv"].all())
    # consumer side (PFP style): every reader of channel 3 drops it
    pfp = {f"{c}.weight": torch.ones_like(dict(model.named_modules())[c].weight, dtype=torch.bool)
           for c, _ in tied.consumers}
    for m in pfp.values():
        m[:, 3] = False
    got = channel_masks_from_masks(model, [tied], pfp, side="consumers")["add:conv"]
    assert got.tolist() == [i != 3 for i in range(16)]


def test_shrink_accepts_a_masks_object_from_filter_pruning():
    """Per-weight masks that zero whole filters (a Masks object) shrink to the same function as masked+exact."""
    model = build("vgg11_bn")
    x = example("vgg11_bn")
    groups = channel_groups(model, x)
    keep = random_keep(groups, 0.5, seed=11)
    producer_rows = {}
    for g in groups:
        if g.name in keep:
            w = dict(model.named_modules())[g.name].weight
            m = torch.ones_like(w, dtype=torch.bool)
            m[~keep[g.name]] = False
            producer_rows[f"{g.name}.weight"] = m
    masks = pk.Masks(model, masks=producer_rows)  # zeroes the filters in place
    small = shrink(model, masks, x, groups=groups)
    assert [small.features[i].out_channels for i in (0, 4)] == [kept(keep, "features.0"), kept(keep, "features.4")]
    make_exact(model, groups, keep)
    with torch.no_grad():
        assert rel(small(x), model(x)) <= 1e-5


# ------------------------------------------------------------------------------------------------ archive
@pytest.mark.slow
def test_archive_loads_without_model_code(tmp_path):
    """A fresh interpreter reloads the file without importing prunekit.models, with weights_only loading."""
    model = build("resnet20")
    x = example("resnet20")
    small = shrink(model, random_keep(channel_groups(model, x), 0.5), x)
    save_shrunk(tmp_path / "m.pt", small)
    with torch.no_grad():
        torch.save(small(x), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from prunekit.structured.archive import load_shrunk\n"
        f"m = load_shrunk({str(tmp_path / 'm.pt')!r})\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "with torch.no_grad(): assert torch.equal(m(x), y)\n"
        "assert not any(k.startswith('prunekit.models') for k in sys.modules), 'model code imported'\n"
        "print('ok', type(m).__name__)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok ShrunkModel" in res.stdout


def test_archive_rejects_foreign_files_and_is_atomic(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(PrunekitError, match="not a shrunk-model archive"):
        load_shrunk(tmp_path / "other.pt")
    model = build("lenet_300_100")
    save_shrunk(tmp_path / "a.pt", model)
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "other.pt"]  # no temporary files left behind
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    blob["modules"][0]["type"] = "MyEvilModule"
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(PrunekitError, match="not allowed"):
        load_shrunk(tmp_path / "evil.pt")


def test_archive_refuses_custom_leaf_modules(tmp_path):
    model = Mixer(Gate()).eval()
    from prunekit.structured import trace

    with pytest.raises(PrunekitError, match="Gate"):
        save_shrunk(tmp_path / "g.pt", trace(model, exclude=["mix"]))


def test_export_onnx(tmp_path):
    pytest.importorskip("onnx")
    model = build("lenet5_caffe")
    x = example("lenet5_caffe")
    small = shrink(model, random_keep(channel_groups(model, x)), x)
    path = export_onnx(small, tmp_path / "m.onnx", x)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def test_export_onnx_without_onnx_names_the_fix(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(PrunekitError, match="pip install onnx"):
        export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", torch.zeros(1, 2))
