"""The post-prune diagnostics are proportionate: accuracy before fine-tuning on a fixed, recorded subset."""
import pytest
import torch

import prunekit as pk
from prunekit.data import load_dataset, random_subset
from prunekit.experiments import run
from prunekit.experiments import measure
from prunekit.models import get_model
from prunekit.seeding import derive_seed, seed_everything

DATA = {"name": "synthetic"}  # 128 validation and 128 test samples
CFG = {"name": "diag", "model": "lenet_300_100", "data": DATA,
       "train": {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
       "prune": {"method": "magnitude", "sparsity": 0.7, "warmup": 0}, "seed": 3}


def _plain_accuracy(model, split, mean, std, idx) -> float:
    """Accuracy over split[idx], one sample at a time, normalized by hand."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in idx.tolist():
            x = (split.x[i:i + 1].float() - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            correct += int(model(x).argmax(1).item() == int(split.y[i]))
    return correct / len(idx)


def test_before_finetune_accuracy_is_measured_on_a_recorded_fixed_subset(tmp_path, monkeypatch):
    assert measure.DIAGNOSE_SAMPLES == 500
    monkeypatch.setattr(measure, "DIAGNOSE_SAMPLES", 40)  # below this val and test set's 128: both are subsampled
    rec = run(CFG, tmp_path, log=lambda m: None)
    assert rec.before_finetune_samples == {"val": 40, "test": 40}
    ev = rec.prune_events[-1]
    assert ev["diagnostics_seconds"] >= 0.0 and ev["before_samples"] == {"val": 40, "test": 40}
    # the same number from the model as pruning left it (warm-up 0: the seeded initial weights, magnitude masks)
    splits = load_dataset("synthetic")
    seed_everything(3)
    model = get_model("lenet_300_100", num_classes=splits.num_classes, input_shape=tuple(splits.input_shape))
    pk.prune(model, "magnitude", sparsity=0.7)
    for name, split, got in (("val", splits.val, rec.val_acc_before_finetune),
                             ("test", splits.test, rec.test_acc_before_finetune)):
        idx = random_subset(len(split), 40, seed=derive_seed(0, "diagnose", name))
        assert got == pytest.approx(_plain_accuracy(model, split, splits.mean, splits.std, idx), abs=1e-12)


def test_small_sets_are_used_whole_and_one_shot_reuses_the_final_evaluation(tmp_path):
    small = CFG
    rec = run(small, tmp_path, log=lambda m: None)
    assert rec.before_finetune_samples == {"val": 128, "test": 128}
    one_shot = {**small, "train": {**small["train"], "epochs": 0}}
    r0 = run(one_shot, tmp_path, log=lambda m: None)
    assert r0.test_acc_before_finetune == r0.final_test_acc and r0.before_finetune_samples == {"val": 128, "test": 128}
