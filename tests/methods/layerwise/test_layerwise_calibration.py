"""The calibration of the layer-wise methods: layers as matrices and their inputs as matrices (the layer's output
is W·Xᵀ + b for every convolution group), the forward order, the groups of the sequential pass (one per transformer
block of a Hugging Face model) with early-stopped passes, and dict batches end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.families.layerwise.calibration import Calibration, as_layer
from prunekit.params import prunable_params
from prunekit.prune import PruningStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2), (2, 4, 9, 9)),
    (lambda: nn.Conv2d(4, 6, (3, 2), padding="same", padding_mode="reflect", groups=2), (2, 4, 7, 8)),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),
    (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=2, padding_mode="circular"), (2, 3, 11)),
    (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (1, 2, 4, 5, 3)),
])
def test_conv_inputs_unfold_so_the_matrix_product_is_the_convolution(conv, shape):
    torch.manual_seed(0)
    m = nn.Sequential(conv()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    L = as_layer(prunable_params(m)[0])
    X = L.inputs(x, torch.float64)  # [tokens, G, cols]
    W = L.matrices(torch.float64)  # [G, rows, cols]
    y = m(x) - m[0].bias.reshape(1, -1, *[1] * (x.dim() - 2))
    y = y.movedim(1, -1).reshape(-1, L.groups, L.rows)  # [tokens, G, rows]
    got = torch.einsum("tgc,grc->tgr", X, W)
    assert torch.allclose(got, y, atol=1e-10)


def test_gpt2_conv1d_is_a_transposed_linear():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    c = Conv1D(6, 4).double()  # nf=6 outputs, nx=4 inputs
    L = as_layer(prunable_params(nn.Sequential(c), modules=("0",))[0])
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    got = L.inputs(x, torch.float64)[:, 0] @ L.matrices(torch.float64)[0].T + c.bias
    assert torch.allclose(got, c(x).reshape(-1, 6))
    W = L.matrices(torch.float64)
    L.write(W * 2)
    assert torch.allclose(L.matrices(torch.float64), 2 * W)
    del transformers


def test_forward_order_and_early_stop():
    class Twisted(nn.Module):  # registration order differs from the forward order
        def __init__(self):
            super().__init__()
            self.late, self.early, self.mid = nn.Linear(6, 2), nn.Linear(4, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.late(torch.relu(self.mid(torch.relu(self.early(x)))))

    torch.manual_seed(0)
    m = Twisted()
    layers = [as_layer(p) for p in prunable_params(m)]
    data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)) for _ in range(3)]
    cal = Calibration(m, layers, data)
    cal.capture(range(3), lambda i, x: None, record=True)
    assert [layers[i].name for i in cal.order] == ["early.weight", "mid.weight", "late.weight"]
    assert cal.groups() == [[i] for i in cal.order]
    ran = []
    m.late.register_forward_hook(lambda *a: ran.append(1))
    seen = []
    cal.capture([cal.order[1]], lambda i, x: seen.append(x.shape))
    assert seen == [(5, 6)] * 3 and not ran  # each forward stopped before "late"


def test_tiny_bert_dict_batches_groups_per_block_and_exact_counts():
    pytest.importorskip("transformers")
    from tests.core.test_hf_models import bert_batches, tiny_bert

    for code, kw in (("sparsegpt", {}), ("wanda", {"sequential": True})):
        m = tiny_bert()
        step = PruningStep(m, code, bert_batches(), None, None, {"scope": None, **kw})
        method = step.method
        step.check_data()
        ctx, scores = step.score(1)
        new = step.choose(ctx, scores, 0.5)
        step.apply(ctx, new)
        groups = method.calib.groups()
        assert len(groups) == 2 and all(len(g) == 6 for g in groups)
        assert [method.layers[g[0]].name for g in groups] == [
            "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.query.weight"]
        for p in step.masks.params:
            assert int(step.masks[p.name].sum()) == pk.keep_count(p.tensor.numel(), 0.5), (code, p.name)
            assert bool((p.tensor.detach()[~step.masks[p.name]] == 0).all())
        with torch.no_grad():
            b = bert_batches()[0]
            assert bool(torch.isfinite(m(**b).logits).all())


def test_tiny_gpt2_prunes_conv1d_weights():
    pytest.importorskip("transformers")
    from tests.core.test_hf_models import gpt2_batches, tiny_gpt2

    m = tiny_gpt2()
    masks = pk.prune(m, "sparsegpt", sparsity=0.6, data=gpt2_batches())
    for p in masks.params:
        assert int(masks[p.name].sum()) == pk.keep_count(p.tensor.numel(), 0.6), p.name
        assert bool((p.tensor.detach()[~masks[p.name]] == 0).all())


@pytest.mark.slow  # one training epoch: about 2 s
def test_an_experiment_prunes_with_its_default_calibration_budget(tmp_path):
    """`prunekit run` with method sparsegpt: prune.samples defaults to 128 random examples; exact counts per layer."""
    import warnings

    from tiny import tiny
    from prunekit.experiments import Store, run

    assert pk.get_method("sparsegpt").default_samples == {"random": 128}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 128 calibration rows < 784 input columns of the first layer: a warning
        rec = run(tiny("lw", prune={"method": "sparsegpt", "sparsity": 0.8}), tmp_path, log=lambda m: None)
    assert rec.method == "sparsegpt"
    with Store(tmp_path / "results.sqlite") as s:
        for layer in s.layers(rec.run_id):
            assert layer["kept"] == pk.keep_count(layer["total"], 0.8), layer


@pytest.mark.parametrize("which", ["bert", "gpt2"])
@pytest.mark.parametrize("code", ["sparsegpt", "wanda"])
def test_cached_block_inputs_give_the_same_result_with_fewer_forwards(which, code, monkeypatch):
    """Sequential on a Hugging Face model: running each block alone on its cached inputs (the previous block's
    outputs) gives exactly the weights and masks of re-running the model up to each block; the model itself (its
    embeddings) then runs a fixed number of times whatever the depth; the model's use_cache flag is restored."""
    pytest.importorskip("transformers")
    from tests.core import test_hf_models as hf
    from prunekit.families.layerwise.calibration import Calibration

    make, batches = (hf.tiny_bert, hf.bert_batches) if which == "bert" else (hf.tiny_gpt2, hf.gpt2_batches)
    runs = {}
    for cache in (True, False):
        monkeypatch.setattr(Calibration, "block_cache", cache)
        m = make()
        emb = m.get_input_embeddings()
        calls = []
        emb.register_forward_hook(lambda *a: calls.append(1))
        step = PruningStep(m, code, batches(), None, None, {"scope": None, "sequential": True})
        step.check_data()
        ctx, scores = step.score(1)
        step.apply(ctx, step.choose(ctx, scores, 0.5))
        assert step.method.report["block_cache"] is cache
        runs[cache] = ({n: p.detach().clone() for n, p in m.named_parameters()}, step.masks.as_dict(), len(calls))
        assert m.config.use_cache is True
    n = len(batches())
    passes = 2 if code == "sparsegpt" else 1  # wanda's first block reuses the score pass's norms
    score = n if code == "wanda" else 1  # sparsegpt's score pass only records the order (one batch)
    assert runs[False][2] == 1 + score + n * passes  # check_data's forward, the score pass, one pass per block
    assert runs[True][2] == 1 + score + 1 + n  # check_data, score pass, the check on one batch, block 0's inputs
    for name, t in runs[True][0].items():
        assert torch.equal(t, runs[False][0][name]), name
    for name, k in runs[True][1].items():
        assert torch.equal(k, runs[False][1][name]), name
