"""Structured pruning of Hugging Face transformers (issue 16 §1): attention heads and FFN neurons as channel groups
(BERT family and GPT-2 with its fused Conv1D c_attn), physical removal by pk.shrink with outputs equal to the masked
model (padded batches), the filter baselines and PFP / SiPP on dict batches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.families.sensitivity.scores import sensitivities  # noqa: E402
from prunekit.params import prunable_params  # noqa: E402
from prunekit.structured import (channel_groups, channel_masks_from_masks, channel_masks_to_masks,  # noqa: E402
                                 check_channel_masks, filter_norm_scores, masked_copy, shrink)
from tests.core.test_hf_models import bert_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "_modeling_imported")


@pytest.fixture(scope="module")
def _modeling_imported():
    """transformers imports its BERT / GPT-2 modeling code on first use (seconds): once, in setup."""
    bert(), gpt2()

HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS, VOCAB = 4, 8, 32, 48, 2, 100


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero biases and LayerNorm parameters, so a bias entry or a column left behind shows up."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") or "LayerNorm" in name or ".ln_" in name:
            p.copy_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=gen) + (1.0 if name.endswith("weight")
                                                                                 else 0.0))
    return model


def bert(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=32,
                                  num_labels=3)
    return _randomize(transformers.BertForSequenceClassification(cfg), seed).to(dtype).eval()


def gpt2(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return _randomize(transformers.GPT2LMHeadModel(cfg), seed).to(dtype).eval()


def padded_batch(size=3, length=7, seed=3):
    """input_ids and an attention mask with padding in two of the examples (right and left padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, length - 3:] = 0
    mask[1, :2] = 0
    return {"input_ids": torch.randint(0, VOCAB, (size, length), generator=g), "attention_mask": mask}


def gpt2_batches(n_batches=2, size=3, length=7):
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


BERT_L = "bert.encoder.layer"
GPT_L = "transformer.h"


# ----------------------------------------------------------------------------------------------------- groups
def test_bert_groups_are_heads_and_ffn_neurons_in_forward_order():
    groups = channel_groups(bert(), None)
    expect = []
    for i in range(LAYERS):
        a = f"{BERT_L}.{i}.attention"
        expect.append((f"{a}.self", HEADS, [f"{a}.self.query", f"{a}.self.key", f"{a}.self.value"],
                       [(f"{a}.output.dense", HEAD_DIM)], HEAD_DIM, 1, "head", f"{a}.self"))
        expect.append((f"{BERT_L}.{i}.intermediate.dense", FFN, [f"{BERT_L}.{i}.intermediate.dense"],
                       [(f"{BERT_L}.{i}.output.dense", 1)], 1, 1, "neuron", None))
    got = [(g.name, g.size, g.producers, g.consumers, g.rows, g.splits, g.kind, g.attention) for g in groups]
    assert got == expect
    assert all(g.prunable and g.norms == [] for g in groups)


def test_gpt2_groups_have_the_fused_qkv_as_three_splits():
    groups = channel_groups(gpt2(), None)
    expect = []
    for i in range(LAYERS):
        expect.append((f"{GPT_L}.{i}.attn", HEADS, [f"{GPT_L}.{i}.attn.c_attn"], [(f"{GPT_L}.{i}.attn.c_proj",
                                                                                     HEAD_DIM)], HEAD_DIM, 3, "head"))
        expect.append((f"{GPT_L}.{i}.mlp.c_fc", FFN, [f"{GPT_L}.{i}.mlp.c_fc"], [(f"{GPT_L}.{i}.mlp.c_proj", 1)], 1,
                       1, "neuron"))
    assert [(g.name, g.size, g.producers, g.consumers, g.rows, g.splits, g.kind) for g in groups] == expect


def test_head_masks_zero_whole_heads_bert():
    model = bert()
    groups = channel_groups(model, None)
    a = f"{BERT_L}.0.attention"
    keep = torch.tensor([True, False, True, False])  # heads 1 and 3 go
    masks = channel_masks_to_masks(model, groups, {f"{a}.self": keep})
    assert set(masks) == {f"{a}.self.{x}.weight" for x in ("query", "key", "value")} | {f"{a}.output.dense.weight"}
    gone = [r for h in (1, 3) for r in range(h * HEAD_DIM, (h + 1) * HEAD_DIM)]
    for x in ("query", "key", "value"):
        m = masks[f"{a}.self.{x}.weight"]  # (out, in): head h = rows h*d .. h*d+d-1
        assert m.shape == (HEADS * HEAD_DIM, HIDDEN)
        assert [r for r in range(m.shape[0]) if not bool(m[r].any())] == gone and bool(m.sum(1).min() >= 0)
        assert int(m.sum()) == 2 * HEAD_DIM * HIDDEN
    o = masks[f"{a}.output.dense.weight"]  # (hidden, heads*d): head h = columns h*d ..
    assert [c for c in range(o.shape[1]) if not bool(o[:, c].any())] == gone and int(o.sum()) == HIDDEN * 2 * HEAD_DIM


def test_head_masks_zero_whole_heads_gpt2_fused_qkv():
    model = gpt2()
    groups = channel_groups(model, None)
    keep = torch.tensor([False, True, True, True])  # head 0 goes
    masks = channel_masks_to_masks(model, groups, {f"{GPT_L}.1.attn": keep})
    w = masks[f"{GPT_L}.1.attn.c_attn.weight"]  # Conv1D: (in, 3 * heads * d), q | k | v
    width = HEADS * HEAD_DIM
    gone = [seg * width + r for seg in range(3) for r in range(HEAD_DIM)]
    assert w.shape == (HIDDEN, 3 * width)
    assert [c for c in range(w.shape[1]) if not bool(w[:, c].any())] == gone
    p = masks[f"{GPT_L}.1.attn.c_proj.weight"]  # Conv1D: (heads * d, hidden): head 0 = input rows 0 .. d-1
    assert [r for r in range(p.shape[0]) if not bool(p[r].any())] == list(range(HEAD_DIM))
    # read back: the channel masks come out the same (from the producer side, the consumer side, either)
    for side in ("producers", "consumers", "either"):
        back = channel_masks_from_masks(model, groups, masks, side=side)
        assert torch.equal(back[f"{GPT_L}.1.attn"], keep)


# ----------------------------------------------------------------------------------------------------- shrink
def _random_keep(groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        n = int(torch.randint(1, g.size + 1, (1,), generator=gen))  # 1 .. all channels
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size, generator=gen)[:n]] = True
        out[g.name] = keep
    return out


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_equals_the_masked_model_with_padding(build, seed):
    model = build()
    groups = channel_groups(model, None)
    keep = _random_keep(groups, seed)
    keep[groups[0].name] = torch.tensor([False, True, False, False])  # one head left in the first layer
    batch = padded_batch()
    small = shrink(model, keep, batch)  # checks against the masked model itself, on this batch
    ref = logits(masked_copy(model, groups, keep), batch)
    got = logits(small, batch)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    mods = dict(small.named_modules())
    for g in groups:
        n = int(keep[g.name].sum())
        for p in g.producers:
            w = mods[p].weight
            out_units = w.shape[1] if build is gpt2 else w.shape[0]
            assert out_units == n * g.rows * g.splits and mods[p].bias.shape[0] == n * g.rows * g.splits
        for c, block in g.consumers:
            w = mods[c].weight
            assert (w.shape[0] if build is gpt2 else w.shape[1]) == n * block
        if g.kind == "head":
            att = mods[g.attention]
            if build is bert:
                assert att.num_attention_heads == n and att.all_head_size == n * HEAD_DIM
            else:
                assert att.num_heads == n and att.split_size == n * HEAD_DIM and att.embed_dim == HIDDEN
    # the original is untouched, and the shrunk model can be shrunk again (its groups are read from it anew)
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in small.parameters())
    again = channel_groups(small, None)
    assert [g.size for g in again] == [int(keep[g.name].sum()) for g in groups]
    smaller = shrink(small, {again[1].name: torch.arange(again[1].size) == 0}, batch)
    assert dict(smaller.named_modules())[again[1].producers[0]].weight.numel() < \
        dict(small.named_modules())[again[1].producers[0]].weight.numel()


def test_shrunk_gpt2_generates_like_the_masked_one_with_its_kv_cache():
    model = gpt2()
    groups = channel_groups(model, None)
    keep = _random_keep(groups, seed=3)  # a different head count in each layer
    small, ref = shrink(model, keep), masked_copy(model, groups, keep)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    out = [m.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
           for m in (small, ref)]
    assert out[0].shape == (2, 11) and torch.equal(out[0], out[1])


def test_shrunk_bert_keeps_the_dense_outputs_when_nothing_is_removed():
    model = bert()
    groups = channel_groups(model, None)
    batch = padded_batch()
    same = shrink(model, {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}, batch)
    assert torch.equal(logits(same, batch), logits(model, batch))


def test_a_layer_cannot_lose_every_head():
    model = bert()
    groups = channel_groups(model, None)
    with pytest.raises(PrunekitError, match="removes every channel; keep at least one"):
        shrink(model, {groups[0].name: torch.zeros(HEADS, dtype=torch.bool)}, padded_batch())


def test_bad_inputs_are_clear_errors():
    model = bert()
    groups = channel_groups(model, None)
    with pytest.raises(PrunekitError, match="unknown group .*did you mean"):
        check_channel_masks(groups, {f"{BERT_L}.0.attention.selff": torch.ones(HEADS, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="has 3 entries, the group has 4"):
        check_channel_masks(groups, {groups[0].name: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="example_input must be a tensor"):
        shrink(model, {groups[0].name: torch.ones(HEADS, dtype=torch.bool)}, example_input="text")
    # an architecture without a recognised block
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=1, n_heads=HEADS, hidden_dim=FFN,
                                        max_position_embeddings=32)
    with pytest.raises(PrunekitError, match="has no block it recognises; supported: BERT family"):
        channel_groups(transformers.DistilBertModel(cfg), None)


# ------------------------------------------------------------------------------------------- filter baselines
def _l1_per_head(model, layer):
    """Independent reference: l1 norm of each head's rows of query, key and value together."""
    a = dict(model.named_modules())[f"{BERT_L}.{layer}.attention.self"]
    out = []
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        out.append(sum(float(getattr(a, x).weight[rows].detach().double().abs().sum())
                       for x in ("query", "key", "value")))
    return torch.tensor(out, dtype=torch.float64)


def test_filter_l1_head_scores_sum_the_rows_of_query_key_value():
    model = bert()
    groups = channel_groups(model, None)
    scores = filter_norm_scores(model, groups, p=1)
    for i in range(LAYERS):
        torch.testing.assert_close(scores[f"{BERT_L}.{i}.attention.self"], _l1_per_head(model, i), rtol=1e-12,
                                   atol=0)
        w = dict(model.named_modules())[f"{BERT_L}.{i}.intermediate.dense"].weight.detach().double()
        torch.testing.assert_close(scores[f"{BERT_L}.{i}.intermediate.dense"], w.abs().sum(1), rtol=1e-12, atol=0)
    gscores = filter_norm_scores(gpt2(), channel_groups(gpt2(), None), p=2)
    w = dict(gpt2().named_modules())[f"{GPT_L}.0.attn.c_attn"].weight.detach().double()  # (in, q|k|v)
    width = HEADS * HEAD_DIM
    ref = [float(torch.cat([w[:, s * width + h * HEAD_DIM:s * width + (h + 1) * HEAD_DIM] for s in range(3)], 1)
                 .pow(2).sum().sqrt()) for h in range(HEADS)]
    torch.testing.assert_close(gscores[f"{GPT_L}.0.attn"], torch.tensor(ref, dtype=torch.float64), rtol=1e-12,
                               atol=0)


def test_filter_l1_on_bert_with_dict_batches_keeps_exact_counts_and_the_best_heads():
    model = bert()
    ref = bert()
    masks = pk.prune(model, "filter_l1", 0.5, bert_batches(length=7))
    assert masks.kept() == pk.keep_count(masks.total(), 0.5)
    assert masks.names() == [p.name for p in prunable_params(ref)]
    groups = channel_groups(model, None)
    keep = channel_masks_from_masks(model, groups, masks)
    # every block weight belongs to a group, so 50% of the weights is 50% of the heads and of the neurons
    assert {k: int(v.sum()) for k, v in keep.items()} == {g.name: g.size // 2 for g in groups}
    for i in range(LAYERS):
        l1 = _l1_per_head(ref, i)
        k = keep[f"{BERT_L}.{i}.attention.self"]
        assert float(l1[k].min()) >= float(l1[~k].max())
    # the pruned model is the masked model: the shrunk one computes the same function
    batch = padded_batch()
    small = pk.shrink(model, masks, batch)
    torch.testing.assert_close(logits(small, batch), logits(model, batch), rtol=1e-5, atol=1e-5)
    assert dict(small.named_modules())[f"{BERT_L}.0.attention.self"].num_attention_heads == HEADS // 2


@pytest.mark.parametrize("method", ["filter_l2", "filter_random"])
def test_filter_methods_on_gpt2_exact_counts_and_shrink(method):
    model = gpt2()
    masks = pk.prune(model, method, 0.6, gpt2_batches(), seed=2)
    target = pk.keep_count(masks.total(), 0.6)
    assert abs(masks.kept() - target) <= 0.005 * target  # whole heads: the size_tol window
    groups = channel_groups(model, None)
    keep = channel_masks_from_masks(model, groups, masks)
    # uniform: one keep fraction f with |kept_g - f * size_g| <= 1 in every group (heads and neurons alike)
    lo = max((int(keep[g.name].sum()) - 1) / g.size for g in groups)
    hi = min((int(keep[g.name].sum()) + 1) / g.size for g in groups)
    assert lo <= hi + 1e-12
    # the kept count by hand: per layer, c_attn keeps 3 x heads x d columns, c_proj heads x d rows; the MLP
    # keeps its neurons' columns of c_fc and rows of c_proj
    by_hand = 0
    for i in range(LAYERS):
        h, n = int(keep[f"{GPT_L}.{i}.attn"].sum()), int(keep[f"{GPT_L}.{i}.mlp.c_fc"].sum())
        by_hand += HIDDEN * 3 * h * HEAD_DIM + h * HEAD_DIM * HIDDEN + 2 * HIDDEN * n
    assert masks.kept() == by_hand
    want = channel_masks_to_masks(model, groups, keep)
    for name, m in want.items():
        assert torch.equal(masks.as_dict()[name], m), name  # the masks are exactly whole heads and neurons
    batch = padded_batch()
    small = pk.shrink(model, masks, batch)
    torch.testing.assert_close(logits(small, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


def test_bn_scale_refuses_a_transformer_without_batchnorm():
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match="no prunable channel group of BertForSequenceClassification has a "
                                            "BatchNorm"):
        pk.prune(model, "bn_scale", 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------ PFP, SiPP, Conv1D
@pytest.mark.filterwarnings("ignore:pfp. the scoring data hold only")
@pytest.mark.parametrize("build,data", [(bert, lambda: bert_batches(length=7)), (gpt2, gpt2_batches)],
                         ids=["bert", "gpt2"])
@pytest.mark.parametrize("variant", ["det", "rand"])
def test_pfp_on_dict_batches_prunes_whole_heads_and_neurons(build, data, variant):
    model = build()
    masks = pk.prune(model, "pfp", 0.5, data(), variant=variant, seed=0)
    target = pk.keep_count(masks.total(), 0.5)
    assert abs(masks.kept() - target) <= 0.005 * target
    groups = channel_groups(model, None)
    keep = channel_masks_from_masks(model, groups, masks, side="consumers")
    removed = channel_masks_to_masks(model, groups, keep)
    md = masks.as_dict()
    for g in groups:  # a removed head / neuron is gone from every producer row and consumer slice
        for p in g.producers:
            assert not bool((md[f"{p}.weight"] & ~removed[f"{p}.weight"]).any())
    assert any(not bool(k.all()) for k in keep.values())
    batch = padded_batch()
    small = pk.shrink(model, masks, batch)
    torch.testing.assert_close(logits(small, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


class _Lin(nn.Module):
    def __init__(self, conv1d):
        super().__init__()
        self.fc = nn.Linear(conv1d.weight.shape[0], conv1d.weight.shape[1])
        with torch.no_grad():
            self.fc.weight.copy_(conv1d.weight.t())
            self.fc.bias.copy_(conv1d.bias)

    def forward(self, x):
        return self.fc(x)


def test_sensitivities_of_a_conv1d_equal_those_of_the_same_linear_layer():
    conv = transformers.pytorch_utils.Conv1D(5, 4)  # nf=5 outputs, nx=4 inputs: weight (4, 5)
    with torch.no_grad():
        conv.weight.normal_(generator=torch.Generator().manual_seed(0))

    class One(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(1))  # 6 examples, 3 positions
    a, b = One(conv), _Lin(conv)
    sa = sensitivities(a, prunable_params(a, pk.ParamSpec(modules=("layer",))), x)["layer.weight"]
    sb = sensitivities(b, prunable_params(b), x)["fc.weight"]
    assert sa.shape == (4, 5) and sb.shape == (5, 4)
    torch.testing.assert_close(sa, sb.t(), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:sipp. the scoring data hold only")
def test_sipp_reads_dict_batches_like_tuple_batches():
    model = bert(torch.float64)
    dicts = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in bert_batches(length=7)]
    pairs = [(b["input_ids"], b["labels"]) for b in dicts]
    s_dict = pk.score(model, "sipp", dicts)
    s_pair = pk.score(model, "sipp", pairs)
    assert list(s_dict) == list(s_pair)
    for k in s_dict:
        torch.testing.assert_close(s_dict[k], s_pair[k], rtol=0, atol=0)
    masks = pk.prune(model, "sipp", 0.7, dicts)
    assert masks.kept() == pk.keep_count(masks.total(), 0.7)


# ---------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("build,task", [(bert, "sequence-classification"), (gpt2, "causal-lm")], ids=["bert", "gpt2"])
def test_a_shrunk_model_saves_and_reloads_with_its_per_layer_sizes(tmp_path, build, task):
    from prunekit.structured.archive_hf import load_shrunk_hf, save_shrunk_hf

    model = build()
    groups = channel_groups(model, None)
    keep = _random_keep(groups, seed=5)
    batch = padded_batch()
    small = shrink(model, keep, batch)
    save_shrunk_hf(small, tmp_path / "small")
    again = load_shrunk_hf(tmp_path / "small", task)
    assert type(again) is type(small)
    assert [(g.name, g.size) for g in channel_groups(again, None)] == [(g.name, int(keep[g.name].sum()))
                                                                         for g in groups]
    assert torch.equal(logits(again, batch), logits(small, batch))
    other = "base" if build is bert else "sequence-classification"  # a head the folder has no weights for
    with pytest.raises(PrunekitError, match="load it with the task it was saved with"):
        load_shrunk_hf(tmp_path / "small", other)
    with pytest.raises(PrunekitError, match="has no prunekit_shrunk.json"):
        load_shrunk_hf(tmp_path, task)


@pytest.mark.slow
def test_minilm_half_of_its_heads_and_neurons_shrinks_and_reloads(tmp_path):
    """The real MiniLM (skipped when not fetched): filter_l1 at 0.5 keeps 6 of 12 heads and 768 of 1,536 neurons in
    every layer; the shrunk model equals the pruned one on a padded batch and reloads from its folder."""
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path
    from prunekit.structured import load_shrunk_hf, save_shrunk_hf

    try:
        folder = minilm_path()
    except PrunekitError:
        pytest.skip("MiniLM is not fetched (prunekit models fetch minilm)")
    model = load_hf(folder, task="sequence-classification", num_labels=2).eval()
    masks = pk.prune(model, "filter_l1", 0.5)
    groups = channel_groups(model, None)
    keep = channel_masks_from_masks(model, groups, masks)
    assert {g.name: int(keep[g.name].sum()) for g in groups} == {
        g.name: (6 if g.kind == "head" else 768) for g in groups} and len(groups) == 12
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 30522, (2, 16), generator=g), "attention_mask": torch.ones(2, 16,
                                                                                                     dtype=torch.long)}
    batch["attention_mask"][1, 10:] = 0
    small = pk.shrink(model, masks, batch)
    torch.testing.assert_close(logits(small, batch), logits(model, batch), rtol=1e-5, atol=1e-5)
    save_shrunk_hf(small, tmp_path / "m")
    again = load_shrunk_hf(tmp_path / "m", "sequence-classification")
    assert torch.equal(logits(again, batch), logits(small, batch))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
