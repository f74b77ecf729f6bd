"""``wanda`` (issue 17 §1): the score |W_ij|·‖X_j‖₂ against a plain computation, the per-row comparison group
(the same count in every row), the layer and global groups (exact counts), N:M, sequential."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def data():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 4.0, 20)
    return [(torch.randn(16, 20, generator=g) * scale, torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]


def test_the_score_is_the_weight_times_the_input_column_norm():
    m = mlp()
    scores = pk.score(m, "wanda", data=data())
    X = torch.cat([x for x, _ in data()])
    with torch.no_grad():
        inputs = {"0": X, "2": m[1](m[0](X)), "4": m[3](m[2](m[1](m[0](X))))}
    for name, x in inputs.items():
        want = m.get_submodule(name).weight.detach().abs().double() * x.double().norm(dim=0)[None, :]
        assert torch.allclose(scores[f"{name}.weight"], want, rtol=1e-5, atol=1e-7), name


def test_rows_keep_the_same_count_and_the_top_scores_of_each_row():
    m = mlp()
    scores = pk.score(copy.deepcopy(m), "wanda", data=data())
    masks = pk.prune(m, "wanda", sparsity=0.5, data=data())
    for p in masks.params:
        k = masks[p.name]
        assert int(k.sum()) == pk.keep_count(k.numel(), 0.5)
        per_row = k.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.min()) == k.shape[1] // 2
        s = scores[p.name]
        kept_min = torch.where(k, s, torch.full_like(s, float("inf"))).amin(1)
        dropped_max = torch.where(~k, s, torch.full_like(s, -float("inf"))).amax(1)
        assert bool((kept_min >= dropped_max).all()), p.name


@pytest.mark.parametrize("compare", ["layer", "global"])
def test_layer_and_global_comparison_keep_exact_counts(compare):
    m = mlp()
    scores = pk.score(copy.deepcopy(m), "wanda", data=data())
    masks = pk.prune(m, "wanda", sparsity=0.6, data=data(), compare=compare)
    if compare == "layer":
        for p in masks.params:
            assert int(masks[p.name].sum()) == pk.keep_count(p.tensor.numel(), 0.6)
    else:
        assert masks.kept() == pk.keep_count(masks.total(), 0.6)
        flat = torch.cat([scores[n].reshape(-1) for n in masks.names()])
        keep = torch.cat([masks[n].reshape(-1) for n in masks.names()])
        assert float(flat[keep].min()) >= float(flat[~keep].max())


def test_nested_rounds_per_row_count_what_was_pruned_before():
    m = mlp()
    m1 = pk.prune(m, "wanda", sparsity=0.5, data=data())
    first = {n: t.clone() for n, t in m1.items()}
    m2 = pk.prune(m, "wanda", sparsity=0.75, data=data(), masks=m1)
    for p in m2.params:
        assert int(m2[p.name].sum()) == pk.keep_count(p.tensor.numel(), 0.75)
        assert not bool((m2[p.name] & ~first[p.name]).any())
        assert bool((p.tensor.detach()[~m2[p.name]] == 0).all())


def test_four_eight_pattern():
    m = mlp()
    masks = pk.prune(m, "wanda", sparsity=0.5, data=data(), pattern="4:8", ignore=["0", "4"])  # 20, 12 columns
    for p in masks.params:
        k = masks[p.name]
        assert bool((k.reshape(k.shape[0], -1, 8).sum(2) == 4).all()), p.name


def test_sequential_scores_the_later_layers_on_the_pruned_outputs():
    m_seq, m_one = mlp(), mlp()
    a = pk.prune(m_seq, "wanda", sparsity=0.75, data=data(), sequential=True)
    b = pk.prune(m_one, "wanda", sparsity=0.75, data=data())
    assert torch.equal(a["0.weight"], b["0.weight"])
    # the sequential masks of the second layer are those of its scores on the pruned first layer's outputs
    X = torch.cat([x for x, _ in data()])
    with torch.no_grad():
        h = m_seq[1](m_seq[0](X))
        dense = mlp()
        s = dense[2].weight.abs() * h.norm(dim=0)[None, :]
    k = torch.zeros_like(a["2.weight"])
    top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :4]  # 0.25·16 = 4 per row
    k.scatter_(1, top, True)
    assert torch.equal(a["2.weight"], k)
    assert not torch.equal(a["2.weight"], b["2.weight"])


def test_global_comparison_needs_the_one_pass_score():
    with pytest.raises(pk.PrunekitError, match="compare: global ranks every layer at once, so it needs "
                                               "sequential: false"):
        pk.prune(mlp(), "wanda", sparsity=0.5, data=data(), compare="global", sequential=True)


def test_budgets_add_up_exactly_within_capacities():
    from prunekit.families.layerwise.quotas import allocate

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        size = torch.randint(1, 20, (n,), generator=g).tolist()
        cap = [int(torch.randint(0, s + 1, (1,), generator=g)) for s in size]
        k = int(torch.randint(0, sum(cap) + 1, (1,), generator=g))
        q = allocate(cap, size, k)
        assert sum(q) == k and all(0 <= a <= c for a, c in zip(q, cap)), (cap, size, k, q)
        free = [i for i in range(n) if q[i] < cap[i]]  # parts below their cap got within 1 of a common share
        if len(free) > 1:
            shares = [q[i] / size[i] for i in free]
            assert max(shares) - min(shares) < 2 * max(1 / size[i] for i in free), (cap, size, k, q)
    assert allocate([5, 5, 5], [10, 10, 10], 7) == [3, 2, 2]  # remainder to the lower index
    with pytest.raises(ValueError, match="only 3 are alive"):
        allocate([1, 2], [4, 4], 4)
