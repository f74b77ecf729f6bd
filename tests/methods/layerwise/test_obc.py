"""``obc``, the exact per-row OBS reference (issue 17 §1): after its greedy removals every row holds the exact
minimiser of the dampened layer-wise quadratic for its mask; per-row counts; on trained layers its reconstruction
error is below sparsegpt's, itself below wanda's."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from test_sparsegpt import correlated_inputs, linear_model, recon_error, train_tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_row_is_the_exact_minimiser_for_its_mask():
    X = correlated_inputs(80, 32, seed=4)
    data = [(X[:40], torch.zeros(40, dtype=torch.long)), (X[40:], torch.zeros(40, dtype=torch.long))]
    m = linear_model()
    W = m.weight.detach().clone()
    masks = pk.prune(m, "obc", sparsity=0.625, data=data)
    H = 2 * X.T @ X / 80
    H = H + 0.01 * H.diagonal().mean() * torch.eye(32, dtype=H.dtype)
    keep = masks["weight"]
    assert int(keep.sum()) == pk.keep_count(W.numel(), 0.625)
    assert bool((keep.sum(1) == 12).all())  # 0.375·32 in every row
    for i in range(W.shape[0]):  # min (w − ŵ)ᵀH(w − ŵ) with ŵ = 0 off the mask: ŵ_M = w_M + H_MM⁻¹ H_MP w_P
        M, P = keep[i], ~keep[i]
        want = torch.zeros(32, dtype=W.dtype)
        want[M] = W[i, M] + torch.linalg.solve(H[M][:, M], H[M][:, P] @ W[i, P])
        assert torch.allclose(m.weight.detach()[i], want, atol=1e-8), i


def test_nested_masks_stay_pruned_and_counts_are_exact():
    X = correlated_inputs(64, 32, seed=6)
    data = [(X, torch.zeros(64, dtype=torch.long))]
    m = linear_model()
    a = pk.prune(m, "obc", sparsity=0.5, data=data)
    first = a["weight"].clone()
    b = pk.prune(m, "obc", sparsity=0.8, data=data, masks=a)
    assert int(b["weight"].sum()) == pk.keep_count(256, 0.8)
    assert not bool((b["weight"] & ~first).any())
    assert bool((m.weight.detach()[~b["weight"]] == 0).all())


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_on_trained_layers_obc_is_below_sparsegpt_below_wanda(s):
    model, X, y = train_tiny_mlp()
    data = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    with torch.no_grad():
        inputs = {0: X, 2: torch.relu(model[0](X))}
    errs = {}
    for code in ("obc", "sparsegpt", "wanda"):
        m = copy.deepcopy(model)
        pk.prune(m, code, sparsity=s, data=data, sequential=False)
        errs[code] = [recon_error(model[i].weight.detach(), m[i].weight.detach(), x) for i, x in inputs.items()]
    for layer in range(2):
        assert errs["obc"][layer] < errs["sparsegpt"][layer] < errs["wanda"][layer], (layer, errs)


def test_wide_layers_are_refused():
    with pytest.raises(pk.PrunekitError, match=r"'weight' has 32 input columns, more than max_cols=16"):
        pk.prune(linear_model(), "obc", sparsity=0.5, data=[(correlated_inputs(8, 32), torch.zeros(8).long())],
                 max_cols=16)
