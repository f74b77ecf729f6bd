"""The vectorized pieces of channel selection against plain computations, value for value: the candidate order
(one sort instead of a Python loop over channels), the count matrices (count_nonzero), per-weight masks in one
pass, the filter norms converted a few rows at a time, and the channel groups cached by architecture."""
import math

import pytest
import torch
from torch import nn

from prunekit.models import get_model
from prunekit.structured import channel_groups, channel_masks_to_masks, filter_norm_scores, masks_from_channels
from prunekit.structured import group_cache
from prunekit.structured import select as sel_mod
from prunekit.structured.channel_scores import cached_channel_groups, example_input_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_order(groups, scores, alive_ch, mode, min_keep, normalize, round_to):
    """The order as a loop over every block of every group, sorted with Python's stable sort (the plain path)."""
    pos, items = {}, []
    for gi, g in enumerate(groups):
        s, live = scores[g.name], alive_ch[g.name]
        a = int(live.sum())
        ranked = torch.sort(torch.where(live, s, torch.full_like(s, -math.inf)), descending=True, stable=True).indices[:a]
        m = min(round_to * math.ceil(min(min_keep, a) / round_to), a)
        p = torch.full((g.size,), math.inf, dtype=torch.float64)
        p[ranked[:m]] = -1.0
        pos[g.name] = p
        scale = 1.0
        if mode == "global" and normalize == "max" and m < a:
            top = float(s[ranked].abs().max())
            scale = top if math.isfinite(top) and top > 0 else 1.0
        for r_s in range(m + 1, a + 1, round_to):
            r_e = min(r_s + round_to - 1, a)
            chans = ranked[r_s - 1:r_e]
            k = (r_s + r_e - 1) / (2.0 * a) if mode == "uniform" else float(-(s[chans] / scale).mean())
            items.append((k, gi, chans, r_s, r_e, float(a)))
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    for j, i in enumerate(order):
        pos[groups[items[i][1]].name][items[i][2]] = float(j)
    return pos, [items[i] for i in order]


@pytest.mark.parametrize("mode, normalize", [("uniform", "max"), ("global", "max"), ("global", "none")])
@pytest.mark.parametrize("round_to", [1, 4])
def test_selector_order_equals_the_plain_loop(mode, normalize, round_to):
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    groups = [g for g in channel_groups(model, torch.randn(2, 3, 32, 32)) if g.prunable]
    g = torch.Generator().manual_seed(round_to)
    scores = {x.name: torch.rand(x.size, generator=g, dtype=torch.float64).round(decimals=2) for x in groups}  # ties
    alive_ch = {x.name: torch.rand(x.size, generator=g) > 0.2 for x in groups}
    sel = sel_mod._Selector(groups, scores, alive_ch, [], mode, 2, normalize, round_to)
    pos, items = _plain_order(groups, scores, alive_ch, mode, 2, normalize, round_to)
    assert all(torch.equal(sel.pos[k], pos[k]) for k in pos)
    assert sel.item_key == [t[0] for t in items] and sel.item_g == [t[1] for t in items]
    assert sel.item_rs == [t[3] for t in items] and sel.item_re == [t[4] for t in items]
    assert sel.item_a == [t[5] for t in items]
    assert all(torch.equal(sel._channels(j), t[2]) for j, t in enumerate(items))


def test_count_matrices_and_masks_equal_the_plain_ones():
    """Partly masked tensors: the count matrices equal float sums of the masks, and masks_from_channels equals
    channel_masks_to_masks AND the current masks."""
    torch.manual_seed(0)
    model = get_model("vgg11_bn", num_classes=10)
    groups = [g for g in channel_groups(model, torch.randn(2, 3, 32, 32)) if g.prunable]
    g = torch.Generator().manual_seed(3)
    alive = {n: torch.rand(p.shape, generator=g) > 0.1 for n, p in model.named_parameters() if p.dim() > 1}
    plans = sel_mod._plans(model, groups, alive)
    for plan in plans:
        a = alive[plan.name].float()
        want = a.reshape(a.shape[0], a.shape[1], -1).sum(-1) if plan.out_g and plan.in_g else None
        if want is not None:
            assert torch.equal(plan.C, want.double())
        assert float(plan.C.sum()) == float(a.sum())
    keep = {x.name: torch.rand(x.size, generator=g) > 0.4 for x in groups}
    got = masks_from_channels(model, groups, keep, alive)
    ref = channel_masks_to_masks(model, groups, keep)
    for n, a in alive.items():
        assert torch.equal(got[n], a & ref[n]) if n in ref else torch.equal(got[n], a)


def test_filter_norms_equal_the_whole_tensor_in_float64():
    torch.manual_seed(0)
    model = get_model("vgg11_bn", num_classes=10)
    groups = channel_groups(model, torch.randn(2, 3, 32, 32))
    mods = dict(model.named_modules())
    for p in (1, 2):
        got = filter_norm_scores(model, groups, p=p)
        for g in groups:
            rows = torch.cat([mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1) for n in g.producers], 1)
            x = rows.to(torch.float64).abs()
            want = x.sum(1) if p == 1 else x.pow(2).sum(1).pow(0.5) if len(g.producers) == 1 else None
            if want is not None:
                assert torch.equal(got[g.name], want)


def test_groups_are_cached_by_architecture():
    torch.manual_seed(0)
    a, b = get_model("resnet20", num_classes=10), get_model("resnet20", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    key = group_cache.structure_key(a, x)
    assert key is not None and key == group_cache.structure_key(b, x)
    assert group_cache.structure_key(get_model("resnet20", num_classes=100), x) != key   # another head
    assert group_cache.structure_key(a, torch.randn(2, 3, 16, 16)) != key                 # another input shape
    ga = group_cache.groups_by_structure(a, x, channel_groups)
    calls = []
    gb = group_cache.groups_by_structure(b, x, lambda m, e: calls.append(1) or channel_groups(m, e))
    assert not calls and gb == channel_groups(b, x) and gb == ga and gb is not ga
    gb[0].producers.append("changed")   # a copy: the cache is not touched
    assert group_cache.groups_by_structure(b, x, channel_groups) == ga
    h = next(m for m in b.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(lambda *args: None)   # hooks may change the forward: no key
    assert group_cache.structure_key(b, x) is None
    h.remove()
    b.forward = lambda t: t   # an instance-level forward: no key
    assert group_cache.structure_key(b, x) is None
    # the filter baselines' cache per model object goes through it
    c = get_model("resnet20", num_classes=10)
    c.input_shape = (3, 32, 32)
    assert cached_channel_groups(c) == channel_groups(c, example_input_for(c))


def test_no_key_for_unknown_attributes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.act = torch.relu   # a function: the key cannot describe it

        def forward(self, x):
            return self.fc(self.act(x))

    assert group_cache.structure_key(Net(), torch.randn(2, 4)) is None
