"""Public API: pk.prune / pk.score / pk.methods / pk.sparsity, masks and parameter discovery."""
import pytest
import torch
from torch import nn

import prunekit as pk


def test_methods_table_has_baselines():
    names = [m.name for m in pk.methods()]
    for code in ("none", "random", "magnitude"):
        assert code in names
    info = pk.get_method("magnitude")
    assert info.needs_data == "none" and not info.structured and info.summary


def test_unknown_method_suggests_close_names(tiny_mlp):
    with pytest.raises(pk.PrunekitError, match="did you mean 'random'"):
        pk.prune(tiny_mlp, "randm", sparsity=0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "lots"])
def test_sparsity_outside_range(tiny_mlp, bad):
    with pytest.raises(pk.PrunekitError, match="sparsity"):
        pk.prune(tiny_mlp, "magnitude", sparsity=bad)


def test_density_and_compression_convert(tiny_mlp):
    assert pk.resolve_sparsity(density=0.1) == pytest.approx(0.9)
    assert pk.resolve_sparsity(compression=2) == pytest.approx(0.99)
    with pytest.raises(pk.PrunekitError, match="only one"):
        pk.resolve_sparsity(sparsity=0.5, density=0.5)


def test_nothing_prunable():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(pk.PrunekitError, match="nothing prunable"):
        pk.prune(model, "magnitude", sparsity=0.5)


def test_unknown_option_lists_valid_ones(tiny_mlp):
    with pytest.raises(pk.PrunekitError, match="valid options: .*scope"):
        pk.prune(tiny_mlp, "magnitude", sparsity=0.5, temprature=3)


def test_magnitude_keeps_exactly_the_largest(tiny_mlp):
    w = torch.cat([p.detach().abs().reshape(-1) for n, p in tiny_mlp.named_parameters() if n.endswith("weight")])
    n = w.numel()
    k = pk.keep_count(n, 0.7)
    thr = torch.sort(w, descending=True).values[k - 1]
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.7)
    assert masks.kept() == k
    kept_vals = torch.cat([tiny_mlp[i].weight.detach().abs()[masks[f"{i}.weight"]] for i in (0, 2, 4)])
    assert kept_vals.min() >= thr
    assert pk.sparsity(tiny_mlp) == pytest.approx(1 - k / n)


def test_random_is_seeded_exact_and_independent_of_global_rng(tiny_mlp):
    import copy

    a, b = copy.deepcopy(tiny_mlp), copy.deepcopy(tiny_mlp)
    torch.manual_seed(123)
    ma = pk.prune(a, "random", sparsity=0.8, seed=7)
    torch.manual_seed(999)
    mb = pk.prune(b, "random", sparsity=0.8, seed=7)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    mc = pk.prune(copy.deepcopy(tiny_mlp), "random", sparsity=0.8, seed=8)
    assert not all(torch.equal(ma[n], mc[n]) for n in ma)
    assert ma.kept() == pk.keep_count(ma.total(), 0.8)


@pytest.mark.parametrize("method", ["random", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_give_nested_masks_and_exact_final_count(tiny_mlp, method, scope):
    masks = pk.prune(tiny_mlp, method, sparsity=0.5, scope=scope)
    first = masks.state_dict()
    masks = pk.prune(tiny_mlp, method, sparsity=0.9, scope=scope, rounds=5, masks=masks)
    for n in first:
        assert not bool((masks[n] & ~first[n]).any())
    if scope == "global":
        assert masks.kept() == pk.keep_count(masks.total(), 0.9)
    else:
        for s in masks.layer_stats():
            assert s.kept == max(1, int(0.1 * s.total + 0.5))


def test_round_sparsities_exponential_and_linear():
    s = pk.round_sparsities(0.99, 2, "exponential")
    assert s[0] == pytest.approx(0.9) and s[1] == pytest.approx(0.99)
    assert pk.round_sparsities(0.9, 3, "linear") == pytest.approx([0.3, 0.6, 0.9])


def test_none_adds_no_mask(tiny_mlp):
    masks = pk.prune(tiny_mlp, "none", sparsity=0.9)
    assert masks.density() == 1.0 and pk.sparsity(tiny_mlp) == 0.0


def test_score_is_pure(tiny_mlp):
    before = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    scores = pk.score(tiny_mlp, "magnitude")
    assert set(scores) == {"0.weight", "2.weight", "4.weight"}
    assert all(torch.equal(before[k], v) for k, v in tiny_mlp.state_dict().items())


def test_param_options(tiny_mlp):
    names = [p.name for p in pk.prunable_params(tiny_mlp, exclude_output=True)]
    assert names == ["0.weight", "2.weight"]
    names = [p.name for p in pk.prunable_params(tiny_mlp, exclude_first=True, include_bias=True)]
    assert names == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert [p.name for p in pk.prunable_params(tiny_mlp, modules=["2"])] == ["2.weight"]
    with pytest.raises(pk.PrunekitError, match="did you mean"):
        pk.prunable_params(tiny_mlp, exclude=["44"])


def test_bn_never_prunable_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4, 2))
    assert [p.name for p in pk.prunable_params(model)] == ["0.weight", "4.weight"]


def test_save_load_round_trip_into_fresh_model(tmp_path, tiny_mlp):
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.8, scope="layer")
    pk.save(tmp_path / "m.pt", tiny_mlp, masks, note="x")
    torch.manual_seed(42)
    fresh = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    loaded = pk.load(tmp_path / "m.pt", fresh)
    assert all(torch.equal(a, b) for a, b in zip(tiny_mlp.state_dict().values(), fresh.state_dict().values()))
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    x = torch.randn(5, 12)
    assert torch.equal(tiny_mlp(x), fresh(x))
    # the loaded masks still enforce zeros during training
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loaded.attach(opt)
    for _ in range(5):
        opt.zero_grad()
        fresh(x).pow(2).sum().backward()
        opt.step()
    assert pk.sparsity(fresh) == pytest.approx(masks.sparsity())


def test_load_wrong_model_is_clear_error(tmp_path, tiny_mlp):
    pk.save(tmp_path / "m.pt", tiny_mlp)
    with pytest.raises(pk.PrunekitError, match="does not fit"):
        pk.load(tmp_path / "m.pt", nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_pruned_weights_exactly_zero_after_many_steps(tiny_mlp, opt_name):
    torch.manual_seed(0)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    }
    opt = make[opt_name](tiny_mlp.parameters())
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()

    for _ in range(20):  # build up optimizer state densely first
        step()
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.75)
    masks.attach(opt)
    for _ in range(300):
        step()
        for n, m in masks.items():
            w = dict(tiny_mlp.named_parameters())[n]
            assert torch.count_nonzero(w[~m]) == 0
    for n, m in masks.items():
        w = dict(tiny_mlp.named_parameters())[n]
        for v in opt.state[w].values():
            if torch.is_tensor(v) and v.shape == w.shape:
                assert torch.count_nonzero(v[~m]) == 0
        assert torch.count_nonzero(w[m]) == int(m.sum())  # kept weights still train (none stuck at zero)


def test_masks_summary_reports_collapse():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-6)
    with pytest.warns(UserWarning, match="collapse"):
        masks = pk.prune(model, "magnitude", sparsity=0.9)
    assert masks.collapsed() == ["1.weight"]
    assert "collapsed" in masks.summary()


class NoisyOptimizer(torch.optim.Optimizer):
    """Moves every weight by noise, gradient or not: only the post-step re-masking can keep zeros."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                p.add_(torch.randn_like(p), alpha=g["lr"])


def test_custom_optimizer_gets_post_step_masking(tiny_mlp):
    masks = pk.prune(tiny_mlp, "random", sparsity=0.6)
    opt = NoisyOptimizer(tiny_mlp.parameters())
    handle = masks.attach(opt)
    for _ in range(10):
        opt.step()
    assert pk.sparsity(tiny_mlp) == masks.sparsity()
    handle.remove()
    opt.step()
    assert pk.sparsity(tiny_mlp) < masks.sparsity()


def test_method_update_runs_between_selection_and_masking(tiny_mlp, scoped_registry):
    """A registered update sees the masks before and after selection, moves weights, and pruned ones end at 0."""
    seen = {}

    def update(ctx, before, after):
        seen["state"] = ctx.state.get("from_score")
        seen["newly_pruned"] = sum(int((before[n] & ~after[n]).sum()) for n in after)
        for p in ctx.params:
            p.tensor.add_(1.0)  # shift every weight, pruned ones included

    def score(ctx):
        ctx.state["from_score"] = "hello"
        return {p.name: p.tensor.detach().abs() for p in ctx.params}

    pk.register("test_shift_update", family="test", needs_data="none", summary="test only", update=update)(score)
    before = {n: p.detach().clone() for n, p in tiny_mlp.named_parameters()}
    masks = pk.prune(tiny_mlp, "test_shift_update", sparsity=0.5)
    assert seen == {"state": "hello", "newly_pruned": masks.total() - masks.kept()}
    for n, m in masks.items():
        w = dict(tiny_mlp.named_parameters())[n]
        assert torch.count_nonzero(w[~m]) == 0
        torch.testing.assert_close(w[m], before[n][m] + 1.0)


def test_registered_test_method_does_not_leak():
    """The test above registered ``test_shift_update`` under ``scoped_registry``: no later test sees it."""
    assert "test_shift_update" not in [m.name for m in pk.methods()]
    with pytest.raises(pk.PrunekitError, match="unknown method"):
        pk.get_method("test_shift_update")


def test_scoped_registry_restores_the_registry():
    from prunekit import registry

    before = registry.snapshot()
    with registry.scoped():
        pk.register("test_scoped_tmp", family="test", needs_data="none", summary="test only",
                    aliases=("test_scoped_alias",))(lambda ctx: {p.name: p.tensor.abs() for p in ctx.params})
        assert pk.get_method("test_scoped_alias").name == "test_scoped_tmp"
    assert registry.snapshot() == before
    assert "test_scoped_tmp" not in [m.name for m in pk.methods()]


# ------------------------------------------------------------------------------ masks never contradict the model
def _lenet():
    from prunekit.models import get_model

    torch.manual_seed(0)
    return get_model("lenet_300_100")


def _weights(masks):
    return {p.name: p.tensor.detach() for p in masks.params}


def test_fresh_model_has_no_existing_zeros_warning(tiny_mlp):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.masks.ExistingZerosWarning)
        masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.5)
        pk.prune(tiny_mlp, "random", sparsity=0.9, masks=masks)  # masks given: no warning either


def test_existing_zeros_count_as_pruned_without_masks():
    """magnitude 0.5, then random 0.9 without masks=: the zeros of the first prune stay pruned, the masks keep
    exactly the non-zero weights, and the counts are exact."""
    model = _lenet()
    first = pk.prune(model, "magnitude", sparsity=0.5)
    total = first.total()
    zeros = total - pk.keep_count(total, 0.5)
    assert first.kept() == total - zeros
    with pytest.warns(pk.masks.ExistingZerosWarning, match=f"{zeros:,} exact zeros") as rec:
        masks = pk.prune(model, "random", sparsity=0.9)
    assert "masks=" in str(rec[0].message)
    assert masks.kept() == pk.keep_count(total, 0.9)
    assert pk.sparsity(model) == masks.sparsity()
    for name, w in _weights(masks).items():
        assert torch.equal(masks[name], w != 0)  # kept entries are exactly the non-zero weights
        assert not bool((masks[name] & ~first[name]).any())  # nested in the first masks


def test_lower_sparsity_than_existing_zeros_is_an_error_before_scoring(scoped_registry):
    model = _lenet()
    pk.prune(model, "magnitude", sparsity=0.95)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def score(ctx):
        calls.append(1)
        return {p.name: p.tensor.detach().abs() for p in ctx.params}

    pk.register("test_counting_score", family="test", needs_data="none", summary="test only")(score)
    with pytest.warns(pk.masks.ExistingZerosWarning):
        with pytest.raises(pk.PrunekitError, match=r"sparsity 0.8 .*at least 0.95"):
            pk.prune(model, "test_counting_score", sparsity=0.8)
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pk.sparsity(model) == pytest.approx(0.95, abs=1e-5)


def test_lower_sparsity_with_given_masks_is_an_error_before_scoring(tiny_mlp):
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.75)
    with pytest.raises(pk.PrunekitError, match=r"at least 0.75"):
        pk.prune(tiny_mlp, "magnitude", sparsity=0.5, masks=masks)
    assert masks.kept() == pk.keep_count(masks.total(), 0.75)


def test_existing_zeros_layer_scope_keeps_them_pruned():
    model = _lenet()
    pk.prune(model, "magnitude", sparsity=0.95)
    zeros_before = {n: int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")}
    with pytest.warns(pk.masks.ExistingZerosWarning):
        masks = pk.prune(model, "random", sparsity=0.5, scope="layer")
    for s in masks.layer_stats():
        w = dict(model.named_parameters())[s.name]
        assert torch.equal(masks[s.name], w.detach() != 0)
        assert s.total - s.kept >= zeros_before[s.name]  # at least as sparse as before, in every layer
        assert s.kept == min(max(1, int(0.5 * s.total + 0.5)), s.total - zeros_before[s.name])


def test_all_zero_tensor_is_an_initialisation_not_a_mask(tiny_mlp):
    import warnings

    with torch.no_grad():
        for m in tiny_mlp:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.masks.ExistingZerosWarning)
        masks = pk.prune(tiny_mlp, "random", sparsity=0.5, include_bias=True, scope="layer")
    assert all(s.kept == max(1, int(0.5 * s.total + 0.5)) for s in masks.layer_stats())  # biases pruned from dense


def test_attach_reapplies_masks_after_regrowth(tiny_mlp):
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.9, scope="layer")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(tiny_mlp(x), y).backward()
        opt.step()

    for _ in range(5):  # trained without the masks attached: pruned weights regrow
        step()
    assert pk.sparsity(tiny_mlp) < 0.5
    masks.attach(opt)
    assert pk.sparsity(tiny_mlp) == masks.sparsity()  # applied on attach
    for _ in range(200):
        step()
    for name, w in _weights(masks).items():
        assert torch.count_nonzero(w[~masks[name]]) == 0
        buf = opt.state[dict(tiny_mlp.named_parameters())[name]]["momentum_buffer"]
        assert torch.count_nonzero(buf[~masks[name]]) == 0
    assert all(s.kept == max(1, int(0.1 * s.total + 0.5)) for s in masks.layer_stats())
    assert pk.sparsity(tiny_mlp) == masks.sparsity()


def test_attach_to_an_optimizer_of_another_model_is_an_error(tiny_mlp):
    import copy

    other = copy.deepcopy(tiny_mlp)
    masks = pk.prune(tiny_mlp, "magnitude", sparsity=0.9, scope="layer")
    with pytest.raises(pk.PrunekitError, match="holds none of the 3 masked tensors"):
        masks.attach(torch.optim.SGD(other.parameters(), lr=0.1))
    assert masks.optimizers() == []
    with pytest.raises(pk.PrunekitError, match="Optimizer"):
        masks.attach(other.parameters())


@pytest.mark.parametrize("method, options", [
    ("snip", {}), ("grasp", {}), ("synflow", {"rounds": 3}),
    ("woodfisherblock", {"fisher_samples": 16, "fisher_batch": 2}),  # an OBS update moves the kept weights
])
def test_existing_zeros_for_data_and_update_methods(tiny_mlp, method, options):
    """After a first prune, a second one without masks= by any method keeps the zeros pruned: its masks keep exactly
    the non-zero weights and the exact count."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    first = pk.prune(tiny_mlp, "magnitude", sparsity=0.5, scope="layer")
    with pytest.warns(pk.masks.ExistingZerosWarning, match=f"{first.total() - first.kept():,} exact zeros"):
        masks = pk.prune(tiny_mlp, method, sparsity=0.75, data=data, **options)
    assert masks.kept() == pk.keep_count(masks.total(), 0.75)
    for name, w in _weights(masks).items():
        assert torch.equal(masks[name], w != 0)
        assert not bool((masks[name] & ~first[name]).any())


def test_method_kind_and_sources_with_the_deprecated_seeds_name():
    kinds = {m.name: m.kind for m in pk.methods()}
    assert kinds["none"] == "dense" and kinds["lth"] == "levels" and kinds["ciap"] == "levels"
    assert kinds["snip"] == kinds["woodfisherblock"] == kinds["pfp"] == "one-shot"
    assert set(kinds.values()) == {"dense", "one-shot", "levels"}
    info = pk.get_method("snip") if hasattr(pk, "get_method") else [m for m in pk.methods() if m.name == "snip"][0]
    assert info.sources == ("000", "004")
    with pytest.warns(DeprecationWarning, match="sources"):
        assert info.seeds == info.sources


def test_a_method_class_gets_one_instance_per_prune_call(scoped_registry, tiny_mlp):
    """A registered PruningMethod carries state from its score to its select and update on self; every prune call
    gets a fresh instance (rounds of one call share it)."""
    seen = []

    @pk.register("test_class_method", family="test", needs_data="none", summary="test only")
    class Mine(pk.PruningMethod):
        def __init__(self):
            self.rounds = []

        def score(self, ctx):
            self.rounds.append(ctx.round)
            return {p.name: p.tensor.detach().abs() for p in ctx.params}

        def select(self, ctx, scores, sparsity):
            assert self.rounds[-1] == ctx.round  # the score of the same round, on the same object
            return pk.select(scores, ctx.masks, sparsity, "global")

        def update(self, ctx, before, after):
            seen.append((self, tuple(self.rounds)))  # the object itself (an id could be reused after GC)

    m1 = pk.prune(tiny_mlp, "test_class_method", sparsity=0.5, rounds=2)
    pk.prune(tiny_mlp, "test_class_method", sparsity=0.8, rounds=1, masks=m1)
    assert [r for _, r in seen] == [(1,), (1, 2), (1,)]
    assert seen[0][0] is seen[1][0] and seen[1][0] is not seen[2][0]  # one instance per call, shared by its rounds
    assert pk.get_method("test_class_method").kind == "one-shot"
    assert m1.total() - m1.kept() >= 0 and pk.sparsity(tiny_mlp) == pytest.approx(0.8, abs=1e-2)
