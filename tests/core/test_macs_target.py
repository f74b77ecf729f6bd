"""prune_to_macs: a channel method pruned to a fraction of the dense MACs (or a speedup), checked on the shrunk
model with the plain MAC counter (``prunekit.flops`` on the shrunk copy: every Conv/Linear weight times its output
positions)."""
import warnings

import pytest
import torch

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.flops import layer_positions, macs
from prunekit.flops_target import prune_to_macs
from prunekit.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(name, n=8):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10).eval()
    x = torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(1))
    return model, x, [(x, torch.zeros(n, dtype=torch.long))]


def _shrunk_fraction(model, masks, x, dense):
    small = pk.shrink(model, masks, x[:2])
    return macs(layer_positions(small)) / dense


def _run(name, method, tol=0.01, **target):
    model, x, data = _setup(name)
    dense = macs(layer_positions(model))
    opts = {"sample_size": 4} if method == "pfp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune_to_macs(model, method, data, tol=tol, **target, **opts)
    frac = target.get("macs") or 1.0 / target["speedup"]
    got = _shrunk_fraction(model, masks, x, dense)
    assert abs(got - frac) <= tol * frac, (name, method, got, frac)
    assert masks.report["hit"] and masks.report["macs_fraction"] == pytest.approx(got, rel=1e-9)
    return masks


@pytest.mark.parametrize("method", ["filter_l1", "pfp"])
def test_resnet20_meets_half_the_macs(method):
    _run("resnet20", method, macs=0.5)


def test_speedup_and_rounding_together():
    masks = _run("vgg11_bn", "filter_l2", tol=0.02, speedup=2, round_channels=8)
    assert masks.report["speedup"] == pytest.approx(2.0, rel=0.021)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["filter_l1", "pfp"])
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet56"])
def test_vgg16_and_resnet56_meet_the_macs(name, method):
    _run(name, method, macs=0.5)
    _run(name, method, speedup=3, round_channels=8, tol=0.03)  # blocks of 8 channels of a 32x32 layer: ~2% steps


def test_target_arguments_are_checked():
    model, x, data = _setup("lenet5_caffe")
    with pytest.raises(PrunekitError, match="exactly one target"):
        prune_to_macs(model, "filter_l1", data)
    with pytest.raises(PrunekitError, match="exactly one target"):
        prune_to_macs(model, "filter_l1", data, macs=0.5, speedup=2)
    with pytest.raises(PrunekitError, match=r"\(0, 1\]"):
        prune_to_macs(model, "filter_l1", data, macs=1.5)
    with pytest.raises(PrunekitError, match=">= 1"):
        prune_to_macs(model, "filter_l1", data, speedup=0.5)


def test_unstructured_method_counts_masked_macs():
    """magnitude: the masked MACs (nnz x positions) meet the target; nothing is shrunk."""
    model, x, data = _setup("lenet5_caffe")
    layers = layer_positions(model)
    dense = macs(layers)
    masks = prune_to_macs(model, "magnitude", data, macs=0.4)
    nnz = {n.rpartition(".")[0]: int(m.sum()) for n, m in masks.as_dict().items() if n.endswith("weight")}
    assert abs(macs(layers, nnz) / dense - 0.4) <= 0.01 * 0.4


def test_bisection_finds_a_target_inside_the_reachable_range():
    """A method that refuses sparsities below 0.3 and above 0.9 (cost 1 - s): the bracket moves up past the refused
    low end, down past the refused high end."""
    from prunekit.flops_target import bisect_sparsity

    def at(s):
        if not 0.3 <= s <= 0.9:
            raise PrunekitError(f"sparsity {s} out of reach")
        return {"s": s}

    def cost(m):
        return 1.0 - m["s"]

    for target in (0.6, 0.2, 0.65):
        s, m, c, n = bisect_sparsity(at, cost, target, (0.0, {"s": 0.0}, 1.0), (0.999, None, -float("inf")), 1e-4,
                                     reachable=[0.5])
        assert abs(c - target) <= 1e-4 and m["s"] == s and n < 50
    # a target outside the reachable costs: the closest reachable point
    s, m, c, n = bisect_sparsity(at, cost, 0.05, (0.0, {"s": 0.0}, 1.0), (0.999, None, -float("inf")), 1e-4,
                                 reachable=[0.5])
    assert abs(s - 0.9) < 1e-6 and abs(c - 0.1) < 1e-6


@pytest.mark.parametrize("method", ["filter_l1", "pfp"])
def test_transformer_heads_and_neurons_to_a_macs_target(method):
    """A tiny BERT (8 heads, 64 FFN neurons per layer), MACs counted on one example: the shrunk model's Linear MACs
    on that example are 0.6 of the dense ones (within 1%), with heads and neurons in pairs."""
    transformers = pytest.importorskip("transformers")
    from tests.core.test_hf_models import bert_batches

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    batches = bert_batches()
    example = {k: v[:1] for k, v in batches[0].items() if k != "labels"}
    dense = macs(layer_positions(model, example=example))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = prune_to_macs(model, method, batches, macs=0.6, example=example, round_channels=2)
    small = pk.shrink(model, masks, {k: v for k, v in batches[0].items() if k != "labels"})
    got = macs(layer_positions(small, example=example)) / dense
    assert masks.report["hit"] and abs(got - 0.6) <= 0.01 * 0.6
    heads = [m.num_attention_heads for m in small.modules() if hasattr(m, "num_attention_heads")
             and isinstance(getattr(m, "num_attention_heads"), int) and hasattr(m, "query")]
    assert heads and all(h % 2 == 0 for h in heads)
