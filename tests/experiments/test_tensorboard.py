"""TensorBoard event files: written under the run folder when asked, read back with tensorboard's own reader."""
import pytest

from prunekit.cli import main
from prunekit.experiments import config as C
from prunekit.experiments import run

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"name": "tb", "model": "lenet_300_100", "data": {"name": "synthetic"}, "seed": 0,
       "train": {"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
       "prune": {"method": "snip", "sparsity": 0.8, "warmup": 1}}


def events(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                             reason="the tensorboard extra is not installed (pip install 'prunekit[tensorboard]'; "
                                    ".ci/run installs it)")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_event_files_hold_the_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    rec = run({**CFG, "train": {**CFG["train"], "tensorboard": True}}, tmp_path, log=lambda m: None)
    acc = events(tmp_path / rec.run_id / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "loss/val", "loss/test", "accuracy/train", "accuracy/val", "accuracy/test", "lr",
                "sparsity/global", "sparsity/fc1/weight", "prune/sparsity"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    test_acc = [e.value for e in acc.Scalars("accuracy/test")]
    assert [e.step for e in acc.Scalars("accuracy/test")] == [0, 1]
    assert test_acc[-1] == pytest.approx(rec.final_test_acc, abs=1e-6)
    sp = {e.step: e.value for e in acc.Scalars("sparsity/global")}
    assert sp[0] == 0.0 and sp[1] == pytest.approx(rec.achieved_sparsity, abs=1e-6)  # pruned at epoch 1
    hists = set(acc.Tags()["histograms"])
    assert {"prune/scores/fc1/weight", "prune/weights/fc1/weight"} <= hists
    [alive] = acc.Histograms("prune/weights/fc1/weight")
    [scores] = acc.Histograms("prune/scores/fc1/weight")
    fc1 = {e.step: e.value for e in acc.Scalars("sparsity/fc1/weight")}
    assert alive.step == scores.step == 1
    n = scores.histogram_value.num  # every entry's score: fc1 is (300, input features)
    assert n % 300 == 0 and n > 300
    assert alive.histogram_value.num == round((1 - fc1[1]) * n) < n  # the surviving weights only


def test_off_by_default_and_not_part_of_the_run_id(tmp_path):
    rec = run(CFG, tmp_path, log=lambda m: None)
    assert not (tmp_path / rec.run_id / "tensorboard").exists()
    on = C.resolve({**CFG, "train": {**CFG["train"], "tensorboard": True}})
    assert C.run_id(on) == rec.run_id


def test_cli_flag_turns_it_on(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "prune": {"method": "magnitude", "sparsity": 0.5}}))
    assert main(["run", str(cfg), "--root", str(tmp_path / "r"), "--tensorboard", "--no-report"]) == 0
    [folder] = list((tmp_path / "r").glob("*/tensorboard"))
    assert "loss/train" in events(folder).Tags()["scalars"]


def test_missing_extra_is_a_clear_error(monkeypatch):
    import builtins

    from prunekit.errors import PrunekitError
    from prunekit.train import tensorboard as tb

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[tensorboard\]'"):
        tb.check_available()
