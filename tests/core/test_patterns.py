"""N:M sparsity patterns (issue 17 §2): ``pk.prune(..., pattern="2:4")`` for every method that scores weights.

The methods are collected from the registry when this module is imported, so a method registered later is covered
without touching this file: every one-shot code either follows the pattern or refuses it with a PrunekitError (the
structured codes, and codes with their own selection that do not declare ``supports_pattern``). The pattern is
checked with a plain-Python loop over the groups written here (not with prunekit's own grouping): Linear rows in
runs of M inputs, Conv2d input channels in runs of M at each (output channel, kernel position), GPT-2 Conv1D along
dim 0.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.params import prunable_params
from prunekit.patterns import Pattern, check_pattern, keep_top_n, parse_pattern, select_nm
from prunekit.prune import split_options
from prunekit.registry import register, scoped
from prunekit.schedules import Gradual, OneShot, PruningCallback

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_SHOT = [m for m in pk.methods() if m.kind == "one-shot"]
FOLLOWS = [m.name for m in ONE_SHOT if not m.structured and (m.select is None or getattr(m.factory, "supports_pattern",
                                                                                          False))]
REFUSES = [m.name for m in ONE_SHOT if m.name not in FOLLOWS]
BUDGETS = {"fisher_samples": 16, "kfac_samples": 16, "hess_samples": 4, "diag_fisher_samples": 16, "sample_size": 16,
           "hessian_diag": "hutchinson", "hutchinson_probes": 4}  # naivehess: no exact per-weight HVPs


def options(code: str) -> dict:
    info = pk.get_method(code)
    opts = {k: v for k, v in BUDGETS.items() if k in info.option_names()}
    if info.default_rounds > 3:  # synflow, px: 100 rounds by default
        opts["rounds"] = 3
    return opts


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(72, 4))


NETS = {"mlp": (mlp, (16,)), "conv": (conv, (8, 6, 6))}


def data(shape) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]


def group_counts(mask: torch.Tensor, m: int, dim: int = 1) -> list[int]:
    """Kept entries of every group of ``m`` along the input dimension, by plain loops (Linear (out, in) and
    Conv (out, in, kh, kw) with ``dim=1``; GPT-2 Conv1D (in, out) with ``dim=0``)."""
    t = mask.tolist()
    out = []
    if mask.dim() == 2 and dim == 1:
        for row in t:
            out += [sum(row[c:c + m]) for c in range(0, len(row), m)]
    elif mask.dim() == 2 and dim == 0:
        for j in range(mask.shape[1]):
            col = [t[i][j] for i in range(mask.shape[0])]
            out += [sum(col[c:c + m]) for c in range(0, len(col), m)]
    elif mask.dim() == 4:
        for o in range(mask.shape[0]):
            for i in range(mask.shape[2]):
                for j in range(mask.shape[3]):
                    chans = [t[o][c][i][j] for c in range(mask.shape[1])]
                    out += [sum(chans[c:c + m]) for c in range(0, len(chans), m)]
    else:
        raise AssertionError(f"no plain grouping for shape {tuple(mask.shape)}")
    return out


def assert_pattern(masks, model, n: int, m: int, dim: int = 1) -> None:
    """Every group of every prunable tensor keeps exactly n; pruned weights are exactly 0."""
    assert masks.names()
    for p in masks.params:
        k = masks[p.name]
        counts = group_counts(k, m, dim)
        assert counts and all(c == n for c in counts), (p.name, sorted(set(counts)))
        assert bool((p.tensor.detach()[~k] == 0).all()), p.name
    assert masks.sparsity() == pytest.approx(1 - n / m, abs=1e-12)


def test_the_registry_split_is_what_the_issue_asks():
    for code in ("magnitude", "random", "snip", "fts", "woodfisherblock", "kfac", "synflow", "sparsegpt", "wanda"):
        assert code in FOLLOWS, code
    for code in ("filter_l1", "bn_scale", "pfp", "sipp", "obc"):
        assert code in REFUSES, code


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("code", FOLLOWS)
def test_every_method_keeps_exactly_n_in_every_group(code, net, nm):
    make, shape = NETS[net]
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration-size warnings of the layer-wise methods
        masks = pk.prune(model, code, data=data(shape), pattern=f"{nm[0]}:{nm[1]}", **options(code))
    assert_pattern(masks, model, *nm)
    assert check_pattern(masks, f"{nm[0]}:{nm[1]}")


@pytest.mark.parametrize("code", FOLLOWS)
def test_two_steps_are_nested_and_each_a_valid_pattern(code):
    """3:4 (sparsity 0.25, the intermediate level), then on to 2:4 with masks=: both valid, nested."""
    model = conv()
    d = data((8, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pk.prune(model, code, sparsity=0.25, data=d, pattern="2:4", **options(code))
        assert_pattern(first, model, 3, 4)
        before = {n: t.clone() for n, t in first.items()}
        second = pk.prune(model, code, data=d, masks=first, pattern="2:4", **options(code))
    assert_pattern(second, model, 2, 4)
    for name, k in second.items():
        assert not bool((k & ~before[name]).any()), name


@pytest.mark.parametrize("code", REFUSES)
def test_methods_with_their_own_rule_refuse_a_pattern(code):
    model = conv()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(pk.PrunekitError, match=r"structured|own rule"):
        pk.prune(model, code, data=data((8, 6, 6)), pattern="2:4", **options(code))
    assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())  # refused before touching the model


def test_magnitude_keeps_the_n_largest_of_each_group_ties_to_the_lower_index():
    model = mlp()
    with torch.no_grad():  # ties: every weight of the last layer has the same magnitude
        model[4].weight.copy_(torch.sign(torch.randn(4, 8)) * 0.5)
    ref = {}
    for name, p in model.named_parameters():
        if not name.endswith("weight"):
            continue
        keep = torch.zeros(p.shape, dtype=torch.bool)
        for o in range(p.shape[0]):
            for c0 in range(0, p.shape[1], 4):
                vals = [(-abs(float(p.detach()[o, c])), c) for c in range(c0, c0 + 4)]
                for _, c in sorted(vals)[:2]:
                    keep[o, c] = True
        ref[name] = keep
    masks = pk.prune(model, "magnitude", pattern="2:4")
    for name, k in masks.items():
        assert torch.equal(k, ref[name]), name
    assert bool(masks["4.weight"].reshape(4, 2, 4)[:, :, :2].all())  # the tie went to the first two of each group


def test_conv_groups_run_along_input_channels_not_kernel_positions():
    """A 2:4 mask of a conv keeps 2 of every 4 input channels at each kernel position; on a weight whose magnitude
    grows along the kernel positions only, grouping the flattened (channel, kh, kw) axis would keep other entries."""
    model = nn.Sequential(nn.Conv2d(4, 2, 2))
    with torch.no_grad():
        c = torch.arange(4.0)[None, :, None, None]
        t = torch.arange(4.0).reshape(1, 1, 2, 2)
        model[0].weight.copy_(1 + c * 10 + t)  # channel 3 largest at every kernel position
    masks = pk.prune(model, "magnitude", pattern="2:4")
    k = masks["0.weight"]
    assert bool(k[:, 2:].all()) and not bool(k[:, :2].any())  # channels 2, 3 at every (out, kh, kw)
    assert group_counts(k, 4) == [2] * (2 * 4)


def test_grouped_and_1d_3d_convs_group_along_their_input_channels():
    model = nn.Sequential(nn.Conv1d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv3d(8, 4, 1))
    masks = pk.prune(model, "random", pattern="2:4")
    k1 = masks["0.weight"]  # (8, 4, 3): 4 channels per group
    assert [int(k1[o, :, j].sum()) for o in range(8) for j in range(3)] == [2] * 24
    k3 = masks["2.weight"]  # (4, 8, 1, 1, 1)
    assert [int(k3[o, c:c + 4].sum()) for o in range(4) for c in (0, 4)] == [2] * 8


def test_rounds_pass_through_intermediate_patterns():
    """rounds=2 for 2:4: the second round starts from a 3:4 mask (recorded by a throw-away method); rounds=3 for
    4:8 (exponential densities 0.79, 0.63, 0.5): 6:8, 5:8, 4:8."""
    seen = []

    with scoped():
        @register("_record_masks", family="test", needs_data="none", summary="magnitude, recording the masks")
        def _record(ctx):
            seen.append({n: m.clone() for n, m in ctx.masks.items()})
            return {p.name: p.tensor.detach().abs() for p in ctx.params}

        model = mlp()
        masks = pk.prune(model, "_record_masks", pattern="2:4", rounds=2)
        assert_pattern(masks, model, 2, 4)
        assert [set(group_counts(k, 4)) for k in seen[1].values()] == [{3}] * 3
        seen.clear()
        model = mlp()
        masks = pk.prune(model, "_record_masks", pattern="4:8", rounds=3)
        assert_pattern(masks, model, 4, 8)
        assert [set(group_counts(k, 8)) for k in seen[1].values()] == [{6}] * 3
        assert [set(group_counts(k, 8)) for k in seen[2].values()] == [{5}] * 3
    for a, b in zip(seen, seen[1:]):
        for name in a:
            assert not bool((b[name] & ~a[name]).any())


class _Trainer:
    """What PruningCallback needs of a trainer: the model, its masks, set_masks and log_prune_event."""

    def __init__(self, model):
        self.model, self.masks, self.history = model, None, []

    def set_masks(self, masks, final=True):
        self.masks = masks
        self.history.append(({n: t.clone() for n, t in masks.items()}, final))

    def log_prune_event(self, masks, epoch):
        pass


@pytest.mark.parametrize("code", ["magnitude", "snip", "woodfisherblock", "wanda"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
def test_a_gradual_schedule_steps_through_nested_valid_patterns(code, nm):
    """Cubic schedule to 1 − N/M over epochs 1..3 with one recompute sub-step: each step is moved to its level n:M,
    n non-increasing down to N on the last step; every mask is a valid n:M pattern nested in the one before."""
    n, m = nm
    model = conv()
    d = data((8, 6, 6))
    when = Gradual(target_sparsity=1 - n / m, start=0, end=3, freq=1, recompute_num=1)
    cb = PruningCallback(when, code, data=lambda step: d, pattern=f"{n}:{m}", **options(code))
    trainer = _Trainer(model)
    for epoch in range(4):
        cb.on_epoch_begin(trainer, epoch)
    levels = []
    for masks, _ in trainer.history:
        counts = {c for k in masks.values() for c in group_counts(k, m)}
        assert len(counts) == 1, counts  # one level n in every group of every tensor
        levels.append(counts.pop())
    assert levels[-1] == n and trainer.history[-1][1] is True
    assert levels == sorted(levels, reverse=True) and n < levels[0] < m  # an intermediate level first
    for (a, _), (b, _) in zip(trainer.history, trainer.history[1:]):
        for name in a:
            assert not bool((b[name] & ~a[name]).any())
    assert_pattern(trainer.masks, model, n, m)


def test_a_schedule_that_does_not_end_at_the_pattern_is_refused():
    with pytest.raises(pk.PrunekitError, match=r"pattern 2:4 prunes 0.5 .* ends at sparsity 0.9: set the target"):
        PruningCallback(OneShot(0.9), "magnitude", pattern="2:4")
    with pytest.raises(pk.PrunekitError, match=r"ends at sparsity 0.6"):
        PruningCallback(Gradual(target_sparsity=0.6, start=0, end=2), "magnitude", pattern="2:4")


@pytest.mark.parametrize("code", ["woodfisherblock", "woodfisher", "kfac"])
def test_the_obs_update_respects_the_pattern(code):
    """The OBS codes move the kept weights (their update reads masks_before / masks_after): after 2:4 the pruned
    weights are exactly 0, the pattern holds, and kept weights did move."""
    model = mlp()
    w0 = {p: t.detach().clone() for p, t in model.named_parameters()}
    masks = pk.prune(model, code, data=data((16,)), pattern="2:4", **options(code))
    assert_pattern(masks, model, 2, 4)
    moved = sum(int((t.detach()[masks[n]] != w0[n][masks[n]]).sum()) for n, t in model.named_parameters()
                if n in masks)
    assert moved > 0


def test_gpt2_conv1d_groups_run_along_dim_0():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from tests.core.test_hf_models import gpt2_batches, tiny_gpt2

    model = tiny_gpt2()
    masks = pk.prune(model, "magnitude", pattern="2:4")
    for p in masks.params:
        assert type(p.module).__name__ == "Conv1D"
        w = p.tensor.detach()
        k = masks[p.name]
        assert group_counts(k, 4, dim=0) == [2] * (w.shape[0] // 4 * w.shape[1])
        # the 2 largest |w| of every 4 consecutive inputs (rows of the (in, out) weight), plainly
        top = torch.zeros_like(k)
        for j in range(w.shape[1]):
            for c0 in range(0, w.shape[0], 4):
                order = sorted(range(c0, c0 + 4), key=lambda i: (-abs(float(w[i, j])), i))
                top[order[:2], j] = True
        assert torch.equal(k, top), p.name
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = pk.prune(model, "wanda", data=gpt2_batches(), pattern="4:8")
    for p in wm.params:
        assert set(group_counts(wm[p.name], 8, dim=0)) == {4}, p.name
    # the dict form of check_pattern takes the layouts from model=
    assert check_pattern(wm.as_dict(), "4:8", model=model)
    with pytest.raises(pk.PrunekitError, match="breaks pattern 4:8"):
        check_pattern(wm.as_dict(), "4:8")  # read as (out, in): the wrong dimension


def test_the_sparsity_is_implied_and_a_conflicting_one_is_refused():
    masks = pk.prune(mlp(), "magnitude", pattern="4:8")
    assert masks.report["sparsity"] == 0.5 and masks.report["pattern"] == "4:8"
    assert pk.prune(mlp(), "magnitude", sparsity=0.5).report["pattern"] is None
    assert pk.prune(mlp(), "magnitude", sparsity=0.5, pattern="4:8").report["sparsity"] == 0.5
    assert pk.prune(mlp(), "magnitude", density=0.75, pattern="2:4").sparsity() == 0.25  # level 3:4
    with pytest.raises(pk.PrunekitError, match=r"pattern 2:4 prunes 0.5 of the weights: ask for sparsity=0.5"):
        pk.prune(mlp(), "magnitude", sparsity=0.9, pattern="2:4")
    with pytest.raises(pk.PrunekitError, match=r"ask for sparsity=0.5"):
        pk.prune(mlp(), "magnitude", sparsity=0.6, pattern="2:4")


def test_refusals_name_the_layer_and_the_fix():
    bad_in = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(pk.PrunekitError, match=r"'0.weight' has 3 input channels, not a multiple of 4.*ignore=\['0'\]"):
        pk.prune(bad_in, "magnitude", pattern="2:4")
    assert_pattern(pk.prune(bad_in, "magnitude", pattern="2:4", ignore=["0"]), bad_in, 2, 4)
    with pytest.raises(pk.PrunekitError, match=r"'0.bias' is not a layer weight.*include_bias"):
        pk.prune(mlp(), "magnitude", pattern="2:4", include_bias=True)
    with pytest.raises(pk.PrunekitError, match=r"transposed convolution"):
        pk.prune(nn.Sequential(nn.ConvTranspose2d(4, 4, 2)), "magnitude", pattern="2:4", targets=["0"])
    with pytest.raises(pk.PrunekitError, match=r"BatchNorm1d.*ignore="):
        pk.prune(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), "magnitude", pattern="2:4", modules=["0", "1"])
    with pytest.raises(pk.PrunekitError, match=r"min_keep_per_layer does not apply"):
        pk.prune(mlp(), "magnitude", pattern="2:4", min_keep_per_layer=1)
    with pytest.raises(pk.PrunekitError, match=r"IMP code"):
        split_options(pk.get_method("lth"), {"pattern": "2:4"})
    with pytest.raises(pk.PrunekitError, match=r"compare: global"):
        pk.prune(mlp(), "wanda", data=data((16,)), pattern="2:4", compare="global")
    for bad, msg in ((124, "base-60"), ("2:2", "0 < N < M"), ("4", "look like 'N:M'"), ("a:b", "look like")):
        with pytest.raises(pk.PrunekitError, match=msg):
            pk.prune(mlp(), "magnitude", pattern=bad)
    assert parse_pattern(" 4:8 ") == Pattern(4, 8) and parse_pattern(None) is None


def test_selection_keeps_alive_entries_first_and_fewer_when_fewer_are_alive():
    scores = torch.tensor([[0.0, -torch.inf, 5.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    alive = torch.tensor([[False, True, True, False], [True, False, False, False]])
    keep = keep_top_n(scores, alive, 2)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    # NaN scores: an error naming the tensor, or ranked lowest
    model = nn.Sequential(nn.Linear(4, 1))
    params = prunable_params(model)
    s = {"0.weight": torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])}
    with pytest.raises(pk.PrunekitError, match="NaN"):
        select_nm(s, None, params, 2, Pattern(2, 4))
    got = select_nm(s, None, params, 3, Pattern(2, 4), nan_policy="lowest")["0.weight"]
    assert got.tolist() == [[False, True, True, True]]


def test_check_pattern_on_masks_models_and_dicts():
    model = conv()
    masks = pk.prune(model, "magnitude", pattern="2:4")
    assert check_pattern(masks, "2:4") == {"0.weight": 16 * 9 * 2, "3.weight": 8 * 9 * 4, "6.weight": 4 * 18}
    assert check_pattern(model, "2:4") == check_pattern(masks, Pattern(2, 4))
    assert check_pattern(masks.as_dict(), "2:4")
    assert check_pattern(masks, "2:4", exact=False)
    with pytest.raises(pk.PrunekitError, match="breaks pattern 1:4"):
        check_pattern(masks, "1:4")
    assert check_pattern(pk.prune(conv(), "magnitude", pattern="1:4"), "2:4", exact=False)
    broken = masks.as_dict()
    broken["3.weight"] = broken["3.weight"].clone()
    broken["3.weight"][0, :4, 0, 0] = True
    with pytest.raises(pk.PrunekitError, match=r"'3.weight' breaks pattern 2:4: 1 of its 288 groups"):
        check_pattern(broken, "2:4")


def test_experiment_configs_take_the_pattern_and_keep_the_old_run_ids():
    from prunekit.experiments.config import resolve_run
    from prunekit.experiments.resolved import run_id

    base = {"name": "t", "model": {"name": "lenet_300_100"}, "data": {"name": "mnist"}, "train": {"epochs": 1}}
    plain = resolve_run({**base, "prune": {"method": "wanda", "sparsity": 0.5}})
    nm = resolve_run({**base, "prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}})
    assert nm.prune.options.pattern == "2:4" and nm.prune.prune_kwargs()["pattern"] == "2:4"
    assert plain.prune.options.pattern is None and run_id(plain) != run_id(nm)
    # a run stored before the option existed: no options.pattern, and wanda's own pattern: None
    old = copy.deepcopy(plain.to_dict())
    del old["prune"]["options"]["pattern"]
    old["prune"]["method_options"]["pattern"] = None
    assert run_id(old) == run_id(plain)
    with pytest.raises(pk.PrunekitError, match="structured"):
        resolve_run({**base, "prune": {"method": "filter_l1", "sparsity": 0.5, "pattern": "2:4"}})
    with pytest.raises(pk.PrunekitError, match="base-60"):
        resolve_run({**base, "prune": {"method": "magnitude", "sparsity": 0.5, "pattern": 124}})


def test_an_experiment_runs_a_gradual_two_four_schedule(tmp_path):
    """prune.pattern through the harness: LeNet-300-100 (64, 300, 100 inputs on the synthetic 8×8 images: multiples
    of 4), a cubic schedule over epochs 1..3 (3:4, then 2:4), trained between steps; the saved model keeps 2:4."""
    from prunekit.data import load_dataset
    from prunekit.experiments import run
    from prunekit.models import get_model

    cfg = {"name": "nm", "model": "lenet_300_100", "data": {"name": "synthetic"}, "seed": 0,
           "train": {"epochs": 4, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
           "prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4", "gradual": {"start": 0, "end": 3}}}
    rec = run(cfg, tmp_path, log=lambda m: None)
    assert [(e["epoch"], e["sparsity"], e["pattern"]) for e in rec.prune_events] == [
        (1, 0.25, "2:4"), (2, 0.5, "2:4"), (3, 0.5, "2:4")]
    assert rec.achieved_sparsity == 0.5
    splits = load_dataset("synthetic")
    model = get_model("lenet_300_100", num_classes=splits.num_classes, input_shape=tuple(splits.input_shape))
    masks = pk.load(tmp_path / rec.run_id / "best.pt", model)  # the best model under the final mask
    assert_pattern(masks, model, 2, 4)
