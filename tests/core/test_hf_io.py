"""Hugging Face models in and out as data only (prunekit.hf): a pruned model written as safetensors + config reloads
with transformers' own from_pretrained as the pruned model; masks come back; pickled weights are refused."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.hf import MASKS_FILE, load_hf, load_hf_masks, save_hf  # noqa: E402

from test_hf_models import bert_batches, tiny_bert  # noqa: E402


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                          for b in batches])


def test_pruned_model_round_trips_through_from_pretrained(tmp_path):
    model = tiny_bert()
    masks = pk.prune(model, "magnitude", sparsity=0.6)
    data = bert_batches()
    want = _logits(model, data)
    out = save_hf(model, tmp_path / "pruned", masks)
    assert (out / "model.safetensors").is_file() and (out / MASKS_FILE).is_file()
    assert not list(out.glob("*.bin")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()  # transformers alone
    assert torch.equal(_logits(again, data), want)
    assert pk.sparsity(again) == masks.sparsity() == pytest.approx(0.6, abs=1e-4)  # the zeros are stored
    back = load_hf_masks(out, again)
    assert back.as_dict().keys() == masks.as_dict().keys()
    assert all(torch.equal(back.as_dict()[n], masks.as_dict()[n]) for n in back.as_dict())
    # and through prunekit's loader, which reads safetensors only
    mine = load_hf(out, task="sequence-classification").eval()
    assert torch.equal(_logits(mine, data), want)


def test_save_replaces_an_existing_folder_whole(tmp_path):
    model = tiny_bert()
    out = save_hf(model, tmp_path / "m")
    (out / "stale.txt").write_text("old")
    masks = pk.prune(model, "random", sparsity=0.5)
    save_hf(model, out, masks)
    assert not (out / "stale.txt").exists() and load_hf_masks(out, load_hf(out, "sequence-classification")) is not None


def test_pickled_weights_and_bad_folders_are_refused(tmp_path):
    model = tiny_bert()
    out = save_hf(model, tmp_path / "m")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(PrunekitError, match="pickled weights, which prunekit never loads"):
        load_hf(out)
    with pytest.raises(PrunekitError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(PrunekitError, match="unknown task"):
        load_hf(out, task="vision")
    with pytest.raises(PrunekitError, match="needs a transformers model"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "m2").mkdir()
    save_hf(model, tmp_path / "m2")
    (tmp_path / "m2" / MASKS_FILE).write_bytes(b"junk")
    with pytest.raises(PrunekitError, match="not a readable safetensors file"):
        load_hf_masks(tmp_path / "m2", model)


@pytest.mark.slow
def test_real_minilm_loads_from_the_fetched_folder():
    from prunekit.errors import DatasetMissingError
    from prunekit.models.fetch import minilm_path

    try:
        path = minilm_path()
    except DatasetMissingError as e:
        pytest.skip(str(e))
    model = load_hf(path).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    batch = tok(["pruning keeps what matters", "a cat sat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    emb = (h * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum(1, keepdim=True)
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
    names = [p.name for p in pk.prunable_params(model)]
    assert len(names) == 36 and all(n.startswith("encoder.layer.") for n in names)  # 6 blocks x 6 Linear
