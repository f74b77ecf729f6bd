"""Real speedups from sparsity (issue 17, section 3): the CSR Linear layer, the measured conversion and the 2:4 path.

CPU: SparseLinear equals ``x @ Wᵀ + b`` written plainly; to_sparse converts exactly the layers its timings say are
faster (timings fixed by a stub table where the decision is the point, real ones where the protocol is), the converted
model equals the masked dense one, timings are cached in memory and on disk, and bad input is refused with the reason.
2:4: the validation and refusal messages on the CPU; the CUDA conversion against the masked dense model when a GPU
is present (skipped otherwise)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.speedup import (SparseLinear, SpeedTable, Timing, TimingKey, check_2to4, semi_structured_problem,
                              to_semi_structured, to_sparse)
from prunekit.speedup import timing as timing_mod

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-5, atol=1e-5)


def random_masks(model: nn.Module, sparsities: dict[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """Exact-count random masks: ``round((1 - s) · n)`` kept entries per named weight."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name, s in sparsities.items():
        n = params[name].numel()
        keep = torch.randperm(n, generator=g)[: round((1 - s) * n)]
        m = torch.zeros(n, dtype=torch.bool)
        m[keep] = True
        out[name] = m.reshape(params[name].shape)
    return out


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: a deep copy whose masked weights are multiplied by their masks (the masked dense model)."""
    import copy

    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m)
    return ref.eval()


class Stub:
    """A measure function for SpeedTable: CSR time = dense time / speedup(key), and a log of what was measured."""

    def __init__(self, speedup):
        self.speedup, self.calls = speedup, []

    def __call__(self, out_f, in_f, band, rows, repeats, warmup):
        self.calls.append((out_f, in_f, band, rows))
        return Timing(1.0, 1.0 / self.speedup(out_f, in_f, band, rows))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 5))


# ------------------------------------------------------------------------------------------------------ SparseLinear
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_the_plain_formula_for_any_leading_dims(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 12, generator=g) * (torch.rand(7, 12, generator=g) > 0.8)
    b = torch.randn(7, generator=g) if bias else None
    layer = SparseLinear.from_dense(w, b)
    assert layer.nnz == int((w != 0).sum()) and layer.weight.layout == torch.sparse_csr
    assert torch.equal(layer.to_dense(), w)
    for shape in [(12,), (5, 12), (2, 3, 12), (2, 1, 4, 12), (0, 12)]:
        x = torch.randn(*shape, generator=g)
        expect = (x.reshape(-1, 12) @ w.t() + (b if bias else 0)).reshape(*shape[:-1], 7)
        with torch.inference_mode():
            y = layer(x)
        assert y.shape == expect.shape and y.is_contiguous()
        torch.testing.assert_close(y, expect, **TOL)


def test_sparse_linear_refuses_what_it_cannot_run():
    layer = SparseLinear.from_dense(torch.eye(4), torch.zeros(4))
    with pytest.raises(pk.PrunekitError, match="float32 inputs"):
        layer(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(pk.PrunekitError, match=r"\[\.\.\., 4\]"):
        layer(torch.ones(2, 5))
    with pytest.raises(pk.PrunekitError, match="inference-only"):
        layer(torch.ones(2, 4, requires_grad=True))
    with pytest.raises(pk.PrunekitError, match="2-D weight"):
        SparseLinear.from_dense(torch.ones(2, 3, 4))
    with pytest.raises(pk.PrunekitError, match="bias has shape"):
        SparseLinear.from_dense(torch.eye(4), torch.zeros(3))


# ----------------------------------------------------------------------------------------------- to_sparse decisions
def test_converts_exactly_the_layers_whose_timing_beats_dense_and_matches_the_masked_model():
    model = mlp()
    masks = random_masks(model, {"0.weight": 0.95, "2.weight": 0.5, "4.weight": 0.9})
    ref = masked_copy(model, masks)
    stub = Stub(lambda o, i, band, rows: 3.0 if band >= 0.9 else 0.5)  # CSR 3x faster at >= 90%, 2x slower below
    report = to_sparse(model, masks, rows=8, table=SpeedTable(measure=stub))
    assert report.converted == ["0", "4"] and report.kept_dense == ["2"]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear) and isinstance(model[4], SparseLinear)
    by = {d.name: d for d in report.layers}
    assert by["0"].sparsity == pytest.approx(0.95, abs=1 / 960) and by["2"].speedup == pytest.approx(0.5)
    assert "below min_speedup" in by["2"].reason and by["0"].shape == (40, 24)
    assert sorted(stub.calls) == sorted([(40, 24, 0.95, 8), (32, 40, 0.5, 8), (5, 32, 0.9, 8)])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(6, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), **TOL)
    assert "2 of 3 layers converted" in report.summary()


def test_min_speedup_and_every_row_count_must_pass():
    stub = Stub(lambda o, i, band, rows: 1.5 if rows <= 32 else 0.9)
    masks = random_masks(mlp(), {"0.weight": 0.9})
    assert to_sparse(m := mlp(), masks, rows=[1, 32], table=SpeedTable(measure=stub)).converted == ["0"]
    assert isinstance(m[0], SparseLinear)
    assert to_sparse(mlp(), masks, rows=[1, 32], min_speedup=2.0, table=SpeedTable(measure=stub)).converted == []
    report = to_sparse(mlp(), masks, rows=[1, 512], table=SpeedTable(measure=stub))
    assert report.converted == [] and "at 512 rows" in report.layers[0].reason


def test_timings_are_measured_once_per_key_and_reused():
    stub = Stub(lambda *k: 2.0)
    table = SpeedTable(measure=stub)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    masks = random_masks(model, {"0.weight": 0.902, "1.weight": 0.906, "2.weight": 0.5})  # 0, 1: one band
    to_sparse(model, masks, rows=4, table=table)
    assert len(stub.calls) == 2 and len(table) == 2
    to_sparse(nn.Sequential(nn.Linear(16, 16)), {"0.weight": masks["0.weight"]}, rows=4, table=table)
    assert len(stub.calls) == 2  # cached
    assert TimingKey(16, 16, 0.9, 4, torch.get_num_threads()) in table
    assert sorted(stub.calls) == [(16, 16, 0.5, 4), (16, 16, 0.9, 4)]


def test_band_edges():
    assert timing_mod.band(0.957) == 0.95 and timing_mod.band(0.95) == 0.95 and timing_mod.band(0.9999) == 0.99
    assert timing_mod.band(1.0) == 1.0 and timing_mod.band(0.0) == 0.0
    with pytest.raises(pk.PrunekitError, match=r"\[0, 1\]"):
        timing_mod.band(1.5)


def test_disk_cache_round_trip_and_foreign_or_broken_files(tmp_path):
    path = tmp_path / "t.json"
    stub = Stub(lambda *k: 2.0)
    table = SpeedTable(path, measure=stub)
    table.lookup(table.key(8, 4, 0.9, 3))
    data = json.loads(path.read_text())
    assert data["machine"] == timing_mod.machine() and len(data["entries"]) == 1
    assert data["entries"][0]["csr_ms"] == 0.5 and data["entries"][0]["band"] == 0.9
    again = SpeedTable(path, measure=Stub(lambda *k: 9.0))
    assert again.lookup(again.key(8, 4, 0.9, 3)) == Timing(1.0, 0.5)  # read, not re-measured
    data["machine"]["torch"] = "0.0.0"
    path.write_text(json.dumps(data))
    assert len(SpeedTable(path)) == 0  # another machine's timings are not trusted
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable timing cache"):
        assert len(SpeedTable(path)) == 0
    with pytest.raises(pk.PrunekitError, match="in memory only"):
        SpeedTable().save()


def test_real_timings_drive_the_decision_consistently():
    """Real measurements (the protocol, not a speed claim): each decision follows its own timings."""
    model = mlp()
    masks = random_masks(model, {"0.weight": 0.98, "2.weight": 0.3})
    ref = masked_copy(model, masks)
    table = SpeedTable(repeats=3, warmup=1)
    report = to_sparse(model, masks, rows=16, table=table)
    for d in report.layers:
        (rows, dense_ms, csr_ms), = d.timings
        assert rows == 16 and dense_ms > 0 and csr_ms > 0
        assert d.converted == (dense_ms / csr_ms >= 1.0)
        assert isinstance(dict(model.named_modules())[d.name], SparseLinear) == d.converted
    x = torch.randn(16, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), **TOL)


def test_without_masks_the_exact_zeros_are_the_pattern():
    model = mlp()
    masks = random_masks(model, {"0.weight": 0.9, "2.weight": 0.9, "4.weight": 0.9})
    ref = masked_copy(model, masks)
    with torch.no_grad():
        for name, m in masks.items():
            dict(model.named_parameters())[name].mul_(m)
    report = to_sparse(model, table=SpeedTable(measure=Stub(lambda *k: 2.0)))
    assert report.converted == ["0", "2", "4"]
    assert [d.sparsity for d in report.layers] == pytest.approx([0.9] * 3, abs=0.003)
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), **TOL)


def test_pk_masks_and_bias_masks_are_honoured():
    model = mlp()
    masks = pk.Masks(model, params=pk.prunable_params(model, include_bias=True))
    masks.set(random_masks(model, {"0.weight": 0.9, "0.bias": 0.5, "2.weight": 0.9}))
    ref = masked_copy(model, masks.as_dict())
    model[0].bias.data += 1.0  # a pruned bias entry moved after masking: the conversion must still use the mask
    ref[0].bias.data += 1.0 * masks["0.bias"]
    report = to_sparse(model, masks, table=SpeedTable(measure=Stub(lambda *k: 2.0)))
    assert report.converted == ["0", "2", "4"]
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), **TOL)


def test_non_linear_layers_are_reported_not_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    report = to_sparse(model, table=SpeedTable(measure=Stub(lambda *k: 2.0)))
    assert report.converted == ["2"] and report.kept_dense == ["0"]
    assert "not a Linear" in report.layers[0].reason
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    masks = random_masks(model, {"0.weight": 0.5, "2.weight": 0.5})
    ref = masked_copy(model, masks)
    to_sparse(model, masks, table=SpeedTable(measure=Stub(lambda *k: 2.0)))
    x = torch.randn(2, 1, 4, 4)
    with torch.inference_mode():  # the Conv2d left dense still computes its masked self
        torch.testing.assert_close(model(x), ref(x), **TOL)


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_speedup=0), "min_speedup"), (dict(min_speedup=float("nan")), "min_speedup"),
    (dict(min_speedup=True), "min_speedup"), (dict(rows=0), "rows"), (dict(rows=[]), "rows"),
    (dict(rows="128"), "rows"), (dict(rows=[4, 2.5]), "rows"), (dict(table={}), "SpeedTable"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(pk.PrunekitError, match=match):
        to_sparse(mlp(), **kwargs)


def test_bad_models_and_masks_are_refused():
    stub_table = SpeedTable(measure=Stub(lambda *k: 2.0))
    with pytest.raises(pk.PrunekitError, match="torch.nn.Module"):
        to_sparse("model")
    with pytest.raises(pk.PrunekitError, match="names no parameter"):
        to_sparse(mlp(), {"9.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(pk.PrunekitError, match=r"shape \(40, 24\)"):
        to_sparse(mlp(), {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(pk.PrunekitError, match="Masks or a"):
        to_sparse(mlp(), [torch.ones(3)])
    with pytest.raises(pk.PrunekitError, match="another model"):
        to_sparse(mlp(), pk.Masks(mlp()))
    with pytest.raises(pk.PrunekitError, match="float32 CPU"):
        to_sparse(mlp().double(), table=stub_table)
    converted = mlp()
    to_sparse(converted, table=stub_table)
    with pytest.raises(pk.PrunekitError, match="nothing prunable|already"):
        to_sparse(converted, table=stub_table)
    with pytest.raises(pk.PrunekitError, match="wrap it"):
        to_sparse(nn.Linear(4, 4), table=stub_table)


# ------------------------------------------------------------------------------------------------------ transformers
def test_bert_and_gpt2_conv1d_convert_and_match_the_masked_model():
    pytest.importorskip("transformers")
    from tests.core.test_hf_models import bert_batches, gpt2_batches, tiny_bert, tiny_gpt2

    for build, batch in ((tiny_bert, bert_batches()[0]), (tiny_gpt2, gpt2_batches()[0])):
        model = build()
        masks = pk.prune(model, "magnitude", sparsity=0.8)
        ref = masked_copy(model, masks.as_dict())
        report = to_sparse(model, masks, table=SpeedTable(measure=Stub(lambda *k: 2.0)))
        assert report.converted == [n.rpartition(".")[0] for n in masks.names()]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.inference_mode():
            torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, **TOL)
        if build is tiny_gpt2:
            assert {d.kind for d in report.layers} == {"Conv1D"} and report.layers[0].shape == (96, 32)


# ------------------------------------------------------------------------------------------------------ 2:4 (CPU part)
def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of each group of 4 consecutive entries along the input dim (written as a loop)."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], 4):
            top = w[r, c:c + 4].abs().argsort(descending=True)[:2]
            mask[r, c + top] = True
    return mask


def test_check_2to4_accepts_2to4_and_names_the_first_bad_group():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    m = two_four_mask(w)
    assert check_2to4(w * m) is None and check_2to4(torch.zeros(8, 16)) is None
    bad = w * m
    bad[3, 5:8] = 1.0  # the group of columns 4-7 in row 3 now holds 3 or 4 nonzeros
    why = check_2to4(bad)
    assert "row 3, columns 4-7" in why and "1 of 32 groups" in why
    assert "multiple of 4" in check_2to4(torch.zeros(8, 6))
    assert "2-D" in check_2to4(torch.zeros(2, 2, 4))


def test_semi_structured_refusals_name_the_reason():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    w24 = w * two_four_mask(w)
    assert "float16 or bfloat16" in semi_structured_problem(w24)
    assert "not 2:4 sparse" in semi_structured_problem(w.half())
    assert "multiple of" in semi_structured_problem(torch.zeros(40, 72, dtype=torch.float16))
    assert "run on CUDA" in semi_structured_problem(w24.half())  # a CPU tensor, with or without a GPU around
    model = nn.Sequential(nn.Linear(64, 64)).half()
    with pytest.raises(pk.PrunekitError, match=r"'0' \(64x64\).*not 2:4"):
        to_semi_structured(model, {"0.weight": torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(pk.PrunekitError, match="Conv2d"):
        to_semi_structured(nn.Sequential(nn.Conv2d(1, 4, 3)))


# ------------------------------------------------------------------------------------------------------ 2:4 on CUDA
def _cuda_2to4_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _cuda_2to4_ok(), reason="2:4 kernels need a CUDA GPU of compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_the_masked_dense_model_on_cuda(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).to("cuda", dtype)
    masks = {n: two_four_mask(p.detach().float().cpu()).cuda() for n, p in model.named_parameters()
             if n.endswith("weight")}
    ref = masked_copy(model, masks)
    done = to_semi_structured(model, masks)
    assert done == ["0", "2"]
    assert all(type(m.weight).__name__.startswith("SparseSemiStructured") for m in (model[0], model[2]))
    x = torch.randn(3, 64, 128, device="cuda", dtype=dtype)
    with torch.inference_mode():
        y, expect = model(x), ref(x)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.float(), expect.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(not _cuda_2to4_ok(), reason="2:4 kernels need a CUDA GPU of compute capability >= 8.0")
def test_semi_structured_bert_matches_the_masked_dense_model_on_cuda():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=64)
    model = transformers.BertModel(cfg).to("cuda", torch.float16).eval()
    names = [p.name for p in pk.prunable_params(model)]
    params = dict(model.named_parameters())
    masks = {n: two_four_mask(params[n].detach().float().cpu()).cuda() for n in names}
    ref = masked_copy(model, masks)
    to_semi_structured(model, masks)
    ids = torch.randint(0, 100, (4, 32), device="cuda")
    with torch.inference_mode():
        y, expect = model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
    torch.testing.assert_close(y.float(), expect.float(), rtol=3e-2, atol=3e-2)


def test_semi_structured_wiring_with_a_stand_in_tensor_class(monkeypatch):
    """The conversion's bookkeeping without a GPU: torch's semi-structured class replaced by one whose from_dense
    keeps the (masked) dense tensor, so the converted model must compute exactly the masked model."""
    from prunekit.speedup import semi

    class StandIn:
        made = []

        @classmethod
        def from_dense(cls, w):
            cls.made.append(tuple(w.shape))
            return w.clone()

    monkeypatch.setattr(semi, "semi_structured_problem", lambda w, which=None: None)
    monkeypatch.setattr(semi, "_tensor_class", lambda which: StandIn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = {"0.weight": two_four_mask(model[0].weight.detach()), "2.weight": two_four_mask(model[2].weight.detach())}
    ref = masked_copy(model, masks)
    assert to_semi_structured(model, masks) == ["0", "2"] and StandIn.made == [(32, 16), (8, 32)]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(8, 4, 16).transpose(0, 1)  # non-contiguous input
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), **TOL)
