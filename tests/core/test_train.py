"""Tests for prunekit.train: config validation, schedules, masked training, checkpoints/resume, callbacks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.checkpoint import load_checked
import prunekit
from prunekit.errors import ConfigError, PrunekitError
from prunekit.train import Callback, Trainer, TrainConfig, build_optimizer, build_scheduler
from prunekit.typed import from_dict

D, C = 12, 3


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------ helpers
def make_data(n: int, seed: int = 0, d: int = D, c: int = C):
    """A linearly separable problem: y = argmax(x @ W)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, c, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, d, generator=g)
    return x, (x @ w).argmax(1)


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, C))


class ShuffleLoader:
    """Batches in an order that is a function of (seed, epoch) only, like prunekit.data.TensorLoader."""

    def __init__(self, x, y, batch_size: int, seed: int = 0):
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0
        self.device = x.device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.x), generator=g)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def cfg_(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.05, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


class PruneAt(Callback):
    """Prunes to ``sparsity`` by magnitude at the start of epoch ``at``; remembers it across resume."""

    def __init__(self, at: int, sparsity: float = 0.8):
        self.at, self.sparsity, self.done = at, sparsity, False

    def on_epoch_begin(self, trainer, epoch):
        if epoch == self.at and not self.done:
            masks = prunekit.prune(trainer.model, "magnitude", sparsity=self.sparsity)
            trainer.set_masks(masks)
            self.done = True

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, d):
        self.done = d["done"]


class Interrupted(Exception):
    pass


class StopAt(Callback):
    """Raises at the start of epoch ``at`` (simulates a killed run); ``at=None`` never stops."""

    def __init__(self, at=None):
        self.at = at

    def on_epoch_begin(self, trainer, epoch):
        if epoch == self.at:
            raise Interrupted


def pruned_entries(trainer):
    params = dict(trainer.model.named_parameters())
    return [(params[n], m) for n, m in trainer.masks.items()]


# ------------------------------------------------------------------------------------------------------- config
def test_config_from_dict_and_validation():
    cfg = from_dict(TrainConfig, {"optimizer": "adamw", "lr": 1, "betas": [0.8, 0.9], "grad_clip": 2})
    assert cfg.lr == 1.0 and cfg.betas == (0.8, 0.9) and cfg.grad_clip == 2.0
    bad = [
        {"lr": 0}, {"lr": -1.0}, {"epochs": -1}, {"label_smoothing": 1.0}, {"label_smoothing": -0.1},
        {"lr_schedule": "multistep", "milestones": [5, 5]}, {"lr_schedule": "multistep", "milestones": [6, 3]},
        {"lr_schedule": "multistep"}, {"milestones": [3]}, {"betas": [0.9]}, {"grad_clip": 0},
        {"optimizer": "adam", "nesterov": True}, {"nesterov": True, "momentum": 0.0}, {"lr_step_every": 0},
        {"checkpoint_every": -1}, {"weight_decay": -1e-4}, {"gamma": 0}, {"device": "nonsense"},
    ]
    for d in bad:
        with pytest.raises(ConfigError):
            from_dict(TrainConfig, d, "train")
    with pytest.raises(ConfigError, match="train.milestones"):
        from_dict(TrainConfig, {"lr_schedule": "multistep", "milestones": [3, 2]}, "train")


# ------------------------------------------------------------------------------------------------- LR schedules
@pytest.mark.parametrize("kw,formula", [
    (dict(lr_schedule="constant"), lambda e: 0.1),
    (dict(lr_schedule="multistep", milestones=(2, 5), gamma=0.1), lambda e: 0.1 * 0.1 ** ((e >= 2) + (e >= 5))),
    (dict(lr_schedule="cosine"), lambda e: 0.1 * 0.5 * (1 + math.cos(math.pi * e / 8))),
    (dict(lr_schedule="exponential", gamma=0.5, lr_step_every=1), lambda e: 0.1 * 0.5 ** e),
    (dict(lr_schedule="exponential", gamma=0.5, lr_step_every=3), lambda e: 0.1 * 0.5 ** (e // 3)),
])
def test_lr_schedules_per_epoch(kw, formula):
    cfg = cfg_(epochs=8, lr=0.1, **kw)
    opt = build_optimizer(cfg, make_model())
    sched = build_scheduler(cfg, opt)
    for e in range(cfg.epochs):
        assert opt.param_groups[0]["lr"] == pytest.approx(formula(e), rel=1e-12, abs=1e-15), e
        opt.step()
        sched.step()


def test_trainer_records_epoch_lr_independent_of_steps_per_epoch():
    x, y = make_data(64)
    for bs in (8, 32):  # steps per epoch must not change the schedule
        cfg = cfg_(epochs=6, lr=0.1, lr_schedule="multistep", milestones=(2, 4), gamma=0.5)
        hist = Trainer(make_model(), cfg, batches(x, y, bs)).fit()
        assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


# ----------------------------------------------------------------------------------------------- masked training
@pytest.mark.parametrize("kw", [
    dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(optimizer="adam", lr=1e-2, weight_decay=5e-4),
    dict(optimizer="adamw", lr=1e-2, weight_decay=5e-2, grad_clip=1.0),
])
def test_pruned_weights_and_optimizer_state_stay_zero(kw):
    x, y = make_data(160)
    checked = []

    class Check(Callback):
        def on_batch_end(self, trainer, step, loss):
            if trainer.masks is None:
                return
            for p, m in pruned_entries(trainer):
                assert torch.count_nonzero(p.detach()[~m]) == 0
            checked.append(step)

    pr = PruneAt(1)
    trainer = Trainer(make_model(), cfg_(epochs=11, **kw), batches(x, y, 8), callbacks=[pr, Check()])
    hist = trainer.fit()
    assert len(checked) == 200  # epochs 1..10 x 20 steps after pruning at the start of epoch 1
    assert trainer.masks.sparsity() == pytest.approx(0.8, abs=0.01)
    assert hist[0]["sparsity"] == 0.0 and hist[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    n_state = 0
    for p, m in pruned_entries(trainer):
        assert torch.count_nonzero(p.detach()[~m]) == 0
        assert torch.count_nonzero(p.detach()[m]) > 0.9 * m.sum()  # kept weights still train
        for name, v in trainer.optimizer.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert torch.count_nonzero(v[~m]) == 0, name
                n_state += 1
    assert n_state >= 3  # momentum buffers / exp_avg + exp_avg_sq were checked
    assert trainer.optimizer.param_groups[0]["weight_decay"] == kw["weight_decay"]  # default: decay stays on


def test_masks_given_at_construction_and_wrong_model():
    x, y = make_data(64)
    model = make_model()
    masks = prunekit.prune(model, "magnitude", sparsity=0.5)
    trainer = Trainer(model, cfg_(epochs=2, weight_decay=1e-3), batches(x, y, 16), masks=masks)
    trainer.fit()
    for p, m in pruned_entries(trainer):
        assert torch.count_nonzero(p.detach()[~m]) == 0
    other = prunekit.prune(make_model(1), "magnitude", sparsity=0.5)
    with pytest.raises(PrunekitError):
        trainer.set_masks(other)


def test_weight_decay_off_after_prune_persists_across_resume(tmp_path):
    x, y = make_data(64)
    seen = {}

    class Record(Callback):
        def on_train_begin(self, trainer):
            seen.setdefault("begin", []).append(trainer.optimizer.param_groups[0]["weight_decay"])

        def on_epoch_end(self, trainer, epoch, metrics):
            seen[epoch] = [g["weight_decay"] for g in trainer.optimizer.param_groups]

    cfg = cfg_(epochs=3, weight_decay=5e-4, weight_decay_after_prune=False)
    t1 = Trainer(make_model(), cfg, batches(x, y, 16), callbacks=[PruneAt(1), Record(), StopAt(2)], run_dir=tmp_path)
    with pytest.raises(Interrupted):
        t1.fit()
    assert seen[0] == [5e-4] and seen[1] == [0.0]
    t2 = Trainer(make_model(5), cfg, batches(x, y, 16), callbacks=[PruneAt(1), Record(), StopAt()], run_dir=tmp_path)
    assert t2.optimizer.param_groups[0]["weight_decay"] == 5e-4  # fresh optimizer before resume
    t2.fit()
    assert seen["begin"] == [5e-4, 0.0]
    assert seen[2] == [0.0]
    assert t2.optimizer.param_groups[0]["weight_decay"] == 0.0 and t2._wd_off


# ------------------------------------------------------------------------------------------------------- losses
def test_label_smoothing_loss_and_step():
    x, y = make_data(32)
    model = make_model()
    ref = copy.deepcopy(model)
    cfg = cfg_(epochs=1, lr=0.1, momentum=0.0, label_smoothing=0.2)
    hist = Trainer(model, cfg, [(x, y)]).fit()
    expected = F.cross_entropy(ref(x), y, label_smoothing=0.2)
    assert hist[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(F.cross_entropy(ref(x), y).item(), rel=1e-3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    expected.backward()
    opt.step()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_evaluate_matches_hand_loop():
    x, y = make_data(250, seed=3)
    model = make_model(dropout=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    trainer = Trainer(model, cfg_(), batches(x, y, 50))
    model.train()
    loss, acc = trainer.evaluate(loader)
    assert model.training  # mode restored
    model.eval()
    tot, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in loader:
            out = model(xb)
            tot += F.cross_entropy(out, yb, reduction="sum").item()
            correct += (out.argmax(1) == yb).sum().item()
    assert loss == pytest.approx(tot / 250, rel=1e-5)
    assert acc == correct / 250


def test_learns_separable_problem():
    x, y = make_data(1200, seed=1)
    xv, yv = make_data(400, seed=2)
    cfg = cfg_(epochs=10, optimizer="adam", lr=1e-2, lr_schedule="cosine")
    trainer = Trainer(make_model(), cfg, ShuffleLoader(x, y, 32), val_data=batches(xv, yv, 200),
                      test_data=batches(xv, yv, 400))
    hist = trainer.fit()
    assert hist[-1]["val_acc"] > 0.9 and hist[-1]["train_acc"] > 0.9
    s = trainer.summary()
    assert s["epochs"] == 10 and s["best_val_acc"] == max(h["val_acc"] for h in hist)
    assert s["final_test_acc"] == hist[-1]["test_acc"] and s["train_seconds"] > 0


# ---------------------------------------------------------------------------------------------- checkpoints
def _run(run_dir, loader_kind, stop_at=None, model_seed=0, epochs=4):
    x, y = make_data(96)
    xv, yv = make_data(40, seed=7)
    if loader_kind == "set_epoch":
        train = ShuffleLoader(x, y, 16, seed=11)
    else:  # torch DataLoader: shuffle order drawn from the global RNG, restored on resume
        train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    cfg = cfg_(epochs=epochs, lr=0.05, nesterov=True, weight_decay=5e-4, lr_schedule="cosine", grad_clip=5.0)
    trainer = Trainer(make_model(model_seed, dropout=0.2), cfg, train, val_data=batches(xv, yv, 20),
                      test_data=[(xv, yv)], callbacks=[PruneAt(1, 0.7), StopAt(stop_at)], run_dir=run_dir, seed=3)
    return trainer


def _strip(hist):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]


@pytest.mark.parametrize("loader_kind", ["set_epoch", "dataloader"])
def test_resume_is_exact(tmp_path, loader_kind):
    straight = _run(tmp_path / "a", loader_kind)
    hist_a = straight.fit()

    first = _run(tmp_path / "b", loader_kind, stop_at=2)
    with pytest.raises(Interrupted):
        first.fit()
    assert len(first.history) == 2
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    resumed = _run(tmp_path / "b", loader_kind, model_seed=42)  # different init: everything comes from last.pt
    hist_b = resumed.fit()

    assert _strip(hist_a) == _strip(hist_b)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert {n: torch.equal(m, resumed.masks[n]) for n, m in straight.masks.items()} == \
        {n: True for n in straight.masks}
    assert straight.global_step == resumed.global_step == 4 * 6
    assert straight.summary() | {"train_seconds": 0} == resumed.summary() | {"train_seconds": 0}


def test_finished_run_is_a_noop_and_checkpoint_format(tmp_path):
    trainer = _run(tmp_path, "set_epoch", epochs=2)
    hist = trainer.fit()
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ck = load_checked(tmp_path / "last.pt", map_location="cpu")
    assert ck["epoch"] == 2 and ck["global_step"] == 12 and ck["masks"] is not None
    assert {"model", "optimizer", "scheduler", "rng", "callbacks", "history", "best", "weight_decay_off"} <= set(ck)
    assert ck["callbacks"][0] == {"class": "PruneAt", "state": {"done": True}}

    calls = []

    class Spy(Callback):
        def on_train_begin(self, trainer):
            calls.append("begin")

        def on_batch_end(self, trainer, step, loss):
            calls.append(step)

    again = _run(tmp_path, "set_epoch", model_seed=5, epochs=2)
    again.callbacks[1] = StopAt(0)  # would raise if any epoch ran
    assert again.fit() == hist
    assert calls == [] and again.global_step == 12
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, final[k]), k
    # a different set of callbacks cannot silently resume
    bad = Trainer(make_model(), cfg_(epochs=2), [(torch.zeros(1, D), torch.zeros(1, dtype=torch.long))],
                  callbacks=[Spy()], run_dir=tmp_path)
    with pytest.raises(PrunekitError, match="callbacks"):
        bad.fit()


def test_best_checkpoint(tmp_path):
    x, y = make_data(96)
    xv, yv = make_data(40, seed=7)
    states, best_seen = {}, []

    class Snap(Callback):
        def on_epoch_begin(self, trainer, epoch):
            best_seen.append(trainer.best_epoch)

        def on_epoch_end(self, trainer, epoch, metrics):
            states[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    cfg = cfg_(epochs=5, lr=0.5, momentum=0.9)  # large lr: val accuracy is not monotone
    trainer = Trainer(make_model(), cfg, batches(x, y, 16), val_data=[(xv, yv)], test_data=[(xv, yv)],
                      callbacks=[PruneAt(2, 0.6), Snap()], run_dir=tmp_path)
    hist = trainer.fit()
    # best over the epochs trained under the final masks only (pruned at the start of epoch 2)
    assert best_seen[0] is None and best_seen[1] in (0, 1) and best_seen[2] is None  # set_masks restarted tracking
    best = max(range(2, 5), key=lambda e: (hist[e]["val_acc"], -e))
    s = trainer.summary()
    assert s["best_epoch"] == best and s["best_val_acc"] == hist[best]["val_acc"]
    assert s["test_acc_at_best_val"] == hist[best]["test_acc"]
    fresh = make_model(9)
    masks = prunekit.load(tmp_path / "best.pt", fresh)
    assert masks is not None and masks.sparsity() == pytest.approx(0.6, abs=0.01)
    assert all(torch.equal(m, trainer.masks[n]) for n, m in masks.items())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, states[best][k]), k

    # no validation data: best = last epoch
    t2 = Trainer(make_model(), cfg_(epochs=3), batches(x, y, 32), callbacks=[PruneAt(1)], run_dir=tmp_path / "nv")
    t2.fit()
    assert t2.summary()["best_epoch"] == 2
    fresh = make_model(9)
    masks = prunekit.load(tmp_path / "nv" / "best.pt", fresh)
    assert masks is not None and masks.sparsity() == pytest.approx(0.8, abs=0.01)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k


def test_checkpoint_every(tmp_path):
    x, y = make_data(32)
    saved = []

    class Peek(Callback):
        def on_epoch_begin(self, trainer, epoch):
            p = tmp_path / "last.pt"
            saved.append(load_checked(p)["epoch"] if p.exists() else None)

    Trainer(make_model(), cfg_(epochs=5, checkpoint_every=2), batches(x, y, 16), callbacks=[Peek()],
            run_dir=tmp_path).fit()
    assert saved == [None, None, 2, 2, 4]
    assert load_checked(tmp_path / "last.pt")["epoch"] == 5  # and at the end
    Trainer(make_model(), cfg_(epochs=2, checkpoint_every=0), batches(x, y, 16), run_dir=tmp_path / "never").fit()
    assert not (tmp_path / "never" / "last.pt").exists()


# ------------------------------------------------------------------------------------------------------ callbacks
def test_callback_order():
    x, y = make_data(32)
    calls = []

    class Rec(Callback):
        def on_train_begin(self, trainer):
            calls.append(("train_begin",))

        def on_epoch_begin(self, trainer, epoch):
            calls.append(("epoch_begin", epoch, trainer.epoch))

        def on_batch_end(self, trainer, step, loss):
            assert torch.is_tensor(loss) and loss.dim() == 0
            calls.append(("batch", step))

        def on_epoch_end(self, trainer, epoch, metrics):
            assert set(metrics) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                                    "test_acc", "seconds", "sparsity"}
            assert metrics["val_acc"] is not None and metrics["test_acc"] is None
            calls.append(("epoch_end", epoch, metrics["epoch"], len(trainer.history)))

        def on_train_end(self, trainer):
            calls.append(("train_end",))

    lines = []
    Trainer(make_model(), cfg_(epochs=3, progress=True), batches(x, y, 16), val_data=[(x, y)], callbacks=[Rec()],
            log=lines.append).fit()
    expected = [("train_begin",)]
    for e in range(3):
        expected += [("epoch_begin", e, e), ("batch", 2 * e), ("batch", 2 * e + 1), ("epoch_end", e, e, e)]
    expected.append(("train_end",))
    assert calls == expected
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3") and "val" in lines[0]


def test_progress_off_is_silent(capsys):
    x, y = make_data(32)
    lines = []
    Trainer(make_model(), cfg_(epochs=1, progress=False), batches(x, y, 16), log=lines.append).fit()
    assert lines == [] and capsys.readouterr().err == ""


def test_live_bar_on_tty(monkeypatch):
    import io
    import sys

    class TTY(io.StringIO):
        def isatty(self):
            return True

    err = TTY()
    monkeypatch.setattr(sys, "stderr", err)
    x, y = make_data(64)
    lines = []
    Trainer(make_model(), cfg_(epochs=2, progress=True), ShuffleLoader(x, y, 16), log=lines.append).fit()
    out = err.getvalue()
    assert "\r" in out and "4/4" in out and "loss" in out
    assert len(lines) == 2
