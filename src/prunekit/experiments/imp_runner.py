"""The IMP experiment: ``lth``, ``sap``, ``ciap``, ``giap`` run from a resolved config (methods/imp.md).

:func:`run_levels` builds the level trainer for :func:`prunekit.families.imp.lottery.run_imp`: every level is a
:class:`prunekit.train.Trainer` run in ``<run_dir>/imp/level_<L>/`` (resumable mid-level), with

- the rewind capture at level 0 (``rewind: step:<k>ep``: the weights after epoch k, written to ``rewind.pt``);
- the stop checks at levels >= 1: every ``chunk_epochs`` epochs the validation accuracy and BOTH flow distances
  (IF and GF, so a fixed-budget ``lth`` run logs what the InCoP rules would have decided) are computed and the
  code's :class:`prunekit.families.imp.incop.StopRule` decides;
- the references of the flow rules: in ``fixed`` mode the trained dense network of level 0 on fixed validation
  batches (its best validation accuracy is acc*); in ``original`` mode the dense network at the rewind point, the
  IF statistic over the training set, the GF statistic from the stale gradient of the last mini-batch, and the
  best warm-up test accuracy (seed 001, defects kept).

Each finished level becomes one row (:func:`level_row`) that the runner stores in the ``levels`` table.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..checkpoint import (CheckpointError, CorruptCheckpointWarning, load_checked, on_corrupt_policy, quarantine,
                          save_checked, sub_owner)
from ..families.imp.codes import DEFAULT_STOP, ImpOptions, rewind_step
from ..data import TensorLoader
from ..families.imp.incop import (StopRule, flow_distance, gradient_flow, gradient_flow_original, information_flow,
                                  pq_level_masks)
from ..families.imp.lottery import run_imp
from ..masks import Masks
from ..params import prunable_params
from ..seeding import generator
from ..train import Callback, Trainer
from ..train.trainer import LAST
from .resolved import ResolvedRun


def flow_batches(splits, opts: ImpOptions, seed: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``flow_batches`` fixed mini-batches of the validation split (seeded draw, eval transform), drawn once."""
    n = min(len(splits.val), opts.flow_batches * opts.flow_batch_size)
    idx = torch.randperm(len(splits.val), generator=generator(seed, "flow_batches"))[:n]
    dl = TensorLoader(splits.val.subset(idx), opts.flow_batch_size, mean=splits.mean, std=splits.std, device=device)
    return list(dl)


class _Checks:
    """The flow statistics of one network state, in the mode's data and definitions."""

    def __init__(self, opts: ImpOptions, batches, train_dl):
        self.o, self.batches, self.train_dl = opts, batches, train_dl

    def stats(self, model, masks) -> dict:
        o = self.o
        if o.stop_mode == "original":
            out = {"if": information_flow(model, self.train_dl, stat="mean", mode="original").tolist()}
            g, n = gradient_flow_original(model, masks, len(self.train_dl))
            out["gf_ref"], out["gf"] = g.tolist(), n.tolist()  # the seed compares n (now) with g (reference)
            return out
        return {"if": information_flow(model, self.batches, stat=o.if_stat).tolist(),
                "gf": gradient_flow(model, masks, self.batches, stat=o.gf_stat).tolist()}


class _RewindCapture(Callback):
    """Level 0 with ``rewind: step:<k>``: save the weights (and, in original mode, the references) after k steps."""

    def __init__(self, k: int, path: Path, on_capture: Callable[[object], dict] | None, owner: str | None = None):
        self.k, self.path, self.on_capture, self.owner = k, path, on_capture, owner

    def on_batch_end(self, trainer, step, loss):
        # under DDP rank 0 decides (its file may already be visible to the others, and on_capture reduces)
        if step == self.k - 1 and not distributed.broadcast_object(self.path.exists()):
            extra = self.on_capture(trainer) if self.on_capture else {}
            state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            save_checked({"state": state, "extra": extra}, self.path, self.owner)


def _check_rewind(rewind_path: Path, last_path: Path, owner: str) -> None:
    """Level 0 captures its rewind weights during training: an untrusted ``rewind.pt`` is moved aside together with
    the level's ``last.pt`` (past the capture point), so the level trains again from scratch and captures anew."""
    if not rewind_path.exists():
        return
    try:
        load_checked(rewind_path, owner)
    except CheckpointError as e:
        if on_corrupt_policy() == "error":
            raise CheckpointError(rewind_path, f"{e.reason}; not resumed (--no-restart-corrupt): move it and "
                                               f"{last_path.name} aside to train level 0 again") from None
        if distributed.is_main():
            kept = quarantine(rewind_path)
            if last_path.exists():
                quarantine(last_path)
        else:
            kept = rewind_path
        warnings.warn(CorruptCheckpointWarning(f"{rewind_path}: {e.reason}; not used (kept as {kept.name}), level 0 "
                                               "trains again from scratch"), stacklevel=2)


class _StopCheck(Callback):
    """Every ``chunk_epochs`` epochs after the level's start: accuracy and flow distances, then the stop rule."""

    def __init__(self, rule: StopRule | None, flow: str | None, checks: _Checks, ref: dict, start: int,
                 chunk: int, use_test: bool):
        self.rule, self.flow, self.checks, self.ref = rule, flow, checks, ref
        self.start, self.chunk, self.use_test = start, chunk, use_test
        self.log: list[dict] = []
        self.seconds = 0.0

    def on_epoch_end(self, trainer, epoch, metrics):
        if (epoch + 1 - self.start) % self.chunk:
            return
        t0 = time.perf_counter()
        cur = self.checks.stats(trainer.model, trainer.masks)
        d_if = flow_distance(cur["if"], self.ref["if"])
        d_gf = flow_distance(cur["gf"], self.ref["gf"])
        acc = metrics["test_acc"] if self.use_test else metrics["val_acc"]
        entry = {"epoch": epoch + 1, "acc": acc, "d_if": d_if, "d_gf": d_gf}
        if self.rule is not None:
            pruned = cur[self.flow] if self.flow else None
            dense = self.ref[self.flow] if self.flow else None
            if trainer.stop_training is False and self.rule.update(epoch + 1, pruned, dense, acc=acc):
                trainer.stop_training = True
            entry["passed"] = self.rule.history[-1]["passed"] if self.rule.history else None
        self.seconds += time.perf_counter() - t0
        self.log.append(entry)

    def state_dict(self):
        rule = None
        if self.rule is not None:
            rule = {k: getattr(self.rule, k) for k in ("chunks", "streak", "history", "stopped_epoch",
                                                       "stopped_chunk", "reason")}
        return {"log": self.log, "seconds": self.seconds, "rule": rule}

    def load_state_dict(self, state):
        self.log, self.seconds = list(state["log"]), float(state["seconds"])
        if self.rule is not None and state["rule"] is not None:
            for k, v in state["rule"].items():
                setattr(self.rule, k, v)


def fit_level(trainer: Trainer) -> dict:
    """Train one level and summarize it: accuracies, epochs, seconds, the LTH early-stop epoch (minimum validation
    loss, found afterwards) with its test accuracy, and the per-epoch history."""
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    s = trainer.summary()
    hist = trainer.history
    out = {k: s[k] for k in ("best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc")}
    out.update(epochs=len(hist), seconds=s["train_seconds"], wall_seconds=wall, early_stop_epoch=None,
               early_stop_test_acc=None, check_seconds=0.0, checks=[], stop_reason="budget", stop_epoch=None,
               history=[{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_acc", "test_acc")} for h in hist])
    if hist:
        es = min(hist, key=lambda h: (h["val_loss"] if h["val_loss"] is not None else float("inf"), h["epoch"]))
        out.update(early_stop_epoch=es["epoch"], early_stop_test_acc=es["test_acc"])
    return out


def level_row(record: dict, branch: str = "main") -> dict:
    """One stored row of a finished level (or control branch) record of
    :func:`prunekit.families.imp.lottery.run_imp`."""
    s = record["summary"] if branch == "main" else record["control"]
    row = {"level": record["level"], "branch": branch, "density": record["density"], "kept": record["kept"],
           "total": record["total"]}
    row.update({k: s.get(k) for k in ("epochs", "seconds", "check_seconds", "stop_reason", "stop_epoch",
                                      "best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc",
                                      "early_stop_epoch", "early_stop_test_acc", "checks")})
    if branch == "main" and record.get("prune"):
        row["prune"] = record["prune"]
    return row


def run_levels(resolved: ResolvedRun, run_dir: Path, splits, loaders_: tuple, device: str,
               model_fn: Callable[..., torch.nn.Module], log: Callable[[str], None],
               on_level: Callable[[dict], None]) -> list[dict]:
    """Run (or resume) the IMP search of a resolved run; returns the records of
    :func:`prunekit.families.imp.lottery.run_imp`."""
    p = resolved.prune
    o: ImpOptions = p.method_options
    common = p.options
    epochs = resolved.train.epochs
    train_fn = _LevelTrainer(resolved, run_dir, splits, loaders_, device, log)

    def remember(record: dict) -> None:  # level 0's summary carries the references (also on resume)
        if record["level"] == 0:
            train_fn.ref.update(record["summary"]["reference"])
        on_level(record)

    lth = p.method == "lth"
    output_fraction = o.output_fraction
    if output_fraction is None and lth and common.scope == "layer":
        output_fraction = o.prune_fraction / 2
    spec = common.param_spec()
    k, spe = train_fn.k, train_fn.steps_per_epoch
    return run_imp(
        model_fn, train_fn, o.levels, run_dir=run_dir / "imp", prune_fraction=o.prune_fraction,
        output_fraction=output_fraction, scope=common.scope,
        rewind=("step", k) if k is not None else o.rewind, train_epochs=epochs, train_steps=epochs * spe,
        control=None if o.control == "none" else o.control, control_seed=o.control_seed,
        control_levels=o.control_levels, prune_rule=None if lth else _pq_rule(o, common.scope),
        rule_config=None if lth else {"rule": "pq", "p": o.p, "q": o.q, "eta": o.eta, "gamma": o.gamma,
                                      "beta": o.beta},
        on_level=remember, masks_fn=lambda model: Masks(model, prunable_params(model, spec)),
        owner=sub_owner(run_dir, run_dir / "imp"),
    )


def _pq_rule(o: ImpOptions, scope: str) -> Callable:
    """The PQ-index pruning rule of sap, ciap and giap (:func:`prunekit.families.imp.incop.pq_level_masks`)."""

    def pq_rule(masks, model, level):
        new, counts = pq_level_masks(masks, model, o.p, o.q, o.eta, o.gamma, o.beta, scope=scope)
        return new, {"n_prune": sum(counts.values()), "fraction": sum(counts.values()) / max(masks.kept(), 1)}

    return pq_rule


class _LevelTrainer:
    """``train_fn`` of :func:`prunekit.families.imp.lottery.run_imp` for an IMP code: trains one level in its folder
    with the rewind capture (level 0) or the stop checks (levels >= 1), and gives level 0 the references of the flow
    rules (``ref``, filled again from level 0's record on resume)."""

    def __init__(self, resolved: ResolvedRun, run_dir: Path, splits, loaders_: tuple, device: str,
                 log: Callable[[str], None]):
        o: ImpOptions = resolved.prune.method_options
        self.o, self.tcfg, self.seed, self.run_dir, self.loaders, self.log = \
            o, resolved.train, resolved.seed, run_dir, loaders_, log
        self.steps_per_epoch = spe = len(loaders_[0])
        self.k = rewind_step(o.rewind, self.tcfg.epochs, spe)  # the rewind point in optimizer steps (None: init / none)
        self.k_epoch, self.k_skip = divmod(self.k or 0, spe)
        self.stop = o.stop or DEFAULT_STOP[resolved.prune.method]
        self.flow = self.stop if self.stop in ("if", "gf") else None
        self.original = o.stop_mode == "original"
        budget_chunks = max(1, -(-(self.tcfg.epochs - self.k_epoch) // o.chunk_epochs))
        self.max_chunks = o.max_chunks or budget_chunks
        batches = flow_batches(splits, o, self.seed, device) if not self.original else None
        self.checks = _Checks(o, batches, loaders_[0])
        self.ref: dict = {}

    def __call__(self, model, masks, level, level_dir, rewind_epoch=None) -> dict:
        level_dir = Path(level_dir)
        owner = sub_owner(self.run_dir, level_dir)
        rewind_path = level_dir / "rewind.pt"
        cbs: list = []
        if level == 0 and rewind_epoch:
            _check_rewind(rewind_path, level_dir / LAST, owner)
            cbs.append(_RewindCapture(rewind_epoch, rewind_path, self._capture if self.original else None, owner))
        checker = self._stop_check() if level >= 1 else None
        if checker is not None:
            cbs.append(checker)
        train_dl, val_dl, test_dl = self.loaders
        trainer = Trainer(model, self.tcfg, train_dl, val_dl, test_dl, callbacks=cbs, run_dir=level_dir,
                          seed=self.seed, masks=masks, log=self.log, owner=owner)
        if level >= 1 and self.k:
            trainer.start_at(self.k_epoch, self.k_skip)
        out = fit_level(trainer)
        if checker is not None:
            rule = checker.rule
            out.update(check_seconds=checker.seconds, checks=checker.log,
                       stop_reason=(rule.reason if rule is not None and rule.reason else "budget"),
                       stop_epoch=rule.stopped_epoch if rule is not None else None)
        if level == 0:
            out["reference"] = self._reference(trainer, rewind_path if rewind_epoch else None, owner)
            if rewind_epoch:
                out["rewind_state"] = load_checked(rewind_path, owner)["state"]
        return out

    def _stop_check(self) -> _StopCheck:
        o, rule = self.o, None
        if self.stop != "fixed":
            rule = StopRule(mode=o.stop_mode, flow=self.flow, epsilon=o.epsilon, patience=o.patience,
                            min_chunks=o.min_chunks, max_chunks=self.max_chunks, acc_guard=o.acc_guard,
                            acc_tol=o.acc_tol, acc_ref=self.ref.get("acc"))
        return _StopCheck(rule, self.flow, self.checks, self.ref, self.k_epoch, o.chunk_epochs,
                          use_test=self.original)

    def _capture(self, trainer) -> dict:
        """Original mode: the references at the rewind point."""
        st = self.checks.stats(trainer.model, trainer.masks if trainer.masks is not None else Masks(trainer.model))
        accs = [h["test_acc"] for h in trainer.history] + [trainer.evaluate(trainer.test_data)[1]]
        return {"if": st["if"], "gf": st["gf_ref"], "acc": max(a for a in accs if a is not None)}

    def _reference(self, trainer, rewind_path: Path | None, owner: str) -> dict:
        """Level 0's references of the flow rules: in original mode those captured at the rewind point (or, when
        rewinding to init, of the trained dense network); otherwise of the trained dense network."""
        if self.original:
            blob = load_checked(rewind_path, owner) if rewind_path is not None else None
            if blob is None:  # rewinding to init: the references of the trained dense network
                st = self.checks.stats(trainer.model, trainer.masks)
                blob = {"extra": {"if": st["if"], "gf": st["gf_ref"],
                                  "acc": max(h["test_acc"] for h in trainer.history)}}
            return blob["extra"]
        st = self.checks.stats(trainer.model, trainer.masks)
        return {"if": st["if"], "gf": st["gf"], "acc": trainer.summary()["best_val_acc"]}
