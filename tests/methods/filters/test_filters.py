"""Filter-pruning baselines (filter_l1, filter_l2, filter_random, bn_scale) and channel selection."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.models import get_model
from nets import randomize_batchnorm
from prunekit.structured import (bn_scale_scores, channel_groups, channel_masks_from_masks, channel_masks_to_masks,
                                 example_input_for, filter_norm_scores, masks_from_channels, select_channels)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"lenet5_caffe": (1, 28, 28), "vgg11_bn": (3, 32, 32), "resnet20": (3, 32, 32)}
_CACHE = {}


def build(name, seed=0):
    """A fresh copy of a model with non-trivial BN statistics (built once per name and seed)."""
    key = (name, seed)
    if key not in _CACHE:
        torch.manual_seed(seed)
        model = randomize_batchnorm(get_model(name, num_classes=10, input_shape=SHAPES[name]))
        _CACHE[key] = model.eval()
    return copy.deepcopy(_CACHE[key])


def batch(name, n=2, seed=1):
    return torch.randn(n, *SHAPES[name], generator=torch.Generator().manual_seed(seed))


def groups_of(model, name):
    return channel_groups(model, batch(name))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def weight_masks(model):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() > 1}


# ------------------------------------------------------------------------------------------------ registry
def test_methods_are_registered_as_structured():
    infos = {m.name: m for m in pk.methods()}
    for code, allocation in (("filter_l1", "uniform"), ("filter_l2", "uniform"), ("filter_random", "uniform"),
                             ("bn_scale", "global")):
        info = infos[code]
        assert info.structured and info.family == "structured baseline" and info.sources == ("002",)
        assert info.select is not None and info.update is not None
        assert info.options().allocation == allocation and info.options().size_tol == 0.005
    with pytest.raises(PrunekitError, match="allocation"):
        pk.prune(build("lenet5_caffe"), "filter_l1", sparsity=0.5, allocation="layer")


# ------------------------------------------------------------------------------------------------ scores
def test_l1_l2_scores_equal_a_hand_loop_over_filters():
    model = build("resnet20")
    groups = groups_of(model, "resnet20")
    mods = dict(model.named_modules())
    l1, l2 = filter_norm_scores(model, groups, p=1), filter_norm_scores(model, groups, p=2)
    for g in groups:
        for c in range(g.size):
            rows = [mods[p].weight[c].detach().double() for p in g.producers]  # tied groups: all producers
            assert l1[g.name][c].item() == pytest.approx(sum(float(r.abs().sum()) for r in rows), rel=1e-12)
            assert l2[g.name][c].item() == pytest.approx(sum(float((r ** 2).sum()) for r in rows) ** 0.5, rel=1e-12)
    # per-weight view: rows get their channel's score, consumer slices their input channel's (the smaller of both)
    scores = pk.score(model, "filter_l1")
    stem = next(g for g in groups if "conv" in g.producers)
    assert torch.allclose(scores["conv.weight"].double(), l1[stem.name].float().double().view(-1, 1, 1, 1)
                          .expand_as(scores["conv.weight"]))
    w = scores["layer1.0.conv1.weight"]
    expect = torch.minimum(l1["layer1.0.conv1"].float().view(-1, 1), l1[stem.name].float().view(1, -1))
    assert torch.equal(w[:, :, 0, 0], expect)
    assert torch.isinf(scores["fc.weight"]).sum() == 0  # its columns follow the last stage's channels


def test_bn_scale_scores_take_abs_and_max_over_tied_norms():
    model = build("resnet20")
    groups = groups_of(model, "resnet20")
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods["bn"].weight.neg_()
    scores = bn_scale_scores(model, groups)
    tied = next(g for g in groups if len(g.norms) > 1)
    expect = torch.stack([mods[n].weight.detach().abs().double() for n in tied.norms]).amax(0)
    assert torch.equal(scores[tied.name], expect)
    assert "fc" not in scores  # no BatchNorm after the classifier


# ------------------------------------------------------------------------------------------------ selection
def _fractions_fit(keep, alive_counts):
    """True when one fraction f gives |k_g - f * a_g| <= 1 in every group."""
    lo = max((int(k.sum()) - 1) / a for k, a in zip(keep, alive_counts))
    hi = min((int(k.sum()) + 1) / a for k, a in zip(keep, alive_counts))
    return lo <= hi + 1e-12


@pytest.mark.parametrize("name", ["lenet5_caffe", "resnet20"])
def test_uniform_keeps_the_same_fraction_and_the_best_channels(name):
    model = build(name)
    ref = copy.deepcopy(model)
    masks = pk.prune(model, "filter_l1", sparsity=0.5)
    groups = groups_of(ref, name)
    l1 = filter_norm_scores(ref, groups, p=1)
    keep = channel_masks_from_masks(model, groups, masks)
    prunable = [g for g in groups if g.prunable]
    assert _fractions_fit([keep[g.name] for g in prunable], [g.size for g in prunable])
    for g in prunable:  # the kept channels are the top ones of their group
        k = keep[g.name]
        if not bool(k.all()):
            assert float(l1[g.name][k].min()) >= float(l1[g.name][~k].max())


@pytest.mark.parametrize("name", ["lenet5_caffe", "vgg11_bn", "resnet20"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_kept_weights_within_size_tol(name, allocation):
    model = build(name)
    groups = groups_of(model, name)
    scores = filter_norm_scores(model, groups, p=1)
    alive = weight_masks(model)
    total = sum(m.numel() for m in alive.values())
    for s in (0.3, 0.5, 0.7):
        target = round((1 - s) * total)
        keep, kept = select_channels(model, groups, scores, target, alive, allocation)
        masks = masks_from_channels(model, groups, keep, alive)
        assert kept == sum(int(m.sum()) for m in masks.values())  # the fast count is the real one
        assert abs(kept / target - 1) <= 0.005, (s, kept, target)
        ref = channel_masks_to_masks(model, groups, keep)  # same as the structured module's weight masks
        for n, m in masks.items():
            assert torch.equal(m, alive[n] & ref.get(n, alive[n]))
    if name == "lenet5_caffe":  # through pk.prune too
        m = pk.prune(build(name), "filter_l1", sparsity=0.7, allocation=allocation)
        assert abs(m.kept() / round(0.3 * m.total()) - 1) <= 0.005


def test_global_normalized_ranking_and_min_keep():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    groups = channel_groups(model, torch.randn(2, 1, 7, 7))
    a, b = groups[0].name, groups[1].name
    scores = {a: torch.tensor([4.0, 3.0, 2.0, 1.0]), b: torch.tensor([400.0, 1.0, 360.0, 240.0])}
    alive = weight_masks(model)

    def size(ka, kb):
        keep = {a: torch.tensor(ka, dtype=torch.bool), b: torch.tensor(kb, dtype=torch.bool)}
        return keep, sum(int(m.sum()) for m in masks_from_channels(model, groups, keep, alive).values())

    # normalized by the group max: b2 (0.9), a1 (0.75), b3 (0.6), a2 (0.5), ...; each group's best always kept
    for ka, kb in (([1, 0, 0, 0], [1, 0, 1, 0]), ([1, 1, 0, 0], [1, 0, 1, 0]), ([1, 1, 0, 0], [1, 0, 1, 1])):
        keep, target = size(ka, kb)
        got, kept = select_channels(model, groups, scores, target, alive, "global", size_tol=0.0)
        assert kept == target and got[a].tolist() == keep[a].tolist() and got[b].tolist() == keep[b].tolist()
    # raw scores: all of b (360, 240) before a's 3
    keep, target = size([1, 0, 0, 0], [1, 0, 1, 1])
    got, kept = select_channels(model, groups, scores, target, alive, "global", normalize="none", size_tol=0.0)
    assert kept == target and got[a].tolist() == keep[a].tolist() and got[b].tolist() == keep[b].tolist()
    # min_keep=2: every group keeps its two best channels even at the smallest size
    keep, target = size([1, 1, 0, 0], [1, 0, 1, 0])
    got, kept = select_channels(model, groups, scores, target, alive, "global", min_keep=2, size_tol=0.0)
    assert kept == target and got[a].tolist() == keep[a].tolist() and got[b].tolist() == keep[b].tolist()
    with pytest.raises(PrunekitError, match="largest reachable sparsity"):
        select_channels(model, groups, scores, target - 10, alive, "global", min_keep=2)


def test_already_removed_channels_stay_removed_and_rounds_nest():
    model = build("resnet20")
    m1 = pk.prune(model, "filter_l1", sparsity=0.3)
    groups = groups_of(model, "resnet20")
    before = channel_masks_from_masks(model, groups, m1)
    m2 = pk.prune(model, "filter_l1", sparsity=0.6, masks=m1)
    after = channel_masks_from_masks(model, groups, m2)
    for n, k in before.items():
        assert not bool((after[n] & ~k).any())
    assert abs(m2.kept() / round(0.4 * m2.total()) - 1) <= 0.005
    m3 = pk.prune(build("resnet20"), "filter_l2", sparsity=0.6, rounds=3)
    assert abs(m3.kept() / round(0.4 * m3.total()) - 1) <= 0.005


def test_unreachable_target_names_the_reachable_sparsity():
    model = build("lenet5_caffe")
    with pytest.raises(PrunekitError, match="largest reachable sparsity") as e:
        pk.prune(model, "filter_l1", sparsity=0.9999)
    msg = str(e.value)
    assert "exclude" in msg
    smax = float(re.search(r"sparsity <= ([0-9.]+)", msg).group(1))
    masks = pk.prune(build("lenet5_caffe"), "filter_l1", sparsity=smax)
    assert abs(masks.kept() / round((1 - smax) * masks.total()) - 1) <= 0.005


def test_non_prunable_groups_are_worked_around_with_one_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x)
    alive = weight_masks(model)
    scores = filter_norm_scores(model, groups)
    with pytest.warns(UserWarning, match="cannot lose channels.*feeds the output"):
        keep, kept = select_channels(model, groups, scores, 1600, alive, size_tol=0.5)
    assert list(keep) == [groups[0].name]  # the output layer's group is left whole


# ------------------------------------------------------------------------------------------------ bn_scale
def test_bn_scale_removes_the_smallest_gamma_globally():
    model = build("vgg11_bn")
    groups = groups_of(model, "vgg11_bn")
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in groups:
            for n in g.norms:
                gam = torch.rand(g.size, generator=gen) * 2 + 0.01
                sign = torch.where(torch.rand(g.size, generator=gen) < 0.3, -1.0, 1.0)
                mods[n].weight.copy_(gam * sign)
        mods[groups[1].norms[0]].weight.mul_(1e-3)  # one layer with tiny gammas: only its best channel survives
    gammas = {g.name: mods[g.norms[0]].weight.detach().abs().clone() for g in groups if g.norms}
    masks = pk.prune(model, "bn_scale", sparsity=0.5)
    keep = channel_masks_from_masks(model, groups, masks)
    removed, kept = [], []
    for name, gam in gammas.items():
        k = keep[name]
        best = int(gam.argmax())
        removed += gam[~k].tolist()
        kept += [v for i, v in enumerate(gam.tolist()) if k[i] and i != best]  # the best one is always kept
        assert k[best]
    assert max(removed) < min(kept)
    assert int(keep[groups[1].name].sum()) == 1
    assert abs(masks.kept() / round(0.5 * masks.total()) - 1) <= 0.005
    for name, k in keep.items():  # removed channels were made exact: gamma = beta = 0
        bn = mods[next(g for g in groups if g.name == name).norms[0]]
        assert bool((bn.weight[~k] == 0).all()) and bool((bn.bias[~k] == 0).all())


def test_bn_scale_needs_batchnorm():
    with pytest.raises(PrunekitError, match="BatchNorm"):
        pk.prune(build("lenet5_caffe"), "bn_scale", sparsity=0.5)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name,method", [("lenet5_caffe", "filter_l1"), ("resnet20", "filter_l1"),
                                         ("resnet20", "bn_scale"), ("vgg11_bn", "filter_l2")])
def test_pruned_model_shrinks_to_the_same_function(name, method):
    model = build(name)
    masks = pk.prune(model, method, sparsity=0.5)
    small = pk.shrink(model, masks)
    assert n_params(small) < 0.6 * n_params(model)
    x = batch(name, n=3, seed=7)
    with torch.no_grad():
        a, b = model(x), small(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_filter_random_is_seeded():
    def masks(seed):
        return pk.prune(build("resnet20"), "filter_random", sparsity=0.5, seed=seed).state_dict()

    m0, m0b, m1 = masks(0), masks(0), masks(1)
    assert all(torch.equal(m0[n], m0b[n]) for n in m0)
    assert any(not torch.equal(m0[n], m1[n]) for n in m0)


def test_pruned_channels_stay_zero_through_sgd():
    model = build("resnet20")
    masks = pk.prune(model, "filter_l1", sparsity=0.5)
    groups = groups_of(model, "resnet20")
    keep = channel_masks_from_masks(model, groups, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    masks.attach(opt)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in masks.params:
        assert bool((p.tensor[~masks[p.name]] == 0).all()), p.name
    mods = dict(model.named_modules())
    for g in groups:
        if g.name in keep:
            for n in g.norms:
                assert bool((mods[n].weight[~keep[g.name]] == 0).all()) and bool((mods[n].bias[~keep[g.name]] == 0).all())
    small = pk.shrink(model, masks)  # checks masked == shrunk after training
    assert n_params(small) < n_params(model)


def test_example_input_from_shape_or_data():
    model = build("lenet5_caffe")
    assert tuple(example_input_for(model).shape) == (2, 1, 28, 28)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    data = [(torch.randn(1, 1, 7, 7), torch.tensor([0]))]
    assert tuple(example_input_for(plain, data).shape) == (2, 1, 7, 7)
    with pytest.raises(PrunekitError, match="input_shape"):
        example_input_for(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(plain, "filter_l1", sparsity=0.3, data=data)
    assert masks.sparsity() > 0.2
