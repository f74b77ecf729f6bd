"""PFP (seed 002, methods/sensitivity.md §0–1, 3, 5–7, 10): channel sensitivities, shared-ε sizes, whole channels,
shrinking, residual groups, unbiased rand rescaling, errors, determinism."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
import prunekit.criteria.pfp as pfp
from prunekit.families.sensitivity.pfp_reader import Reader
from prunekit.errors import PrunekitError
from prunekit.masks import Masks
from prunekit.models import get_model
from nets import randomize_batchnorm
from prunekit.prune import PruneOptions
from prunekit.registry import ScoreContext, get_method
from prunekit.seeding import generator
from prunekit.structured import channel_groups

EPS = float(torch.finfo(torch.float32).eps)
SHAPES = {"lenet5_caffe": (1, 28, 28), "vgg11_bn": (3, 32, 32), "resnet20": (3, 32, 32)}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _data(shape, n, seed=1):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return [(x, torch.zeros(n, dtype=torch.long))]


def _build(name, seed=0):
    torch.manual_seed(seed)  # non-trivial BN, so a forgotten BN shift shows up in the shrink checks
    return randomize_batchnorm(get_model(name, num_classes=10, input_shape=SHAPES[name]).eval())


def _context(model, data, seed=0, min_keep=0, **opts):
    info = get_method("pfp")
    method = info.new()  # one method object: its score feeds its selection and update
    masks = Masks(model)
    return ScoreContext(model=model, params=masks.params, masks=masks.as_dict(), data=data, loss=None,
                        options=info.make_options(**opts), generator=generator(seed, "mask", "pfp", "1"),
                        prune_options=PruneOptions(min_keep_per_layer=min_keep))


def _kept(masks):
    return sum(int(m.sum()) for m in masks.values())


def _target(masks, s):
    return math.floor((1 - s) * sum(m.numel() for m in masks.values()) + 0.5)


# ------------------------------------------------------------------------------------ channel sensitivity (§3)


def _tiny_net():
    """conv1 -> ReLU -> conv2 (stride 2, padding) -> flatten -> linear: conv2 reads conv1's channels (post-ReLU);
    the linear layer reads conv2's channels, 3x3 features each, with negative entries (no ReLU)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double().eval()


def _naive_channel_sensitivity(w, inputs, channels, conv=None):
    """max over examples x, output neurons i, kernel entries k of channel c and positions p of
    W_i(c,k)·a_(c,k),p(x) / z^{sign W}_i,p(x) (0 where |z| ≤ eps); an input with a negative entry is the two points
    max(a, 0) and max(-a, 0). Plain Python loops."""
    best = [0.0] * channels
    out = w.shape[0]
    for example in inputs:
        points = [example] if bool((example >= 0).all()) else [example.clamp(min=0), (-example).clamp(min=0)]
        for a in points:
            if conv is None:  # linear: one position, feature j belongs to channel j // block
                block = a.numel() // channels
                patches = [a.reshape(-1).tolist()]
                owner = [j // block for j in range(a.numel())]
                W = w.tolist()
            else:
                k, stride, pad = conv
                C, H, Wd = a.shape
                P = torch.zeros(C, H + 2 * pad, Wd + 2 * pad, dtype=a.dtype)
                P[:, pad:pad + H, pad:pad + Wd] = a
                oh, ow = (H + 2 * pad - k) // stride + 1, (Wd + 2 * pad - k) // stride + 1
                patches = [[float(P[c, r * stride + u, q * stride + v]) for c in range(C) for u in range(k)
                            for v in range(k)] for r in range(oh) for q in range(ow)]
                owner = [c for c in range(C) for _ in range(k * k)]
                W = w.reshape(out, -1).tolist()
            for i in range(out):
                for patch in patches:
                    zp = sum(W[i][j] * patch[j] for j in range(len(patch)) if W[i][j] > 0)
                    zn = sum(W[i][j] * patch[j] for j in range(len(patch)) if W[i][j] < 0)
                    for j, x in enumerate(patch):
                        z = zp if W[i][j] > 0 else zn
                        if W[i][j] == 0 or abs(z) <= EPS:
                            continue
                        best[owner[j]] = max(best[owner[j]], W[i][j] * x / z)
    return torch.tensor(best, dtype=torch.float64)


def test_channel_sensitivity_equals_an_explicit_loop():
    net = _tiny_net()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = pfp.channel_sensitivities(net, x)
    assert set(got) == {"2.weight", "4.weight"}  # the first layer's (image) input channels are never pruned
    with torch.no_grad():
        a2 = net[1](net[0](x))
        a4 = net[3](net[2](a2))
    want2 = _naive_channel_sensitivity(net[2].weight.detach(), a2, 3, conv=(3, 2, 1))
    want4 = _naive_channel_sensitivity(net[4].weight.detach(), a4, 4)
    assert bool((a4 < 0).any())  # the flatten -> linear consumer sees negative inputs (two points per example)
    torch.testing.assert_close(got["2.weight"], want2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["4.weight"], want4, rtol=1e-9, atol=1e-12)
    assert bool((want2 > 0).all()) and bool((want4 <= 1).all())
    # the same values through the method's score: per-weight max sensitivities reduced over all but dim 1
    data = [(x, torch.zeros(3, dtype=torch.long))]
    scores = pk.score(net, "pfp", data, sample_size=3)
    torch.testing.assert_close(pfp.channel_sensitivity(scores["4.weight"], 4), want4, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ sizes (§5–6)


def _check_whole_channels(model, masks, groups):
    """Every input channel of a pruned layer is kept or dropped as a whole; a channel that every reader drops has
    its producer rows masked and its producer bias / BN entries zeroed."""
    mods = dict(model.named_modules())
    removed = {}
    for g in groups:
        if not g.prunable:
            continue
        dropped_by_all = torch.ones(g.size, dtype=torch.bool)
        for cname, block in g.consumers:
            m = masks[f"{cname}.weight"].reshape(masks[f"{cname}.weight"].shape[0], g.size, -1)
            rows, cols = m.any(2).any(1), m.any(2).any(0)
            assert torch.equal(m, (rows[:, None] & cols[None, :])[:, :, None].expand_as(m)), \
                f"{cname}: the mask is not kept rows x kept input channels"
            dropped_by_all &= ~cols
        for pname in g.producers:
            rows = masks[f"{pname}.weight"].reshape(g.size, -1)
            assert torch.equal(~rows.any(1), dropped_by_all), f"{pname}'s rows disagree with its readers"
            if mods[pname].bias is not None:
                assert bool((mods[pname].bias[dropped_by_all] == 0).all())
        for n in g.norms:
            assert bool((mods[n].weight[dropped_by_all] == 0).all()) and bool((mods[n].bias[dropped_by_all] == 0).all())
        removed[g.name] = int(dropped_by_all.sum())
    assert sum(removed.values()) > 0
    return removed


@pytest.mark.parametrize("variant", ["det", "rand", "top"])
def test_lenet5_sizes_within_tolerance(variant):
    model = _build("lenet5_caffe")
    ctx = _context(model, _data((1, 28, 28), 8), variant=variant, sample_size=8)
    info = get_method("pfp")
    method = info.new()  # one method object: its score feeds its selection and update
    scores = method.score(ctx)
    per_layer = []
    for s in (0.4, 0.7, 0.9):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = method.select(ctx, scores, s)
        target = _target(new, s)
        assert abs(_kept(new) / target - 1) <= 0.005, (s, _kept(new), target)
        st = method.state
        assert st["search"]["kept"] == _kept(new) and st["search"]["hit"]
        for name, m in new.items():  # nested in the current masks, and the first layer's input is whole
            assert not bool((m & ~ctx.masks[name]).any())
        assert set(st["kept_channels"]) == {"conv2.weight", "fc1.weight", "fc2.weight"}  # not conv1: image input
        per_layer.append([st["kept_channels"][n] for n in ("conv2.weight", "fc1.weight", "fc2.weight")])
    assert all(a >= b for a, b in zip(per_layer[0], per_layer[-1])) and per_layer[-1] < [20, 50, 500]


def test_vgg11_sizes_within_tolerance():
    model = _build("vgg11_bn")
    ctx = _context(model, _data((3, 32, 32), 2), sample_size=2)
    info = get_method("pfp")
    method = info.new()  # one method object: its score feeds its selection and update
    scores = method.score(ctx)
    for s in (0.5, 0.9):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = method.select(ctx, scores, s)
        assert abs(_kept(new) / _target(new, s) - 1) <= 0.005
    ch = method.state["kept_channels"]
    assert set(ch) == {f"features.{i}.weight" for i in (4, 8, 11, 15, 18, 22, 25)} | {"fc.weight"}
    # apply the last selection as pk.prune does (update hook, then masks): BN shifts of removed channels are gone
    method.update(ctx, ctx.masks, new)
    masks = Masks(model, masks=new)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    _check_whole_channels(model, masks, channel_groups(model, x))
    small = pk.shrink(model, masks, x)
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert sum(p.numel() for p in small.parameters()) < 0.2 * sum(p.numel() for p in model.parameters())


def test_pruned_lenet5_has_whole_channels_and_shrinks_to_the_same_function():
    model = _build("lenet5_caffe")
    data = _data((1, 28, 28), 8)
    masks = pk.prune(model, "pfp", 0.7, data, sample_size=8)
    assert abs(masks.kept() / _target(masks.as_dict(), 0.7) - 1) <= 0.005
    assert abs(pk.sparsity(model) - 0.7) <= 0.005 * 0.3 + 1e-9
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    groups = channel_groups(model, x[:2])
    _check_whole_channels(model, masks, groups)
    small = pk.shrink(model, masks)
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert small.conv1.out_channels == small.conv2.in_channels <= 20
    assert small.conv2.out_channels * 16 == small.fc1.in_features < 800
    assert small.fc1.out_features == small.fc2.in_features < 500


def test_resnet20_residual_groups_stay_consistent_and_shrink():
    model = _build("resnet20")
    data = _data((3, 32, 32), 2)
    masks = pk.prune(model, "pfp", 0.5, data, sample_size=2)
    assert abs(masks.kept() / _target(masks.as_dict(), 0.5) - 1) <= 0.005
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    groups = channel_groups(model, x)
    removed = _check_whole_channels(model, masks, groups)  # tied groups: all producers agree with all readers
    tied = [g for g in groups if g.name.startswith("add:")]
    assert len(tied) == 3 and all(len(g.producers) == 4 for g in tied)
    assert removed["add:layer3.0.conv2"] > 0  # a residual stage lost channels in all 4 producers and 3 readers
    small = pk.shrink(model, masks, x)
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


class _Concat(nn.Module):
    """conv1 and conv2 are concatenated along channels (not supported: their groups are not prunable); conv3's
    channels reach the linear layer through pooling and a flatten (prunable)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        d = torch.relu(self.conv3(torch.cat([a, b], 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(d, 1), 1))


def test_groups_that_are_not_prunable_are_left_whole():
    torch.manual_seed(0)
    model = _Concat().eval()
    data = _data((3, 8, 8), 4)
    s = 4 * (16 * 9 + 10) / 2024  # four of conv3's channels: 16·9 weights of conv3 and 10 of fc each
    masks = pk.prune(model, "pfp", s, data, sample_size=4)
    for name in ("conv1.weight", "conv2.weight"):
        assert bool(masks[name].all())
    assert bool(masks["conv3.weight"].reshape(8, -1).any(1).sum() == 4) and int(masks["fc.weight"].any(0).sum()) == 4
    assert masks.kept() == 2024 - 4 * 154
    small = pk.shrink(model, masks, data[0][0][:2])
    assert small.conv3.out_channels == small.fc.in_features == 4 and small.conv3.in_channels == 16


def test_top_keeps_large_probability_channels_unscaled():
    """top at u: m′ with E[unique](m′) = u; channels with p_c ≥ 1/m′ kept with scale 1; the rest sampled from p
    restricted to them, with scale count/(m′_R·p_c/P_R)."""
    s = torch.tensor([0.9, 0.8, 0.05, 0.04, 0.03, 0.03, 0.02, 0.02, 0.01, 0.01], dtype=torch.float64)
    p = torch.nn.Linear(10, 2)
    param = pk.params.PrunableParam("fc.weight", "fc", "weight", p)
    r = Reader(param, "g", 1, s, torch.ones(10, dtype=torch.bool), 1, 1, 1e-16, 3.0, 1)
    keep, scale, m_r = r.select(4, "top", seed=0)
    m = r.draws_for(r.p, 4)
    fixed = r.p >= 1.0 / m
    assert fixed.tolist()[:2] == [True, True] and not bool(fixed[2:].any())
    assert bool(keep[:2].all()) and bool((scale[:2] == 1).all()) and 3 <= int(keep.sum()) <= 10
    rest = ~fixed
    pr = r.p * rest / float(r.p[rest].sum())
    drawn = keep & rest
    assert bool(drawn.any())
    counts = scale[drawn] * m_r * pr[drawn]
    torch.testing.assert_close(counts, counts.round())  # scale = count/(m′_R·p_R) with integer counts ≥ 1
    assert bool((counts.round() >= 1).all()) and float(counts.round().sum()) <= m_r
    # det and rand at the same u
    assert r.select(4, "det", 0)[0].tolist() == [True] * 4 + [False] * 6
    k_rand, sc_rand, m_rand = r.select(4, "rand", 0)
    torch.testing.assert_close((sc_rand * m_rand * r.p)[k_rand], (sc_rand * m_rand * r.p)[k_rand].round())


# ---------------------------------------------------------------------------------------- rand rescaling (§5)


def test_rand_rescaling_is_unbiased():
    """E over seeds of the consumer's pre-activation = the dense one.

    Only the second layer is compressed (the first reads the model input). With search_iters=1 the one evaluation
    is at the det-predicted ε, which does not depend on the draws, so m′ is the same for every seed and
    E[Ŵ_c] = W_c·E[count_c]/(m′·p_c) = W_c exactly. The mean over N seeds is then unbiased with standard error
    σ/√N per output: 5 standard errors (a two-sided normal tail of 6e-7 per entry) plus 1e-9 for rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)).double().eval()
    with torch.no_grad():
        net[0].bias.uniform_(0.5, 1.0)  # every hidden unit is alive on S, so every p_c > 0
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 6, dtype=torch.float64, generator=g), torch.zeros(16, dtype=torch.long))]
    x = torch.randn(5, 6, dtype=torch.float64, generator=g)
    info = get_method("pfp")
    method = info.new()  # one method object: its score feeds its selection and update
    ctx0 = _context(net, data, variant="rand", sample_size=16, search_iters=1)
    scores = method.score(ctx0)
    with torch.no_grad():
        dense = net(x)
    outs, kept = [], set()
    for seed in range(300):
        model = copy.deepcopy(net)
        ctx = _context(model, data, seed=seed, variant="rand", sample_size=16, search_iters=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = method.select(ctx, scores, 0.5)
        method.update(ctx, ctx.masks, new)
        Masks(model, masks=new)
        kept.add(tuple(new["2.weight"][0].tolist()))
        with torch.no_grad():
            outs.append(model(x))
    assert 1 <= method.state["kept_channels"]["2.weight"] < 24 and len(kept) > 10
    outs = torch.stack(outs)
    se = outs.std(0) / math.sqrt(outs.shape[0])
    assert bool(((outs.mean(0) - dense).abs() <= 5 * se + 1e-9).all())
    assert float(se.max()) < 0.2 * float(dense.abs().max())  # the check is not vacuous


# --------------------------------------------------------------------------------------------- errors, seeds


def test_unreachable_sparsities_raise_with_the_range():
    model = _build("lenet5_caffe")
    data = _data((1, 28, 28), 8)
    with pytest.raises(PrunekitError, match=r"above what channel pruning can reach: pfp can reach sparsities from"):
        pk.prune(copy.deepcopy(model), "pfp", 0.9999, data, sample_size=8)
    with torch.no_grad():  # 10 of conv1's 20 filters output 0: conv2's channels 10..19 have s_c = 0
        model.conv1.weight[10:] = 0
        model.conv1.bias[10:] = 0
    with pytest.raises(PrunekitError, match=r"below what channel pruning can reach.*zero sensitivity"):
        pk.prune(model, "pfp", 0.01, data, sample_size=8)


def test_fixed_seed_gives_identical_masks_and_weights():
    data = _data((1, 28, 28), 8)
    runs = []
    for seed in (4, 4, 5):
        model = _build("lenet5_caffe")
        masks = pk.prune(model, "pfp", 0.8, data, sample_size=8, variant="rand", seed=seed)
        runs.append((masks.as_dict(), model.state_dict()))
    (m1, w1), (m2, w2), (m3, _) = runs
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(m1[k], m3[k]) for k in m1)


def test_registration_and_options():
    info = get_method("pfp")
    method = info.new()  # one method object: its score feeds its selection and update
    assert info.structured and info.needs_data == "inputs" and info.sources == ("002",)
    assert info.family == "sensitivity (provable, filters)" and info.select is not None and info.update is not None
    o = info.make_options()
    assert (o.variant, o.delta_s, o.C, o.sample_size, o.size_tol, o.search_iters) == ("det", 1e-16, 3.0, None,
                                                                                       0.005, 20)
    with pytest.raises(PrunekitError):
        info.make_options(variant="hybrid")
    with pytest.raises(PrunekitError, match="delta_s"):
        info.make_options(delta_s=2.0)


def test_round_channels_gives_multiples_and_still_matches_size():
    import warnings

    import prunekit as pk
    from prunekit.models import get_model

    torch.manual_seed(0)
    model = get_model("vgg11_bn", num_classes=10, input_shape=(3, 32, 32)).eval()
    data = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "pfp", 0.7, data=data, sample_size=8, round_channels=16)
    from prunekit.structured import channel_groups, channel_masks_from_masks

    x = torch.randn(2, 3, 32, 32)
    groups = channel_groups(model, x)
    cm = channel_masks_from_masks(model, groups, masks)
    counts = {g.name: int(cm[g.name].sum()) for g in groups if g.name in cm}
    sizes = {g.name: g.size for g in groups}
    assert counts and all(c % 16 == 0 or c == sizes[n] for n, c in counts.items())
    assert any(c < sizes[n] for n, c in counts.items())  # something was pruned
    assert abs(masks.sparsity() - 0.7) < 0.05  # rounding costs precision, not the order of magnitude
