"""Pretrained models in the harness (issue 16 §3): ``model.pretrained: {source: hf | zoo | file | run}``, text data
tokenized by the encoder's own tokenizer, a linear probe (``train.freeze: backbone``), images repeated to three
channels and a stratified test subset. A tiny random-weight BERT with a word-level tokenizer and a tiny two-topic
mail corpus stand in for MiniLM and SpamAssassin (no download)."""
from __future__ import annotations

import gzip
import json
import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import prunekit as pk  # noqa: E402
from prunekit.data import load_dataset, subset_test, tokenized, with_channels  # noqa: E402
from prunekit.data.text import SPAM_RELPATH, load_text  # noqa: E402
from prunekit.errors import ConfigError, PrunekitError  # noqa: E402
from prunekit.experiments import run  # noqa: E402
from prunekit.experiments.config import resolve_run  # noqa: E402
from prunekit.experiments.store import Store  # noqa: E402
from prunekit.hf import TextClassifier, text_classifier  # noqa: E402
from prunekit.models import get_model  # noqa: E402
from prunekit.train.freeze import backbone_eval, freeze_backbone, head_name  # noqa: E402

SPAM_WORDS = ["win", "money", "free", "offer", "cash", "prize", "click", "cheap"]
HAM_WORDS = ["meeting", "project", "report", "lunch", "patch", "kernel", "review", "notes"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + SPAM_WORDS + HAM_WORDS + ["subject", "the"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return len(vocab)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny BERT encoder folder: config.json, model.safetensors, tokenizer.json."""
    folder = tmp_path_factory.mktemp("tinybert")
    n_vocab = _tokenizer_json(folder / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=n_vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data directory with a 120-mail two-topic corpus in the SpamAssassin file format."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = []
    for i in range(120):
        spam = i % 3 == 0
        words = rng.choices(SPAM_WORDS if spam else HAM_WORDS, k=rng.randint(3, 12)) + ["the"] * rng.randint(0, 3)
        rng.shuffle(words)
        rows.append({"id": f"{i:04d}", "group": "spam-1" if spam else "easy-ham-1", "label": int(spam),
                     "text": "subject " + " ".join(words)})
    path = root / SPAM_RELPATH
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def text_config(folder, method="none", sparsity=None, **train):
    prune = {"method": method}
    if sparsity is not None:
        prune["sparsity"] = sparsity
    return {"name": "tiny_text", "model": {"pretrained": {"source": "hf", "name": str(folder)}},
            "data": {"name": "spam_assassin", "max_length": 12},
            "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "progress": False,
                      "eval_batch_size": 64, **train},
            "prune": prune}


# ---------------------------------------------------------------------------------------------- data


def test_tokenized_splits_are_the_tokenizers_ids_and_mask(hf_folder, data_root):
    from tokenizers import Tokenizer

    text = load_text("spam_assassin", root=data_root)
    splits = tokenized(text, hf_folder, max_length=8)
    assert splits.input_shape == (2, 8) and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (len(text.train), len(text.val), len(text.test))
    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    for i in (0, 5):
        enc = tok.encode(text.train.texts[i]).ids
        ids = enc if len(enc) <= 8 else enc[:7] + [3]  # truncated: [CLS], the first 6 words, [SEP]
        got = splits.train.x[i]
        n = int(got[1].sum())
        assert got[0, :n].long().tolist() == ids and n == len(ids)
        assert got[0, n:].long().eq(0).all() and got[1, n:].eq(0).all()  # padding: [PAD] id 0, mask 0
    assert torch.equal(splits.train.y, text.train.labels)


def test_tokenized_refuses_bad_length_and_missing_tokenizer(tmp_path, hf_folder, data_root):
    text = load_text("spam_assassin", root=data_root)
    with pytest.raises(PrunekitError, match="max_length"):
        tokenized(text, hf_folder, max_length=1)
    with pytest.raises(PrunekitError, match="tokenizer.json"):
        tokenized(text, tmp_path, max_length=8)


def test_channels_repeat_as_views_and_test_subset_is_stratified():
    s = load_dataset("synthetic", n_train=40, n_val=10, n_test=60, input_shape=(1, 4, 4), num_classes=3)
    c3 = with_channels(s, 3)
    assert c3.input_shape == (3, 4, 4) and c3.train.x.shape[1] == 3
    assert c3.train.x.data_ptr() == s.train.x.data_ptr()  # a view, no copy
    assert torch.equal(c3.train.x[:, 0], c3.train.x[:, 2]) and len(c3.mean) == 3
    with pytest.raises(PrunekitError, match="one-channel"):
        with_channels(c3, 2)
    sub = subset_test(s, 30, seed=1)
    assert len(sub.test) == 30
    full = torch.bincount(s.test.y, minlength=3).float() / len(s.test)
    part = torch.bincount(sub.test.y, minlength=3).float() / 30
    assert (full - part).abs().max() <= 1 / 30 + 1e-9
    assert torch.equal(subset_test(s, 30, seed=1).test.y, sub.test.y)  # seeded


# ---------------------------------------------------------------------------------------------- configs


def test_hf_source_identity_is_the_weights_not_the_folder(tmp_path, hf_folder):
    a = resolve_run(text_config(hf_folder))
    moved = tmp_path / "elsewhere"
    shutil.copytree(hf_folder, moved)
    b = resolve_run(text_config(moved))
    assert a.id == b.id and a.model.name == "hf:" + hf_folder.name
    cfg = text_config(hf_folder)
    cfg["model"]["pretrained"]["init"] = "random"
    assert resolve_run(cfg).id != a.id  # the scratch reference is another run


@pytest.mark.parametrize("change, match", [
    (lambda c: c["model"].update(name="resnet20"), "model.name"),
    (lambda c: c["data"].update(name="mnist"), "not a text dataset"),
    (lambda c: c["data"].update(resize=32), "images only"),
    (lambda c: c["model"]["pretrained"].update(name="/no/such/folder"), "neither a fetched model"),
    (lambda c: c["model"]["pretrained"].update(sorce="hf"), "sorce"),
    (lambda c: c["model"]["pretrained"].update(source="huggingface"), "huggingface"),
])
def test_bad_pretrained_configs_name_the_problem(hf_folder, change, match):
    cfg = text_config(hf_folder)
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        resolve_run(cfg)


def test_text_data_needs_an_encoder_and_zoo_needs_published_weights():
    with pytest.raises(ConfigError, match="needs a Hugging Face encoder"):
        resolve_run({"data": {"name": "spam_assassin"}})
    with pytest.raises(ConfigError, match="no published weights"):
        resolve_run({"model": {"name": "resnet20", "pretrained": {"source": "zoo"}}, "data": {"name": "synthetic"}})
    with pytest.raises(ConfigError, match="max_length"):
        resolve_run({"data": {"name": "mnist", "max_length": 16}})
    zoo = resolve_run({"model": {"name": "efficientnet_lite0", "pretrained": {"source": "zoo"}},
                       "data": {"name": "fashion_mnist", "resize": 64, "channels": 3}})
    assert zoo.model.pretrained.sha256.startswith("57934424")


def test_older_run_ids_do_not_change_with_the_new_fields():
    r = resolve_run({"data": {"name": "mnist"}, "train": {"epochs": 1}})
    d = r.to_dict()
    assert d["data"]["channels"] is None and d["train"]["freeze"] is None
    from prunekit.experiments.resolved import run_id

    for k in ("channels", "test_size", "max_length"):
        d["data"].pop(k)
    d["train"].pop("freeze")
    assert run_id(d) == r.id


# ---------------------------------------------------------------------------------------------- runs


def test_text_classifier_pools_over_the_mask_only(hf_folder):
    torch.manual_seed(0)
    m = text_classifier(hf_folder, 2).eval()
    assert isinstance(m, TextClassifier) and not any(p.requires_grad for p in m.encoder.pooler.parameters())
    ids = torch.tensor([[2, 5, 6, 3, 0, 0]])
    x = torch.stack([ids, (ids != 0).long()], 1).float()
    hidden = m.encoder(input_ids=ids[:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long)).last_hidden_state
    assert torch.allclose(m(x), m.head(hidden.mean(1)), atol=1e-5)  # the padding changes nothing
    with pytest.raises(PrunekitError, match=r"\[batch, 2, length\]"):
        m(ids.float())
    names = [p.name for p in pk.prunable_params(m)]
    assert len(names) == 12 and all(n.startswith("encoder.encoder.layer.") for n in names)


def test_pruned_pretrained_encoder_fine_tunes_on_text(tmp_path, hf_folder, data_root):
    root = tmp_path / "runs"
    dense = run(text_config(hf_folder), root, data_dir=data_root)
    pruned = run(text_config(hf_folder, "magnitude", 0.5), root, data_dir=data_root)
    assert dense.final_test_acc > 0.9  # the two topics are separable
    assert pruned.achieved_sparsity == pytest.approx(0.5, abs=1e-6)
    with Store(root / "results.sqlite", readonly=True) as st:
        layers = st.layers(pruned.run_id)
    assert len(layers) == 12 and all(r["layer"].startswith("encoder.encoder.layer.") for r in layers)
    total = sum(r["total"] for r in layers)
    assert sum(r["kept"] for r in layers) == round(0.5 * total)  # exact count over the block Linear weights
    best = pk.load(pruned.run_dir + "/best.pt", text_classifier(hf_folder, 2))  # weights + masks, as stored
    for p in best.params:  # still exactly zero after two epochs of AdamW
        assert p.tensor[~best.as_dict()[p.name]].eq(0).all()
    again = run(text_config(hf_folder, "magnitude", 0.5), root, data_dir=data_root)
    assert again.run_id == pruned.run_id and again.final_test_acc == pruned.final_test_acc  # stored, not rerun


def test_gradient_criteria_score_the_encoder_on_tokenized_text(tmp_path, hf_folder, data_root):
    n = sum(p.tensor.numel() for p in pk.prunable_params(text_classifier(hf_folder, 2)))
    with pytest.warns(UserWarning, match="layer collapse"):  # SNIP empties query/key of this random tiny BERT
        rec = run(text_config(hf_folder, "snip", 0.7, epochs=1), tmp_path / "runs", data_dir=data_root)
    assert rec.achieved_sparsity == pytest.approx(1 - round(0.3 * n) / n, abs=1e-12)  # exact kept count


def test_linear_probe_trains_the_head_only(tmp_path, hf_folder, data_root):
    torch.manual_seed(0)
    m = text_classifier(hf_folder, 2)
    assert head_name(m) == "head"
    trainable = freeze_backbone(m)
    assert trainable == "head"
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    m.train()
    backbone_eval(m, "head")
    assert not m.encoder.training and m.head.training and m.training
    rec = run(text_config(hf_folder, freeze="backbone"), tmp_path / "runs", data_dir=data_root)
    assert rec.final_test_acc > 0.6


def test_probe_keeps_backbone_weights_and_bn_statistics():
    from prunekit.train import Trainer, TrainConfig

    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=3, input_shape=(3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, freeze="backbone", progress=False)
    Trainer(model, cfg, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]).fit()
    after = model.state_dict()
    head = head_name(model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [f"{head}.bias", f"{head}.weight"]  # BN running statistics included: untouched


def test_probe_needs_a_head():
    with pytest.raises(PrunekitError, match="no Linear layer"):
        freeze_backbone(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))


@pytest.mark.slow
def test_published_efficientnet_weights_load_in_a_run(tmp_path):
    from prunekit.models.fetch import EFFICIENTNET_LITE0, asset_path

    try:
        asset_path(EFFICIENTNET_LITE0)
    except PrunekitError:
        pytest.skip("EfficientNet-Lite0 weights not fetched (prunekit models fetch efficientnet_lite0)")
    from prunekit.experiments.pretrained import build_model
    from prunekit.models import load_published

    cfg = {"model": {"name": "efficientnet_lite0", "pretrained": {"source": "zoo"}},
           "data": {"name": "synthetic", "channels": None}}
    r = resolve_run(cfg)
    splits = load_dataset("synthetic", input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(0)
    built = build_model(r, splits, None)
    torch.manual_seed(0)
    ref = get_model("efficientnet_lite0", num_classes=10, input_shape=(3, 32, 32))
    left = load_published("efficientnet_lite0", ref)
    assert left == ["fc.weight", "fc.bias"]
    for (k, a), (_, b) in zip(built.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_downstream_report_compares_with_dense_and_scratch(tmp_path, hf_folder, data_root):
    from prunekit.experiments.downstream import downstream_data, downstream_report

    root = tmp_path / "runs"
    recs = {}
    for seed in (0, 1):
        recs[("none", seed)] = run({**text_config(hf_folder), "seed": seed}, root, data_dir=data_root)
        recs[("magnitude", seed)] = run({**text_config(hf_folder, "magnitude", 0.9), "seed": seed}, root,
                                        data_dir=data_root)
    scratch = text_config(hf_folder)
    scratch["model"]["pretrained"]["init"] = "random"
    recs[("scratch", 0)] = run(scratch, root, data_dir=data_root)
    with Store(root / "results.sqlite", readonly=True) as st:
        runs = st.runs()
        (d,) = downstream_data(st, runs)  # the scratch run joins the pretrained ones' comparison
        epochs = {r.run_id: st.epochs(r.run_id) for r in recs.values()}
        text = downstream_report(st, runs)
    dense = [100 * recs[("none", s)].final_test_acc for s in (0, 1)]
    assert d["dense"]["mean"] == pytest.approx(sum(dense) / 2)
    assert d["scratch"]["mean"] == pytest.approx(100 * recs[("scratch", 0)].final_test_acc)
    assert d["methods"] == ["magnitude"] and d["sparsities"] == [0.9]
    target = sum(dense) / 2 - 1.0
    firsts = []
    for s in (0, 1):  # the first epoch (1-based) whose test accuracy reaches dense - 1 point, by a plain loop
        hit = [e["epoch"] + 1 for e in epochs[recs[("magnitude", s)].run_id] if 100 * e["test_acc"] >= target]
        firsts.append(min(hit) if hit else None)
    ok = [f for f in firsts if f is not None]
    assert d["epochs"][("magnitude", 0.9)] == ((sum(ok) / len(ok)) if ok else None, len(ok), 2)
    assert "pretraining is worth" in text and "dense from scratch" in text


def test_heads_and_neurons_pruned_in_a_text_run_shrink_and_save(tmp_path, hf_folder, data_root):
    from prunekit.structured.archive_hf import load_shrunk_hf

    rec = run(text_config(hf_folder, "filter_l1", 0.5, epochs=1), tmp_path / "runs", data_dir=data_root)
    s = rec.structured
    assert s is not None and s["params_shrunk"] < s["params_dense"] and s["macs_ratio"] < 1.0
    enc = load_shrunk_hf(rec.run_dir + "/shrunk_encoder")  # per-layer head / neuron counts, no code loaded
    assert sum(p.numel() for p in enc.parameters()) < sum(
        p.numel() for p in text_classifier(hf_folder, 2).encoder.parameters())


def test_prune_a_fine_tuned_encoder_without_fine_tuning(tmp_path, hf_folder, data_root):
    """A run of a fine-tuned text model as the starting point (model.pretrained: its config): the same encoder and
    tokenizer, its weights, pruned and evaluated with no further training."""
    import yaml

    root = tmp_path / "runs"
    dense_cfg = tmp_path / "dense.yaml"
    dense_cfg.write_text(yaml.safe_dump(text_config(hf_folder)))
    cfg = text_config(hf_folder, "magnitude", 0.3, epochs=0)
    cfg["model"] = {"pretrained": str(dense_cfg)}
    r = resolve_run(cfg)
    assert r.model.name == "hf:" + hf_folder.name
    rec = run(cfg, root, data_dir=data_root)
    dense = run(text_config(hf_folder), root, data_dir=data_root)  # already there: run first as the start
    assert dense.cached and rec.achieved_sparsity == pytest.approx(0.3, abs=1e-3)
    assert rec.final_test_acc > 0.8  # a 30%-pruned fine-tuned encoder still separates the topics, untrained
    bad = dict(cfg, model={"name": "resnet20", "pretrained": str(dense_cfg)})
    with pytest.raises(ConfigError, match="model.name"):
        resolve_run(bad)
