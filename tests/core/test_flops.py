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
