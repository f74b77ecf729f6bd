"""The reconstruction errors of a pruned model (issue 17 §4) against the same quantities written out by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.families.layerwise.reconstruction import held_out, reconstruction_errors

F64 = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6)).double()


def batches(n=3, bs=10, seed=1, shape=(12,)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g, dtype=F64), torch.zeros(bs, dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_linear_errors_are_the_hand_written_ratios_on_the_pruned_models_inputs(method):
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    masks = pk.prune(model, method, 0.5, data=batches(seed=1), scope="layer")
    held = batches(seed=2)
    rep = reconstruction_errors(model, dense, masks, held)
    x = torch.cat([b[0] for b in held])
    W1, W2 = dense["0.weight"], dense["2.weight"]
    V1, V2 = model[0].weight.detach(), model[2].weight.detach()
    h = torch.relu(x @ V1.t() + model[0].bias)  # layer 2 reads the PRUNED first layer's output
    e1 = ((x @ (W1 - V1).t()).pow(2).sum() / (x @ W1.t()).pow(2).sum()).item()
    e2 = ((h @ (W2 - V2).t()).pow(2).sum() / (h @ W2.t()).pow(2).sum()).item()
    assert rep["layers"]["0.weight"] == pytest.approx(e1, rel=1e-10)
    assert rep["layers"]["2.weight"] == pytest.approx(e2, rel=1e-10)
    assert rep["mean"] == pytest.approx((e1 + e2) / 2, rel=1e-10)
    ref = copy.deepcopy(model)
    ref.load_state_dict(dense)
    f, fh = ref(x), model(x)
    assert rep["output"] == pytest.approx(((f - fh).pow(2).sum() / f.pow(2).sum()).item(), rel=1e-10)
    assert rep["samples"] == 30
    assert model[0].weight.requires_grad and model.training  # the measurement leaves the model as it was


def test_sparsegpt_lowers_the_held_out_layer_error_below_magnitude_on_a_trained_layer():
    torch.manual_seed(0)
    w = torch.randn(8, 24, dtype=F64)
    mix = torch.randn(24, 24, dtype=F64)  # correlated inputs: what OBS reconstruction exploits
    data = [(torch.randn(64, 24, dtype=F64) @ mix, torch.zeros(64, dtype=torch.long)) for _ in range(6)]
    errs = {}
    for method in ("sparsegpt", "magnitude"):
        model = nn.Sequential(nn.Linear(24, 8, bias=False)).double()
        model[0].weight.data.copy_(w)
        dense = copy.deepcopy(model.state_dict())
        masks = pk.prune(model, method, 0.5, data=data[:4], scope="layer")
        errs[method] = reconstruction_errors(model, dense, masks, data[4:])["layers"]["0.weight"]
    assert 0 < errs["sparsegpt"] < errs["magnitude"]


def test_conv_errors_are_the_bias_free_convolution_of_the_weight_difference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2)).double()
    dense = copy.deepcopy(model.state_dict())
    data = batches(n=2, bs=4, seed=3, shape=(3, 9, 9))
    masks = pk.prune(model, "magnitude", 0.6, scope="layer")
    rep = reconstruction_errors(model, dense, masks, data)
    x = torch.cat([b[0] for b in data])
    c1, c2 = model[0], model[2]
    lost = F.conv2d(x, dense["0.weight"] - c1.weight, stride=2, padding=1).pow(2).sum()
    full = F.conv2d(x, dense["0.weight"], stride=2, padding=1).pow(2).sum()
    assert rep["layers"]["0.weight"] == pytest.approx((lost / full).item(), rel=1e-10)
    h = torch.relu(c1(x))
    lost = F.conv2d(h, dense["2.weight"] - c2.weight, groups=2).pow(2).sum()
    full = F.conv2d(h, dense["2.weight"], groups=2).pow(2).sum()
    assert rep["layers"]["2.weight"] == pytest.approx((lost / full).item(), rel=1e-10)


def test_an_unpruned_model_has_zero_error_and_held_out_cuts_the_last_batch():
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    held = held_out(batches(n=3, bs=10), 25)
    assert [b.shape[0] for b in held] == [10, 10, 5]
    rep = reconstruction_errors(model, dense, pk.Masks(model), held)
    assert rep["layers"] == {"0.weight": 0.0, "2.weight": 0.0} and rep["output"] == 0.0 and rep["samples"] == 25


def test_a_run_records_the_errors_against_the_weights_it_started_from(tmp_path):
    """`prune.reconstruction: N` in the harness: measured right after the one-shot pruning of a fine-tune of the
    dense run, against that dense run's weights, on the first N validation samples; the run id of a config without
    it is unchanged; a gradual schedule is refused."""
    import warnings

    from tiny import fine_tune_of_dense, tiny
    from prunekit.errors import ConfigError
    from prunekit.experiments import run
    from prunekit.experiments.config import resolve_run, run_id

    base = tiny("rec", prune={"method": "sparsegpt", "sparsity": 0.5})
    cfg = fine_tune_of_dense({**base, "prune": {**base["prune"], "reconstruction": 40}}, tmp_path)
    plain = fine_tune_of_dense(base, tmp_path)
    assert run_id(resolve_run(cfg)) != run_id(resolve_run(plain))
    assert "reconstruction" not in resolve_run(plain).to_dict()["prune"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer calibration rows than the first layer's 784 columns
        rec = run(cfg, tmp_path, log=lambda m: None)
    r = rec.reconstruction
    assert r["samples"] == 40 and set(r["layers"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(0.0 < e < 1.0 for e in r["layers"].values()) and 0.0 < r["output"]
    assert rec.prune_events[-1]["reconstruction"] == r

    with pytest.raises(ConfigError, match="reconstruction"):
        resolve_run({**base, "prune": {**base["prune"], "reconstruction": 0}})
    with pytest.raises(ConfigError, match="gradual"):
        resolve_run({**base, "train": {**base["train"], "epochs": 3},
                     "prune": {**base["prune"], "reconstruction": 8, "gradual": {"start": 0, "end": 2, "every": 1}}})
