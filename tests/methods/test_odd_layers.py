"""Every registered one-shot code on one small model with the layers real networks have and toy ones lack: a
depthwise Conv2d, a grouped Conv2d, a Conv1d, a residual add, GELU, LayerNorm and BatchNorm (issue 14).

Each code either prunes to its size contract (unstructured: exactly round((1 - s)·n) kept, or per layer for a code
that fixes the layer scope; structured: within ``size_tol`` of the target, whole channels) or refuses with a
PrunekitError whose reason its definition requires (REFUSES, with the reason per code). New codes are picked up
from the registry automatically; IMP codes (needs_data == "training") only run as experiments and are skipped."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
import prunekit.criteria  # noqa: F401  (registers every code)
import prunekit.criteria.obs  # noqa: F401
import prunekit.criteria.second_order_baselines  # noqa: F401
from prunekit.select import keep_count

pytestmark = pytest.mark.usefixtures("one_thread")

#: Codes whose definition requires refusing this model: code -> (why, a regex the message must match).
REFUSES = {
    "px": ("PX's path decomposition gates each unit by 1[a > 0], which exists for ReLU only; the model uses GELU",
           r"px supports ReLU networks only: module 'act' is GELU .*use a ReLU model"),
}

#: Small scoring budgets, so every code runs in well under a second or two on 16 examples.
SMALL = {"fisher_samples": 16, "kfac_samples": 16, "hess_samples": 16, "diag_fisher_samples": 16, "sample_size": 16}
ROUNDS = {"synflow": 2, "px": 2}


class OddNet(nn.Module):
    """stem Conv2d → BN → act → depthwise Conv2d → BN → act → 1x1 Conv2d → BN, then a residual add of a grouped
    Conv2d (groups=2), a mean over H, Conv1d, transpose, LayerNorm over channels, act, mean, Linear.

    Channel groups (prunekit.structured): the stem/depthwise group is prunable; the residual group holds the
    grouped conv (not prunable: grouped, not depthwise), the Conv1d group ends in the LayerNorm after a transpose,
    the Linear feeds the output. The sizes make 50% reachable exactly by whole channels: 528 weights sit in
    groups that cannot shrink, each stem channel carries 27 + 9 + 8 = 44."""

    input_shape = (3, 6, 6)

    def __init__(self, act=nn.GELU, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 6)
        self.act = act()
        with torch.no_grad():  # BatchNorm away from the identity, so it matters
            for bn in (self.bn0, self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.act(self.bn0(self.stem(x)))
        h = self.act(self.bn1(self.dw(h)))
        h = self.bn2(self.pw(h))
        h = h + self.grouped(self.act(h))  # residual add
        h = self.c1(h.mean(2)).transpose(1, 2)  # [n, W, 8]
        return self.fc(self.act(self.ln(h)).mean(1))


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, *OddNet.input_shape, generator=g)
    Y = torch.randint(0, 6, (16,), generator=g)
    return [(X[:8], Y[:8]), (X[8:], Y[8:])]


def one_shot_codes() -> list[str]:
    return sorted(m.name for m in pk.methods() if m.needs_data != "training")


def options(code: str) -> dict:
    info = pk.get_method(code)
    opts = {k: v for k, v in SMALL.items() if k in info.option_names()}
    if code in ROUNDS:
        opts["rounds"] = ROUNDS[code]
    return opts


def test_the_odd_model_has_every_odd_layer():
    m = OddNet()
    kinds = {type(x) for x in m.modules()}
    assert {nn.Conv1d, nn.LayerNorm, nn.GELU, nn.BatchNorm2d} <= kinds
    assert m.dw.groups == m.dw.in_channels == m.dw.out_channels and 1 < m.grouped.groups < m.grouped.in_channels
    assert set(REFUSES) <= set(one_shot_codes())  # a renamed code must not leave a stale entry here


@pytest.mark.parametrize("code", one_shot_codes())
def test_every_code_prunes_the_odd_model_or_refuses_clearly(code):
    info = pk.get_method(code)
    m = OddNet()
    sparsity = 0.5
    if code in REFUSES:
        with pytest.raises(pk.PrunekitError, match=REFUSES[code][1]):
            pk.prune(m, code, sparsity=sparsity, data=data(), **options(code))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too-few-samples and non-prunable-group notes are expected here
        masks = pk.prune(m, code, sparsity=sparsity, data=data(), **options(code))
    sizes = {p.name: p.tensor.numel() for p in masks.params}
    total = sum(sizes.values())
    assert masks.total() == total and total == 528 + 16 * 44
    for p in masks.params:  # the masks are applied
        assert bool((p.tensor.detach()[~masks[p.name]] == 0).all()), p.name
        assert bool(torch.isfinite(p.tensor.detach()).all()), p.name
    if code == "none":
        assert masks.kept() == total
    elif info.structured:
        target = keep_count(total, sparsity)
        assert abs(masks.kept() - target) <= 0.005 * target
        rows = masks["stem.weight"].reshape(16, -1)  # the stem produces the prunable group: whole filters go
        assert bool((rows.all(1) | ~rows.any(1)).all()) and 0 < int(rows.all(1).sum()) < 16
    elif info.scope == "layer":
        for n, k in sizes.items():
            assert int(masks[n].sum()) == keep_count(k, sparsity), n
    else:
        assert masks.kept() == keep_count(total, sparsity)
    with torch.no_grad():
        assert bool(torch.isfinite(m.eval()(data()[0][0])).all())


def test_px_prunes_the_same_layers_with_relu():
    """PX's refusal is about GELU alone: with ReLU the depthwise, grouped, Conv1d, LayerNorm and residual layers
    go through it."""
    m = OddNet(act=nn.ReLU)
    masks = pk.prune(m, "px", sparsity=0.5, data=data(), rounds=2)
    assert masks.kept() == keep_count(masks.total(), 0.5)


class NoChannelGroup(nn.Module):
    """Every channel group is fixed: the stem is tied by the residual add to a grouped 1x1 conv, the Conv1d ends in
    a LayerNorm after a transpose, the Linear feeds the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1, groups=2)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.bn0(self.stem(x)))
        h = h + self.pw(torch.nn.functional.gelu(self.dw(h)))
        h = self.c1(h.mean(2)).transpose(1, 2)
        return self.fc(torch.nn.functional.gelu(self.ln(h)).mean(1))


@pytest.mark.parametrize("code", sorted(m.name for m in pk.methods() if m.structured))
def test_structured_codes_refuse_a_model_without_removable_channels_naming_why(code):
    m = NoChannelGroup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pk.PrunekitError) as e:
            pk.prune(m, code, sparsity=0.5, data=data(), **options(code))
    msg = str(e.value)
    assert "groups=2 (grouped, not depthwise)" in msg and "Tensor.transpose" in msg and "feeds the output" in msg
    assert "unstructured method" in msg
    assert all(bool(p.detach().ne(0).all()) for n, p in m.named_parameters() if n.endswith("weight"))  # untouched


# ---------------------------------------------------------------------------------------- Conv3d in sipp and pfp


@pytest.mark.parametrize("mode,groups", [("zeros", 1), ("zeros", 2), ("reflect", 2)])
def test_sipp_conv3d_patches_reproduce_the_convolution(mode, groups):
    """The Conv3d patches sipp and pfp read are the conv's own inputs: Σ_j w_ij·patch_j + b_i is its output."""
    from prunekit.criteria import sensitivity as sv
    from prunekit.params import prunable_params

    torch.manual_seed(1)
    conv = nn.Conv3d(4, 6, (2, 3, 2), stride=(1, 2, 1), dilation=(2, 1, 1), padding=(1, 1, 0), groups=groups,
                     padding_mode=mode).double()
    x = torch.randn(3, 4, 5, 6, 4, dtype=torch.float64)
    (p,) = prunable_params(nn.Sequential(conv))
    a = sv.patches(sv.layer_view(p), x)  # [n, in·∏k, P]
    og, jg = 6 // groups, conv.weight[0].numel()
    w = conv.weight.detach().reshape(6, -1)
    z = torch.cat([torch.einsum("ij,njp->nip", w[g * og:(g + 1) * og], a[:, g * jg:(g + 1) * jg])
                   for g in range(groups)], 1)
    want = conv(x)
    torch.testing.assert_close(z + conv.bias.detach()[None, :, None], want.reshape(3, 6, -1))


class Net2d(nn.Module):
    input_shape = (2, 5, 5)

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


class Net3d(nn.Module):
    """Net2d with (1, 3, 3) Conv3d kernels on a depth-1 input: the same function."""

    input_shape = (2, 1, 5, 5)

    def __init__(self, net2d: Net2d):
        super().__init__()
        self.a, self.b = nn.Conv3d(2, 6, (1, 3, 3), padding=(0, 1, 1)), nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1))
        with torch.no_grad():
            for c3, c2 in ((self.a, net2d.a), (self.b, net2d.b)):
                c3.weight.copy_(c2.weight.unsqueeze(2))
                c3.bias.copy_(c2.bias)
        self.fc = copy.deepcopy(net2d.fc)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3, 4)))


@pytest.mark.parametrize("code,opts", [("sipp", {}), ("sipp", {"variant": "rand"}), ("pfp", {})])
def test_conv3d_gets_the_masks_of_the_equivalent_conv2d(code, opts):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(24, 2, 5, 5, generator=g)
    Y = torch.randint(0, 3, (24,), generator=g)
    n2 = Net2d()
    n3 = Net3d(n2)
    with torch.no_grad():
        torch.testing.assert_close(n3(X.unsqueeze(2)), n2(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pfp may miss the size by a channel: the same miss on both sides
        m2 = pk.prune(n2, code, sparsity=0.6, data=[(X, Y)], sample_size=24, **opts)
        m3 = pk.prune(n3, code, sparsity=0.6, data=[(X.unsqueeze(2), Y)], sample_size=24, **opts)
    assert 0 < m3.kept() < m3.total()
    for name in ("a.weight", "b.weight", "fc.weight"):
        assert torch.equal(m3[name].reshape(m2[name].shape), m2[name]), name
