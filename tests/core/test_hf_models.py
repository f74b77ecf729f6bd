"""Hugging Face transformers models (issue 16, section 1): prunable tensors of a tiny random-weight BERT and GPT-2
(built from a config, no download), targets / ignore patterns, dict batches for the gradient criteria, every one-shot
code on both models (it works with an exact kept count and only prunable tensors changed, or it refuses naming the
reason), and the dict-batch codes agreeing with the same model called on tensor batches."""
from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.experiments.resolved import run_id  # noqa: E402
from prunekit.params import prunable_params, require_transformers  # noqa: E402

N_LABELS = 3


def tiny_bert(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=N_LABELS)
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def bert_batches(n_batches=2, size=3, length=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length - 3:] = 0  # one padded example
        out.append({"input_ids": torch.randint(0, 100, (size, length), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, N_LABELS, (size,), generator=g)})
    return out


def gpt2_batches(n_batches=2, size=2, length=6):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 100, (size, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


BERT_BLOCK = [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2)
              for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense")]
GPT2_BLOCK = [f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


# ------------------------------------------------------------------------------------------- prunable tensors


def test_default_prunable_tensors_are_the_block_linear_and_conv1d_weights():
    assert [p.name for p in prunable_params(tiny_bert())] == BERT_BLOCK
    gpt = tiny_gpt2()
    params = prunable_params(gpt)
    assert [p.name for p in params] == GPT2_BLOCK
    assert all(isinstance(p.module, transformers.pytorch_utils.Conv1D) for p in params)


def test_targets_and_ignore_select_what_they_say():
    bert = tiny_bert()
    qkv = prunable_params(bert, targets=[r"re:.*attention\.self\."])
    assert [p.name for p in qkv] == [n for n in BERT_BLOCK if ".attention.self." in n]
    # a class name as target: every Linear, the pooler and the classifier included; ignore by regex and by name
    lin = [p.name for p in prunable_params(bert, targets=["Linear"])]
    assert lin == BERT_BLOCK + ["bert.pooler.dense.weight", "classifier.weight"]
    assert [p.name for p in prunable_params(bert, targets=["Linear"], ignore=["re:.*classifier", "bert.pooler.dense"])
            ] == BERT_BLOCK
    # everything with a weight, then LayerNorm (class name) and the embeddings (regex) ignored
    some = [p.name for p in prunable_params(bert, targets=["re:.*"], ignore=["LayerNorm", "re:.*embeddings"])]
    assert some == lin
    # ignore on the default rule
    assert [p.name for p in prunable_params(bert, ignore=["re:.*intermediate", "re:.*output"])] == \
        [n for n in BERT_BLOCK if ".self." in n]
    assert [p.name for p in prunable_params(tiny_gpt2(), ignore=["re:.*mlp"])] == \
        [n for n in GPT2_BLOCK if ".attn." in n]


def test_targets_and_ignore_mistakes_are_clear_errors():
    bert = tiny_bert()
    with pytest.raises(PrunekitError, match="neither a module name nor a module class name"):
        prunable_params(bert, ignore=["classifer"])
    with pytest.raises(PrunekitError, match="not a valid regular expression"):
        prunable_params(bert, targets=["re:("])
    with pytest.raises(PrunekitError, match="match no module"):
        prunable_params(bert, targets=["re:nothing_here"])


def test_targets_and_ignore_as_prune_options_and_in_run_ids():
    bert = tiny_bert()
    masks = pk.prune(bert, "magnitude", 0.5, targets=["Linear"], ignore=["re:.*classifier"])
    assert masks.names() == BERT_BLOCK + ["bert.pooler.dense.weight"]
    base = {"prune": {"method": "magnitude", "options": {"scope": "global", "exclude": []}}}
    unset = {"prune": {"method": "magnitude", "options": {"scope": "global", "exclude": [], "targets": None,
                                                          "ignore": None}}}
    assert run_id(base) == run_id(unset)  # new fields unset: stored run ids do not change
    unset["prune"]["options"]["ignore"] = ["re:.*classifier"]
    assert run_id(base) != run_id(unset)


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[hf\]'"):
        require_transformers()


# ------------------------------------------------------------------------------------------ data-free methods


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_exact_kept(masks, sparsity: float, layer_scope: bool) -> None:
    """Exactly round((1 - s) * n) kept: per tensor (at least 1) for a layer-scope method, else over all of them."""
    if layer_scope:
        for p in masks.params:
            assert int(masks.as_dict()[p.name].sum()) == max(1, pk.keep_count(p.tensor.numel(), sparsity))
    else:
        assert masks.kept() == pk.keep_count(masks.total(), sparsity)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "random", "globalmagni", "magni"])
def test_data_free_methods_exact_counts_and_only_prunable_tensors_change(build, method):
    model = build()
    before = _state(model)
    masks = pk.prune(model, method, 0.7, seed=3)
    names = set(masks.names())
    assert_exact_kept(masks, 0.7, layer_scope=method == "magni")
    after = model.state_dict()
    for k, v in before.items():
        if k in names:
            m = masks.as_dict()[k]
            assert torch.equal(after[k][m], v[m]) and bool((after[k][~m] == 0).all())
        else:
            assert torch.equal(after[k], v), k  # embeddings, LayerNorm, head untouched


# --------------------------------------------------------------------------------------- dict-batch gradients


def reference_stats(model, data):
    """ḡ and F̂ over the examples by a plain loop: one example at a time, autograd of the model's own loss."""
    params = prunable_params(model)
    tensors = [p.tensor for p in params]
    gsum = [torch.zeros_like(t) for t in tensors]
    gsq = [torch.zeros_like(t) for t in tensors]
    n = 0
    for batch in data:
        for i in range(batch["labels"].shape[0]):
            out = model(**{k: v[i:i + 1] for k, v in batch.items()})
            grads = torch.autograd.grad(out.loss, tensors)
            for s, q, g in zip(gsum, gsq, grads):
                s += g
                q += g * g
            n += 1
    names = [p.name for p in params]
    return ({k: s / n for k, s in zip(names, gsum)}, {k: q / n for k, q in zip(names, gsq)},
            {p.name: p.tensor.detach() for p in params})


@pytest.mark.parametrize("build,batches", [(tiny_bert, bert_batches), (tiny_gpt2, gpt2_batches)], ids=["bert", "gpt2"])
def test_gradient_methods_on_dict_batches_equal_a_plain_per_example_loop(build, batches):
    model = build(torch.float64)
    data = batches()
    mean, sq, theta = reference_stats(model, data)
    model.zero_grad(set_to_none=True)
    expected = {"snip": {k: (theta[k] * mean[k]).abs() for k in mean},
                "grad_norm": {k: mean[k].abs() for k in mean},
                "fisher_diag": sq}
    for method, want in expected.items():
        before, training = _state(model), model.training
        got = pk.score(model, method, data)
        assert list(got) == list(want)
        for k in want:
            torch.testing.assert_close(got[k].to(torch.float64), want[k], rtol=1e-9, atol=1e-14)
        # purity: weights, buffers, .grad and the mode are as they were; the data is not changed
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert model.training == training and all(p.grad is None for p in model.parameters())
    assert set(data[0]) >= {"input_ids", "labels"}


@pytest.mark.filterwarnings("ignore:layer collapse")  # at init query/key gradients are tiny: those layers go first
@pytest.mark.parametrize("method", ["snip", "grad_norm", "fisher_diag", "fts", "fisher_pruner", "fbss"])
def test_gradient_methods_on_dict_batches_keep_exact_counts(method):
    model = tiny_bert()
    masks = pk.prune(model, method, 0.8, bert_batches())
    assert masks.kept() == pk.keep_count(masks.total(), 0.8)
    assert masks.names() == BERT_BLOCK
    for p in masks.params:
        assert bool((p.tensor[~masks.as_dict()[p.name]] == 0).all())


def test_the_loss_falls_back_to_cross_entropy_on_logits_without_labels_in_the_output():
    model = tiny_bert(torch.float64)
    data = bert_batches(1)

    class NoLoss(torch.nn.Module):  # the same model, returning only the logits object (no .loss)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, labels=None, **kw):
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.inner(**kw).logits)

    wrapped = NoLoss(model)
    got = pk.score(wrapped, "grad_norm", data)
    mean, _, _ = reference_stats(model, data)
    for k, v in mean.items():
        torch.testing.assert_close(got["inner." + k], v.abs(), rtol=1e-9, atol=1e-14)


def test_dict_batch_mistakes_are_clear_errors():
    model = tiny_bert()
    data = bert_batches(1)
    with pytest.raises(PrunekitError, match="looks like one dict batch"):
        pk.score(model, "snip", data[0])
    nolabels = [{k: v for k, v in data[0].items() if k != "labels"}]
    with pytest.raises(PrunekitError, match="'labels'"):
        pk.score(model, "snip", nolabels)


def test_targets_and_ignore_flow_from_a_config_to_the_prunable_tensors():
    from prunekit.experiments.config import resolve_run
    from prunekit.models import get_model

    base = {"name": "t", "model": "lenet_300_100", "data": {"name": "mnist"}, "train": {"epochs": 1},
            "prune": {"method": "magnitude", "sparsity": 0.5}}
    plain = resolve_run(base)
    assert plain.prune.options.targets is None and plain.prune.options.ignore is None
    cfg = {**base, "prune": {**base["prune"], "ignore": ["re:.*3$"]}}
    resolved = resolve_run(cfg)
    assert resolved.prune.options.ignore == ("re:.*3$",) and resolved.id != plain.id
    model = get_model("lenet_300_100")
    every = [p.name for p in prunable_params(model)]
    kept = [p.name for p in prunable_params(model, resolved.prune.options.param_spec())]
    assert kept == [n for n in every if not n.split(".weight")[0].endswith("3")] and len(kept) == len(every) - 1


def test_tuple_batches_on_a_transformer_use_the_logits_and_equal_the_plain_loop():
    """(input_ids, labels) pairs: the model is called as model(input_ids) and returns a ModelOutput without a loss;
    the default cross-entropy takes its logits (batched hooks engine) and gives the per-example loop's values."""
    from prunekit.gradstats import grad_stats

    model = tiny_bert(torch.float64)
    dicts = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in bert_batches()]
    pairs = [(b["input_ids"], b["labels"]) for b in dicts]
    mean, sq, _ = reference_stats(model, dicts)
    st = grad_stats(model, prunable_params(model), pairs)
    assert "hooks" in st.engine and st.n_samples == 6
    assert grad_stats(model, prunable_params(model), dicts).engine == "loop"  # dict batches: one example at a time
    for k in mean:
        torch.testing.assert_close(st.mean[k], mean[k], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(st.sq[k], sq[k], rtol=1e-9, atol=1e-14)
    got = pk.score(model, "fisher_diag", pairs)
    for k in sq:
        torch.testing.assert_close(got[k], sq[k], rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------ every one-shot code, both models

#: Codes that refuse a transformer, and the reason their error must name.
REFUSES = {"synflow": "path decomposition", "px": "path decomposition", "bn_scale": "BatchNorm"}
#: Channel codes: they prune whole heads and FFN neurons, so their kept count meets the target within the
#: structured tolerance (docs/structured.md), over the block weights their groups cover.
STRUCTURED = {"pfp", "filter_l1", "filter_l2", "filter_random"}
#: Options that keep a code fast on the tiny models (the defaults are sized for real runs).
FAST = {"naivehess": {"hessian_diag": "hutchinson", "hutchinson_probes": 4}}


def moves_kept_weights(method: str) -> bool:
    """A code with a weight update (OBS, K-FAC, SparseGPT ...) may move the kept prunable weights."""
    return pk.get_method(method).new().update is not None


def one_shot_codes() -> list[str]:
    return [m.name for m in pk.methods() if m.kind == "one-shot"]


def test_the_one_shot_codes_are_all_accounted_for():
    codes = set(one_shot_codes())
    assert {"magnitude", "grasp", "kfac", "woodfisherblock", "px", "synflow"} <= codes
    assert set(REFUSES) | STRUCTURED | set(FAST) <= codes  # no stale names in the tables above
    assert moves_kept_weights("woodfisherblock") and moves_kept_weights("kfac") and not moves_kept_weights("grasp")
    # every data code that works here reads dict batches and says so
    for m in pk.methods():
        if m.name in codes and m.needs_data != "none" and m.name not in REFUSES:
            assert m.dict_batches, m.name


@pytest.mark.filterwarnings("ignore::UserWarning")  # layer collapse at init, fewer examples than fisher_samples
@pytest.mark.parametrize("build,batches", [(tiny_bert, bert_batches), (tiny_gpt2, gpt2_batches)], ids=["bert", "gpt2"])
@pytest.mark.parametrize("method", one_shot_codes())
def test_every_one_shot_code_works_on_a_transformer_or_refuses_with_its_reason(method, build, batches):
    model = build()
    before = _state(model)
    info = pk.get_method(method)
    try:
        masks = pk.prune(model, method, 0.7, batches(), seed=3, **FAST.get(method, {}))
    except PrunekitError as e:
        assert method in REFUSES, f"{method} refused: {e}"
        assert REFUSES[method] in str(e)
        if REFUSES[method] == "path decomposition":
            for what in ("Embedding", "LayerNorm", "attention", "GELU"):
                assert what in str(e), what
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before changing it
        return
    assert method not in REFUSES, f"{method} should refuse a transformer"
    names = set(masks.names())
    if method in STRUCTURED:  # whole heads and neurons: the target within the structured tolerance
        assert set(masks.names()) <= set(BERT_BLOCK if build is tiny_bert else GPT2_BLOCK)
        assert abs(masks.kept() - pk.keep_count(masks.total(), 0.7)) <= 0.02 * masks.total()
    else:
        assert masks.names() == (BERT_BLOCK if build is tiny_bert else GPT2_BLOCK)
        assert_exact_kept(masks, 0.7, layer_scope=info.scope == "layer")
    after = model.state_dict()
    for k, v in before.items():
        if k in names:
            m = masks.as_dict()[k]
            assert bool((after[k][~m] == 0).all()), k  # pruned weights exactly zero
            if not moves_kept_weights(method):
                assert torch.equal(after[k][m], v[m]), k
        else:
            assert torch.equal(after[k], v), k  # embeddings, LayerNorm, head untouched


# ---------------------------------------------------------------------- dict batches agree with tensor batches


class TensorBert(torch.nn.Module):
    """The same BERT called on one tensor x = stack(input_ids, attention_mask) [n, 2, L], returning the logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


AGREE = {"grasp": {}, "woodfisherblock": {"block_size": 16}, "woodfisher": {}, "kfac": {}, "diagfisher": {},
         "naivehess": {"hessian_diag": "hutchinson", "hutchinson_probes": 3}}


@pytest.mark.filterwarnings("ignore::UserWarning")  # fewer examples than fisher_samples
@pytest.mark.parametrize("method", sorted(AGREE))
def test_dict_batches_give_the_scores_of_the_same_model_on_tensor_batches(method):
    """BERT's own .loss (dict batches, model(**batch)) is the mean cross-entropy of its logits, so a second-order
    code must give the scores of the wrapped model on (stack(ids, mask), labels) tensor batches (default
    cross-entropy; hooks gradient engine for the OBS codes, and plain autograd for grasp/naivehess)."""
    model = tiny_bert(torch.float64)
    dicts = bert_batches()
    pairs = [(torch.stack([b["input_ids"], b["attention_mask"]], 1), b["labels"]) for b in dicts]
    got = pk.score(model, method, dicts, seed=5, **AGREE[method])
    attn = model.config._attn_implementation
    want = pk.score(TensorBert(model), method, pairs, seed=5, **AGREE[method])
    assert model.config._attn_implementation == attn  # eager attention for the double backward only
    assert list(got) == BERT_BLOCK
    for k in got:
        ref = want["inner." + k]
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_woodfisherblock_on_the_real_minilm():
    """The fetched MiniLM (skipped when absent): woodfisherblock (blocks of 50, the oBERT block size) with 8
    gradients of dict batches keeps exactly half of its 10,616,832 block weights; pruned weights are 0 and the
    embeddings, LayerNorm and head are unchanged (about 30 s on 2 CPU threads, docs/transformers.md)."""
    from prunekit.hf import load_hf
    from prunekit.models.fetch import minilm_path

    try:
        folder = minilm_path()
    except PrunekitError:
        pytest.skip("MiniLM is not fetched (prunekit models fetch minilm)")
    model = load_hf(folder, task="sequence-classification", num_labels=2).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 30000, (4, 64), generator=g),
             "attention_mask": torch.ones(4, 64, dtype=torch.long), "labels": torch.randint(0, 2, (4,), generator=g)}
            for _ in range(2)]
    before = _state(model)
    masks = pk.prune(model, "woodfisherblock", 0.5, data, fisher_samples=8, block_size=50)
    assert masks.total() == 10_616_832 and len(masks.names()) == 36
    assert masks.kept() == pk.keep_count(masks.total(), 0.5)
    after = model.state_dict()
    for k, v in before.items():
        if k in masks.as_dict():
            assert bool((after[k][~masks.as_dict()[k]] == 0).all()), k
        else:
            assert torch.equal(after[k], v), k


def test_dict_batches_of_different_lengths_cannot_be_regrouped_clearly():
    """grasp regroups examples into batches of batch_size: batches padded to different lengths are refused by name."""
    data = bert_batches(1, length=8) + bert_batches(1, length=6)
    with pytest.raises(PrunekitError, match=r"'input_ids' is \(3, 8\) in one batch and \(3, 6\) in another; pad"):
        pk.score(tiny_bert(), "grasp", data)
    pk.score(tiny_bert(), "grasp", data, batch_size=3)  # batches kept as given: fine


def test_vit_prunes_its_encoder_blocks_from_image_tensor_batches():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    names = [p.name for p in prunable_params(model)]
    blocks = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    assert len(blocks) == 1 and len(names) == 12  # q, k, v, out, fc1, fc2 in each of the 2 blocks
    assert all(n.startswith(f"{blocks[0]}.0.") or n.startswith(f"{blocks[0]}.1.") for n in names)
    head = model.classifier.weight.detach().clone()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    masks = pk.prune(model, "snip", 0.6, [(x, y)])  # (pixel_values, labels) pairs: loss on the output's .logits
    assert masks.kept() == pk.keep_count(masks.total(), 0.6)
    assert torch.equal(model.classifier.weight, head)
