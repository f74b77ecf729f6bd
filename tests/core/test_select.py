"""Selection: exact counts, deterministic ties, nesting, NaN handling, collapse guard."""
import math

import pytest
import torch

import prunekit as pk
from prunekit.select import keep_count, select, top_k_mask


def reference_keep(scores, alive, k):
    """Independent reference: sort alive entries by (score desc, index asc) with Python's sort."""
    order = sorted((i for i in range(len(scores)) if alive[i]), key=lambda i: (-scores[i], i))
    keep = [False] * len(scores)
    for i in order[:k]:
        keep[i] = True
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_sorted_reference_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 5, (200,), generator=g).double()  # heavy ties
    for k in (0, 1, 7, 100, 199, 200):
        got = top_k_mask(s, k).tolist()
        assert got == reference_keep(s.tolist(), [True] * 200, k)


def test_keep_count_rounds_half_up_and_keeps_one():
    assert keep_count(10, 0.85) == 2  # 1.5 -> 2
    assert keep_count(10, 0.95) == 1  # 0.5 -> 1
    assert keep_count(1000, 0.9999) == 1  # at least one
    assert keep_count(266200, 0.98) == 5324
    assert keep_count(10, 1.0) == 0


@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.98, 0.999])
def test_global_exact_count(s):
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(30, 40, generator=g), "b": torch.rand(7, 3, 3, generator=g), "c": torch.rand(5, generator=g)}
    n = sum(v.numel() for v in scores.values())
    masks = select(scores, None, s, "global")
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(n, s)
    # the kept set is exactly the top of one joint ranking
    flat = torch.cat([v.reshape(-1) for v in scores.values()]).tolist()
    ref = reference_keep(flat, [True] * n, keep_count(n, s))
    assert torch.cat([m.reshape(-1) for m in masks.values()]).tolist() == ref


@pytest.mark.parametrize("s", [0.5, 0.9, 0.99])
def test_layer_exact_counts(s):
    g = torch.Generator().manual_seed(2)
    scores = {"a": torch.rand(30, 40, generator=g), "b": torch.rand(7, 3, generator=g)}
    masks = select(scores, None, s, "layer")
    for name, m in masks.items():
        assert int(m.sum()) == max(1, math.floor((1 - s) * m.numel() + 0.5))


def test_nested_masks_never_revive():
    g = torch.Generator().manual_seed(3)
    scores1 = {"a": torch.rand(50, generator=g)}
    m1 = select(scores1, None, 0.5, "global")
    # second scores prefer exactly the pruned entries: they must still not come back
    scores2 = {"a": torch.where(m1["a"], torch.zeros(50), torch.full((50,), 10.0))}
    m2 = select(scores2, m1, 0.8, "global")
    assert int(m2["a"].sum()) == 10
    assert not bool((m2["a"] & ~m1["a"]).any())


def test_global_error_when_asking_below_current_sparsity():
    m1 = {"a": torch.tensor([True, False, False, False])}
    with pytest.raises(pk.PrunekitError, match="nested"):
        select({"a": torch.ones(4)}, m1, 0.5, "global")


def test_nan_policy():
    scores = {"a": torch.tensor([1.0, float("nan"), 3.0, 2.0])}
    with pytest.raises(pk.PrunekitError, match="NaN"):
        select(scores, None, 0.5, "global")
    m = select(scores, None, 0.25, "global", nan_policy="lowest")
    assert m["a"].tolist() == [True, False, True, True]
    m = select({"a": torch.tensor([1.0, float("inf"), 3.0])}, None, 0.6, "global")
    assert m["a"].tolist() == [False, True, False]


def test_min_keep_per_layer_prevents_collapse():
    scores = {"big": torch.arange(100.0) + 100, "small": torch.arange(10.0)}
    m = select(scores, None, 0.9, "global")
    assert int(m["small"].sum()) == 0  # collapses without the guard
    m = select(scores, None, 0.9, "global", min_keep_per_layer=2)
    assert int(m["small"].sum()) == 2 and m["small"][-2:].all()
    assert sum(int(v.sum()) for v in m.values()) == 11
    with pytest.raises(pk.PrunekitError, match="min_keep_per_layer"):
        select(scores, None, 0.99, "global", min_keep_per_layer=5)


def test_sparsity_zero_and_one():
    scores = {"a": torch.rand(10)}
    assert select(scores, None, 0.0, "global")["a"].all()
    with pytest.warns(UserWarning):
        assert not select(scores, None, 1.0, "global")["a"].any()


def test_bad_scope():
    with pytest.raises(pk.PrunekitError, match="scope"):
        select({"a": torch.rand(3)}, None, 0.5, "per-layer")
