"""The typed resolved run (issue 15): resolve_run's fields are typed, its plain form is resolve's, the method's kind
picks the protocol, and a run resolves its starting points once."""
import types

import pytest
import torch
import yaml

import prunekit as pk
from prunekit.experiments import config as C, run
from prunekit.errors import ConfigError
from prunekit.experiments.resolved import PretrainedFile, PretrainedRun, ResolvedRun
from prunekit.prune import PruneOptions
from prunekit.schedules import Gradual, OneShot
from prunekit.train import TrainConfig

BASE = {
    "name": "typed",
    "model": "lenet_300_100",
    "data": {"name": "synthetic"},
    "train": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False},
    "prune": {"method": "magnitude", "sparsity": 0.8, "warmup": 1, "scope": "layer"},
    "seed": 2,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fields_are_typed_and_the_plain_form_is_resolve():
    r = C.resolve_run(BASE)
    assert isinstance(r, ResolvedRun) and isinstance(r.train, TrainConfig) and r.train.epochs == 3
    assert isinstance(r.prune.options, PruneOptions) and r.prune.options.scope == "layer"
    assert r.prune.options.seed == 2  # the mask generator follows the run's seed
    assert isinstance(r.prune.method_options, pk.get_method("magnitude").options)
    assert r.prune.schedule() == OneShot(0.8, at_epoch=1)
    assert r.to_dict() == C.resolve(BASE)
    assert r.id == C.run_id(C.resolve(BASE)) == C.run_id(r)
    with pytest.raises(AttributeError):
        r.seed = 3  # frozen


def test_gradual_is_a_schedule_to_the_target():
    data = {**BASE, "prune": {"method": "magnitude", "sparsity": 0.9, "gradual": {"start": 0, "freq": 1, "end": 2}}}
    p = C.resolve_run(data).prune
    assert isinstance(p.gradual, Gradual) and p.gradual.target_sparsity == 0.9 and p.schedule() is p.gradual
    assert "target_sparsity" not in C.resolve(data)["prune"]["gradual"]


@pytest.mark.parametrize("prune, kind, protocol", [
    ({"method": "none"}, "dense", "schedule"),
    ({"method": "magnitude", "sparsity": 0.5}, "one-shot", "schedule"),
    ({"method": "lth", "levels": 2}, "levels", "levels"),
    ({"method": "magnitude", "cascade": {"ratios": [0.5, 0.25]}}, "one-shot", "cascade"),
])
def test_the_methods_kind_picks_the_protocol(prune, kind, protocol):
    p = C.resolve_run({**BASE, "prune": prune}).prune
    assert (p.kind, p.protocol) == (kind, protocol)
    plain = C.resolve({**BASE, "prune": prune})["prune"]
    assert ("cascade" in plain) == (kind != "levels")  # stored configs keep their fields


def test_a_run_resolves_its_starting_points_once(tmp_path, monkeypatch):
    from prunekit.models import get_model

    torch.manual_seed(3)
    model = get_model("lenet_300_100", num_classes=4, input_shape=(1, 8, 8))
    pk.save(tmp_path / "start.pt", model, None)
    dense = {**BASE, "name": "dense", "model": {"name": "lenet_300_100", "pretrained": str(tmp_path / "start.pt")},
             "train": {**BASE["train"], "epochs": 1}, "prune": {"method": "none"}}
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(dense))
    oneshot = {**BASE, "model": {"name": "lenet_300_100", "pretrained": str(tmp_path / "dense.yaml")},
               "train": {**BASE["train"], "epochs": 0}, "prune": {"method": "magnitude", "sparsity": 0.5}}
    resolved = C.resolve_run(oneshot)
    pre = resolved.model.pretrained
    assert isinstance(pre, PretrainedRun) and isinstance(pre.resolved.model.pretrained, PretrainedFile)
    assert pre.run_id == pre.resolved.id == C.run_id(C.resolve(dense))

    hashed = []
    real = C.hashlib
    monkeypatch.setattr(C, "hashlib", types.SimpleNamespace(sha256=lambda b: hashed.append(len(b)) or real.sha256(b)))
    rec = run(oneshot, tmp_path / "runs", log=lambda m: None)
    assert len(hashed) == 1  # the model file under the starting run, hashed when the run was resolved, not again
    assert rec.run_id == resolved.id and rec.achieved_sparsity == pytest.approx(0.5, abs=1e-4)


def test_a_pattern_implies_the_sparsity_of_a_config():
    r = C.resolve_run({**BASE, "prune": {"method": "magnitude", "pattern": "2:4"}})
    assert r.prune.sparsity == 0.5
    assert C.resolve_run({**BASE, "prune": {"method": "magnitude", "pattern": "4:8", "sparsity": 0.25}}).prune.sparsity \
        == 0.25  # an intermediate level 6:8
    with pytest.raises(ConfigError, match="2:4"):
        C.resolve_run({**BASE, "prune": {"method": "magnitude", "pattern": "2:4", "sparsity": 0.9}})
