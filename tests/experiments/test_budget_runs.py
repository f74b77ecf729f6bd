"""A compute budget in the experiment harness: ``prune: {method: pfp, macs: 0.5}`` (or ``speedup: 2``,
``latency: 0.5``) instead of a sparsity resolves to a one-shot run whose schedule hands pk.prune a Budget, and the
run records the MACs it reached."""
import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.experiments import config as C
from prunekit.flops import layer_positions, macs
from prunekit.flops_target import Budget
from prunekit.models import get_model
from prunekit.schedules import OneShot, PruningCallback
from tiny import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**prune):
    """The shared tiny experiment (tests/tiny.py) with this prune section."""
    return tiny("budget", prune=prune)


BASE = cfg(method="pfp", macs=0.5, sample_size=4)


def test_a_budget_resolves_to_a_one_shot_budget_run():
    r = C.resolve_run(BASE)
    p = r.prune
    assert p.sparsity is None and p.budget == Budget("macs", 0.5) and p.options.rounds == 1
    assert p.schedule() == OneShot(Budget("macs", 0.5), at_epoch=0)
    assert p.to_dict()["budget"] == {"cost": "macs", "fraction": 0.5, "batch": 1, "tol": None, "max_sparsity": 0.999}
    assert r.to_dict() == C.resolve(BASE)
    kw = p.prune_kwargs()
    assert not {"macs", "speedup", "latency", "budget", "sparsity"} & set(kw) and kw["sample_size"] == 4
    # the same budget said two ways is one run; another budget is another run
    assert C.resolve_run(cfg(method="pfp", speedup=2, sample_size=4)).id == r.id
    assert C.resolve_run(cfg(method="pfp", macs=0.4, sample_size=4)).id != r.id
    lat = C.resolve_run(cfg(method="filter_l1", latency=0.5, latency_batch=64, budget_tol=0.03, warmup=1)).prune
    assert lat.budget == Budget("latency", 0.5, batch=64, tol=0.03) and lat.schedule().at_epoch == 1


@pytest.mark.parametrize("prune, match", [
    ({"method": "pfp", "macs": 0.5, "sparsity": 0.5}, "prune.sparsity' does not combine"),
    ({"method": "pfp", "speedup": 2, "density": 0.5}, "prune.density' does not combine"),
    ({"method": "pfp", "macs": 0.5, "gradual": {"start": 0, "end": 0}}, "prune.gradual' does not combine"),
    ({"method": "pfp", "macs": 0.5, "cascade": {"ratios": [0.5]}}, "prune.cascade' does not combine"),
    ({"method": "magnitude", "macs": 0.5, "pattern": "2:4"}, "prune.pattern"),
    ({"method": "pfp", "macs": 0.5, "rounds": 3}, "prune.rounds"),
    ({"method": "pfp", "macs": 0.5, "speedup": 2}, "one budget"),
    ({"method": "pfp", "macs": 2}, r"\(0, 1\]"),
    ({"method": "pfp", "latency_batch": 8}, "belongs to a budget"),
    ({"method": "magnitude", "latency": 0.5}, "structured method"),
    ({"method": "lth", "macs": 0.5}, "field 'prune.macs' does not apply to 'lth'"),
    ({"method": "pfp", "macs": 0.5, "sample_sise": 4}, "did you mean 'sample_size'"),
])
def test_bad_budget_sections_are_config_errors(prune, match):
    with pytest.raises(ConfigError, match=match):
        C.resolve_run(cfg(**prune))


class _Trainer:
    """The parts of the Trainer that PruningCallback uses."""

    def __init__(self, model):
        self.model, self.masks = model, None

    def set_masks(self, masks, final=False):
        self.masks = masks

    def log_prune_event(self, masks, epoch):
        pass


@pytest.mark.parametrize("method", ["filter_l1", "pfp"])
def test_the_schedule_prunes_to_the_budget(method):
    """The resolved run's own schedule and options, through the harness's PruningCallback: the shrunk model has
    half the dense MACs (within 1%), and the event (which the run record keeps as prune_events) says so."""
    import prunekit as pk

    r = C.resolve_run(cfg(method=method, macs=0.5, **({"sample_size": 4} if method == "pfp" else {})))
    torch.manual_seed(0)
    model = get_model("lenet_300_100", num_classes=10, input_shape=(1, 8, 8)).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    data = [(x, torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2)))]
    cb = PruningCallback(r.prune.schedule(), r.prune.method, data=lambda step: data, **r.prune.prune_kwargs())
    trainer = _Trainer(model)
    cb.on_epoch_begin(trainer, 0)
    [event] = cb.events
    dense = macs(layer_positions(model))
    got = macs(layer_positions(pk.shrink(model, trainer.masks, x[:2]))) / dense
    assert abs(got - 0.5) <= 0.005 and event["hit"]
    assert event["macs_fraction"] == pytest.approx(got, rel=1e-9) and event["speedup"] == pytest.approx(1 / got)
    assert event["achieved_sparsity"] == pytest.approx(trainer.masks.sparsity())
    assert event["budget"]["cost"] == "macs" and event["epoch"] == 0


def test_a_budget_run_runs_and_records_its_macs(tmp_path):
    from prunekit.experiments import run

    rec = run(cfg(method="filter_l1", macs=0.5), tmp_path)
    [event] = rec.prune_events
    assert event["hit"] and abs(event["macs_fraction"] - 0.5) <= 0.005
    assert rec.structured["macs_ratio"] == pytest.approx(event["macs_fraction"], rel=1e-6)
    assert rec.sparsity == pytest.approx(rec.achieved_sparsity)
