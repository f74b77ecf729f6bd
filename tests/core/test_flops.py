"""FLOPs (MACs per example) of masked models against hand counts."""
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.flops import layer_positions, masked_macs, theoretical_speedup
from prunekit.models import get_model


def test_lenet5_positions_and_dense_macs():
    layers = layer_positions(get_model("lenet5_caffe"))
    assert {n: l.positions for n, l in layers.items()} == {"conv1": 24 * 24, "conv2": 8 * 8, "fc1": 1, "fc2": 1}
    dense = 20 * 25 * 576 + 50 * 20 * 25 * 64 + 800 * 500 + 500 * 10
    assert masked_macs(get_model("lenet5_caffe"), pk.Masks(get_model("lenet5_caffe"))) == dense


def test_masked_macs_count_kept_weights_times_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model.input_shape = (3, 8, 8)
    masks = pk.prune(model, "random", sparsity=0.75, scope="layer")
    k_conv, k_fc = int(masks["0.weight"].sum()), int(masks["3.weight"].sum())
    assert masked_macs(model, masks) == k_conv * 16 + k_fc
    assert theoretical_speedup(model, masks) == pytest.approx((8 * 27 * 16 + 128 * 5) / (k_conv * 16 + k_fc))


def test_excluded_layers_count_densely():
    model = get_model("lenet_300_100")
    masks = pk.prune(model, "magnitude", sparsity=0.9, exclude_output=True, scope="layer")
    expect = int(masks["fc1.weight"].sum()) + int(masks["fc2.weight"].sum()) + 100 * 10
    assert masked_macs(model, masks) == expect


def test_missing_input_shape_is_clear():
    with pytest.raises(pk.PrunekitError, match="input shape"):
        layer_positions(nn.Sequential(nn.Linear(3, 3)))


def test_gpt2_conv1d_counts_like_a_linear_on_an_example_input():
    """GPT-2's Conv1D (weight (in, out)) counts MACs = nnz × positions, positions = the example's tokens; the
    model is traced on an example (token ids or a dict batch), not on zeros of an input shape."""
    transformers = pytest.importorskip("transformers")
    from tests.core.test_hf_models import tiny_gpt2

    model = tiny_gpt2()
    ids = torch.randint(0, 100, (1, 7))
    layers = layer_positions(model, example={"input_ids": ids})
    conv = [n for n, m in model.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert conv and all(layers[n].positions == 7 for n in conv)
    assert all(layers[n].weights == model.get_submodule(n).weight.numel() for n in conv)
    assert layer_positions(model, example=ids) == layers  # a tensor example: the same
    masks = pk.Masks(model)
    w = masks.names()[0]
    keep = torch.rand(masks[w].shape, generator=torch.Generator().manual_seed(0)) < 0.3
    masks.set({w: keep})
    dense = sum(l.positions * l.weights for l in layers.values())
    assert masked_macs(model, masks, example=ids) == dense - 7 * int((~keep).sum())
    with pytest.raises(pk.PrunekitError, match="example="):
        layer_positions(model)
