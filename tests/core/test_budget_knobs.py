"""``pk.prune(model, method, macs= | speedup= | latency=, data=...)``: a compute budget as a pk.prune knob, checked
on the shrunk model with counters independent of the bisection (``prunekit.flops`` on the shrunk copy; the latency
table's prediction of the shrunk copy's own layers)."""
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.flops import layer_positions, macs
from prunekit.flops_target import Budget
from prunekit.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNEL_METHODS = ["filter_l1", "filter_l2", "filter_random", "bn_scale", "pfp"]


def _setup(name="resnet20", n=8):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10).eval()
    x = torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(1))
    return model, x, [(x, torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(2)))]


def _opts(method):
    return {"sample_size": 4} if method == "pfp" else {}


def _shrunk_macs(model, masks, x):
    return macs(layer_positions(pk.shrink(model, masks, x[:2])))


@pytest.mark.parametrize("method", CHANNEL_METHODS)
def test_every_channel_method_meets_half_the_macs(method):
    model, x, data = _setup()
    dense = macs(layer_positions(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the channel selection's size_tol notes
        masks = pk.prune(model, method, macs=0.5, data=data, **_opts(method))
    got = _shrunk_macs(model, masks, x) / dense
    assert abs(got - 0.5) <= 0.01 * 0.5, (method, got)
    r = masks.report
    assert r["hit"] and r["macs_fraction"] == pytest.approx(got, rel=1e-9) and r["speedup"] == pytest.approx(1 / got)
    assert r["method"] == method and r["rounds"] == 1 and r["pattern"] is None and r["collapsed"] == []
    assert r["budget"] == {"cost": "macs", "fraction": 0.5, "batch": 1, "tol": None, "max_sparsity": 0.999}
    assert r["achieved_sparsity"] == pytest.approx(masks.sparsity()) and 0 < r["achieved_sparsity"] < 1
    assert r["seconds"] > 0


def test_speedup_and_budget_tol():
    model, x, data = _setup()
    dense = macs(layer_positions(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "filter_l2", speedup=3, budget_tol=0.02, data=data)
    got = _shrunk_macs(model, masks, x) / dense
    assert abs(got - 1 / 3) <= 0.02 / 3 and masks.report["budget"]["tol"] == 0.02


def test_same_masks_as_prune_to_macs():
    """pk.prune(macs=) is prune_to_macs with pk.prune's report: the same masks, bit for bit."""
    from prunekit.flops_target import prune_to_macs

    a, _, data = _setup()
    b, _, _ = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ma = pk.prune(a, "filter_l1", macs=0.4, data=data)
        mb = prune_to_macs(b, "filter_l1", data, macs=0.4)
    assert all(torch.equal(ma.as_dict()[n], mb.as_dict()[n]) for n in ma.names())


def test_budget_object_as_the_target():
    """The form the harness's schedules pass: sparsity=Budget(...)."""
    model, x, data = _setup()
    dense = macs(layer_positions(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "filter_l1", Budget("macs", 0.6), data=data)
    assert abs(_shrunk_macs(model, masks, x) / dense - 0.6) <= 0.006


def test_unstructured_method_counts_its_kept_weights():
    """magnitude with a MACs budget: the kept weights times their output positions meet it (nothing shrinks)."""
    model, x, data = _setup("lenet5_caffe")
    layers = layer_positions(model)
    masks = pk.prune(model, "magnitude", macs=0.3, data=data)
    nnz = {n.rpartition(".")[0]: int(m.sum()) for n, m in masks.as_dict().items() if n.endswith("weight")}
    assert abs(macs(layers, nnz) / macs(layers) - 0.3) <= 0.01 * 0.3
    assert masks.report["scope"] == "global"


def test_latency_budget_with_a_deterministic_timer(tmp_path, monkeypatch):
    """latency=0.5 at latency_batch=4 with a timer proportional to each layer's MACs (so timings are exact): the
    table's prediction for the shrunk model's own layers is half the dense prediction, within 2%."""
    import prunekit.structured.latency_table as lt
    from tests.core.test_latency_table import fake_timer

    monkeypatch.setenv("PRUNEKIT_LATENCY_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "_wall", fake_timer(1))
    model, x, data = _setup()
    table = lt.LatencyTable()
    dense = lt.predicted_ms(table, lt.timed_layers(model, model.input_shape), {}, batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "filter_l1", latency=0.5, latency_batch=4, data=data)
    small = pk.shrink(model, masks, x[:2])
    got = lt.predicted_ms(lt.LatencyTable(), lt.timed_layers(small, model.input_shape), {}, batch=4) / dense
    assert abs(got - 0.5) <= 0.02 * 0.5 and masks.report["hit"]
    assert masks.report["ms_fraction"] == pytest.approx(got, rel=1e-6)
    assert masks.report["budget"]["cost"] == "latency" and masks.report["budget"]["batch"] == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 0.5, "macs": 0.5}, "exclude each other"),
    ({"density": 0.5, "speedup": 2}, "exclude each other"),
    ({"compression": 1, "latency": 0.5}, "exclude each other"),
    ({"macs": 0.5, "speedup": 2}, "one budget"),
    ({"macs": 0.5, "latency": 0.5}, "one budget"),
    ({"macs": 1.5}, r"\(0, 1\]"),
    ({"macs": 0}, r"\(0, 1\]"),
    ({"speedup": 0.5}, ">= 1"),
    ({"macs": "half"}, "must be a number"),
    ({"latency_batch": 4}, "belongs to a budget"),
    ({"budget_tol": 0.1}, "belongs to a budget"),
    ({"macs": 0.5, "latency_batch": 4}, "applies to a latency budget"),
    ({"latency": 0.5, "latency_batch": 0}, ">= 1"),
    ({"macs": 0.5, "budget_tol": 1.5}, r"\(0, 1\)"),
    ({"macs": 0.5, "rounds": 3}, "one pruning step"),
    ({"macs": 0.5, "pattern": "2:4"}, "fixes the sparsity"),
])
def test_bad_budgets_are_refused_before_pruning(kwargs, match):
    model, x, data = _setup("lenet5_caffe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=match):
        pk.prune(model, "magnitude", data=data, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_method_and_model_checks():
    model, x, data = _setup("lenet5_caffe")
    with pytest.raises(PrunekitError, match="prunes nothing"):
        pk.prune(model, "none", macs=0.5)
    with pytest.raises(PrunekitError, match="structured method"):
        pk.prune(model, "magnitude", latency=0.5)
    with pytest.raises(PrunekitError, match="iterative magnitude pruning"):
        pk.prune(model, "lth", macs=0.5)
    with pytest.raises(PrunekitError, match="budget once"):
        pk.prune(model, "magnitude", Budget("macs", 0.5), macs=0.5)


def test_a_model_without_input_shape_counts_its_first_example():
    """No input_shape: the MACs are counted on the first example of data (here an MLP on flat inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    x = torch.randn(6, 20)
    masks = pk.prune(model, "filter_l1", macs=0.5, data=[(x, torch.zeros(6, dtype=torch.long))],
                     exclude_output=True, budget_tol=0.05)
    dense = macs(layer_positions(model, example=x[:1]))
    small = pk.shrink(model, masks, x[:2])
    assert abs(macs(layer_positions(small, example=x[:1])) / dense - 0.5) <= 0.05 * 0.5
    with pytest.raises(PrunekitError, match="re-iterable"):
        pk.prune(model, "filter_l1", macs=0.5, data=iter([(x, torch.zeros(6, dtype=torch.long))]))


def test_a_second_budget_continues_from_the_first_masks():
    """masks= carries over: 0.7 then 0.4 of the dense MACs, the second masks nested in the first."""
    model, x, data = _setup()
    dense = macs(layer_positions(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pk.prune(model, "filter_l1", macs=0.7, data=data)
        kept = {n: m.clone() for n, m in first.as_dict().items()}
        second = pk.prune(model, "filter_l1", macs=0.4, data=data, masks=first)
    assert all(not (m & ~kept[n]).any() for n, m in second.as_dict().items())
    assert abs(_shrunk_macs(model, second, x) / dense - 0.4) <= 0.01 * 0.4
