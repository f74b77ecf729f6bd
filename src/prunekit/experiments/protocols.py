"""How a run goes, by its method's kind (:attr:`prunekit.experiments.resolved.ResolvedPrune.protocol`):

- ``schedule``: one training under :class:`prunekit.train.Trainer`, the masks set at the steps of the schedule
  (once after ``warmup`` epochs, or ``prune.gradual``); the dense baseline trains with no mask;
- ``levels``: an IMP code (lth, sap, ciap, giap): train, prune, rewind, level by level (:mod:`.imp_runner`);
- ``cascade``: the prune-retrain cascade (``prune.cascade``, :mod:`.cascade_runner`).

Each protocol takes the :class:`RunContext` the runner prepared and returns the run's record and its per-layer
rows; the runner's lifecycle (:mod:`.lifecycle`) stores them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..checkpoint import load_checked, sub_owner
from ..data import scoring_data
from ..errors import PrunekitError
from ..masks import Masks
from ..models import get_model
from ..schedules import PruningCallback
from ..seeding import derive_seed, seed_everything
from ..train import Callback, Trainer
from . import measure
from .cascade_runner import run_cascade
from .imp_runner import level_row, run_levels
from .record import RunRecord
from .resolved import ResolvedRun


@dataclass
class RunContext:
    """What every protocol starts from: the resolved run, its id and folder, the data (splits and the train,
    validation and test loaders), the device, the seeded (or pretrained) model with its starting masks, the store
    (a :class:`~.lifecycle.RankStore` on DDP ranks other than 0), the log and the run's start time."""

    resolved: ResolvedRun
    rid: str
    run_dir: Path
    splits: object
    loaders: tuple
    device: str
    model: torch.nn.Module
    start_masks: Masks | None
    store: object
    log: Callable[[str], None]
    t_start: float


def score_data(ctx: RunContext) -> Callable[[int], object]:
    """``step -> batches``: the scoring data of pruning step ``step``. Criteria that regroup their data get large
    batches; others get exactly their batch_size. Step 0 draws with the run's seed; every later (sub-)step draws
    afresh."""
    r, p = ctx.resolved, ctx.resolved.prune
    bs = getattr(p.method_options, "batch_size", 256)

    def data(step: int):
        seed = r.seed if step == 0 else derive_seed(r.seed, "scoring", str(step))
        return scoring_data(ctx.splits, p.samples, batch_size=max(bs, 256) if p.info.rebatches else bs, seed=seed,
                            transform=p.score_transform, device=ctx.device)

    return data


class _StoreEpochs(Callback):
    def __init__(self, store, rid: str):
        self.store, self.rid = store, rid

    def on_epoch_end(self, trainer, epoch, metrics):
        self.store.log_epoch(self.rid, epoch, metrics)


def schedule_protocol(ctx: RunContext) -> tuple[RunRecord, list[dict]]:
    """One training; a pruning method sets the masks at its schedule's steps, with the post-prune diagnostics."""
    r, p, tcfg = ctx.resolved, ctx.resolved.prune, ctx.resolved.train
    train_dl, val_dl, test_dl = ctx.loaders
    callbacks: list = [_StoreEpochs(ctx.store, ctx.rid)]
    pruner = post = None
    if p.kind != "dense":
        post = measure.PostPrune(ctx.splits, tcfg.eval_batch_size, ctx.device, val_dl, test_dl, tcfg.epochs,
                                 warn=lambda msg: ctx.log(f"[{ctx.rid}] {msg}"), reconstruction=p.reconstruction)
        pruner = PruningCallback(p.schedule(), p.method, data=score_data(ctx), on_prune=post, before_prune=post.before,
                                 **p.prune_kwargs())
        callbacks.insert(0, pruner)
    trainer = Trainer(ctx.model, tcfg, train_dl, val_dl, test_dl, callbacks=callbacks, run_dir=ctx.run_dir,
                      owner=ctx.rid, seed=r.seed, masks=ctx.start_masks, log=ctx.log)
    if post is not None:
        post.trainer = trainer
    if tcfg.epochs == 0:
        summary = _one_shot(trainer, callbacks, val_dl, test_dl)
    else:
        trainer.fit()
        summary = trainer.summary()
    masks = trainer.masks if trainer.masks is not None else Masks(ctx.model)
    events = pruner.events if pruner is not None else []
    layers = measure.layer_rows(masks)
    structured = None
    if p.kind != "dense" and p.info.structured and trainer.masks is not None \
            and distributed.is_main():  # the shrunk archive and its latency: rank 0's job
        structured = measure.structured_result(ctx.model, masks, tuple(ctx.splits.input_shape), ctx.run_dir,
                                               ctx.device)
        ctx.log(f"[{ctx.rid}] {measure.shrunk_line(structured)}")
    before = measure.before_finetune(events, summary, ctx.splits, tcfg.epochs)
    return _schedule_record(ctx, summary, masks, events, structured, before), layers


def _schedule_record(ctx: RunContext, summary: dict, masks: Masks, events: list[dict], structured: dict | None,
                     before: dict) -> RunRecord:
    r, p = ctx.resolved, ctx.resolved.prune
    return RunRecord(
        run_id=ctx.rid, name=r.name, method=p.method, seed=r.seed, structured=structured,
        sparsity=p.sparsity if p.sparsity is not None else masks.sparsity(),  # a budget run: the one reached
        val_acc_before_finetune=before.get("val_acc_before"),
        test_acc_before_finetune=before.get("test_acc_before"), reconstruction=before.get("reconstruction"),
        before_finetune_samples=before.get("before_samples"),
        compression=1.0 / max(1.0 - masks.sparsity(), 1e-12),
        theoretical_speedup=measure.speedup(ctx.model, masks, ctx.splits.input_shape),
        peak_memory_mb=measure.peak_memory_mb(ctx.device),
        model=r.model.name, dataset=r.data.name,
        final_test_acc=summary.get("final_test_acc"), best_val_acc=summary.get("best_val_acc"),
        test_acc_at_best_val=summary.get("test_acc_at_best_val"), best_epoch=summary.get("best_epoch"),
        achieved_sparsity=masks.sparsity(), collapsed=masks.collapsed(), prune_events=events,
        connected=events[-1].get("diagnostics", {}).get("connected") if events else None,
        prune_seconds=sum(e.get("seconds", 0.0) for e in events),
        train_seconds=summary.get("train_seconds", 0.0),
        total_seconds=time.perf_counter() - ctx.t_start, epochs=summary.get("epochs", r.train.epochs),
        run_dir=str(ctx.run_dir),
    )


def _one_shot(trainer, callbacks, val_dl, test_dl) -> dict:
    """``train.epochs: 0``: prune (the schedule's epoch-0 step) and evaluate right after, with no training."""
    for cb in callbacks:
        cb.on_epoch_begin(trainer, 0)
    val_loss, val_acc = trainer.evaluate(val_dl)
    test_loss, test_acc = trainer.evaluate(test_dl)
    sparsity = trainer.masks.sparsity() if trainer.masks is not None else 0.0
    metrics = {"epoch": 0, "lr": 0.0, "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
               "test_acc": test_acc, "seconds": 0.0, "sparsity": sparsity}
    for cb in callbacks:
        cb.on_epoch_end(trainer, 0, metrics)
    return {"final_test_acc": test_acc, "best_val_acc": val_acc, "test_acc_at_best_val": test_acc, "best_epoch": 0,
            "epochs": 0, "train_seconds": 0.0}


def levels_protocol(ctx: RunContext) -> tuple[RunRecord, list[dict]]:
    """An IMP code: levels of train, prune, rewind (:func:`.imp_runner.run_levels`)."""
    return _levels(ctx, "imp", lambda model_fn, on_level: run_levels(
        ctx.resolved, ctx.run_dir, ctx.splits, ctx.loaders, ctx.device, model_fn, ctx.log, on_level))


def cascade_protocol(ctx: RunContext) -> tuple[RunRecord, list[dict]]:
    """The prune-retrain cascade (:func:`.cascade_runner.run_cascade`), scoring with the run's scoring data."""
    return _levels(ctx, "cascade", lambda model_fn, on_level: run_cascade(
        ctx.resolved, ctx.run_dir, ctx.loaders, model_fn, score_data(ctx), ctx.log, on_level))


#: The protocol of each :attr:`~prunekit.experiments.resolved.ResolvedPrune.protocol`.
PROTOCOLS: dict[str, Callable[[RunContext], tuple[RunRecord, list[dict]]]] = {
    "schedule": schedule_protocol, "levels": levels_protocol, "cascade": cascade_protocol}


def _levels(ctx: RunContext, sub: str, run_all) -> tuple[RunRecord, list[dict]]:
    """A run made of levels, stored as they end: ``run_all(model_fn, on_level)`` runs them in ``<run_dir>/<sub>``
    and returns their records. Returns the run's record and the per-layer rows of the final level's masks."""
    if ctx.start_masks is not None:
        raise PrunekitError("model.pretrained holds masks: levels start from a dense network; point it at a dense run")
    records = run_all(_model_fn(ctx), lambda record: _store_level(ctx, record))
    rows = [row for record in records for row in _level_rows(ctx, record)]
    last = records[-1]
    s = last["summary"]
    r = ctx.resolved
    main = [row for row in rows if row["branch"] == "main"]
    rec = RunRecord(
        run_id=ctx.rid, name=r.name, method=r.prune.method, sparsity=1.0 - last["density"], seed=r.seed,
        model=r.model.name, dataset=r.data.name, final_test_acc=s.get("final_test_acc"),
        best_val_acc=s.get("best_val_acc"), test_acc_at_best_val=s.get("test_acc_at_best_val"),
        best_epoch=None, achieved_sparsity=1.0 - last["density"],
        train_seconds=sum(row.get("seconds") or 0.0 for row in main),
        prune_seconds=0.0,
        total_seconds=time.perf_counter() - ctx.t_start, epochs=sum(row.get("epochs") or 0 for row in main),
        run_dir=str(ctx.run_dir), levels=rows)
    distributed.barrier()  # DDP: rank 0 has written the level files the other ranks read now
    blob = load_checked(ctx.run_dir / sub / f"level_{last['level']}.pt", sub_owner(ctx.run_dir, ctx.run_dir / sub))
    ctx.model.load_state_dict(blob["final_state"])  # the last level's trained weights
    final = Masks.from_state_dict(ctx.model, blob["masks"])
    final.apply()
    rec.collapsed = final.collapsed()
    if r.prune.info.structured and distributed.is_main():
        rec.structured = measure.structured_result(ctx.model, final, tuple(ctx.splits.input_shape), ctx.run_dir,
                                                   ctx.device)
    return rec, measure.layer_rows(final)


def _model_fn(ctx: RunContext) -> Callable[..., torch.nn.Module]:
    """``model_fn(seed=None)`` of the level engine: the run's starting weights θ_0 (pretrained or seeded), or with
    a seed a freshly initialized network (a control branch), the global RNG left as it was."""
    base = {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()}
    name, shape, classes = ctx.resolved.model.name, tuple(ctx.splits.input_shape), ctx.splits.num_classes

    def model_fn(seed: int | None = None):
        if seed is None:
            m = get_model(name, num_classes=classes, input_shape=shape)
            m.load_state_dict(base)
            return m
        with torch.random.fork_rng(devices=[]):
            seed_everything(seed)
            return get_model(name, num_classes=classes, input_shape=shape)

    return model_fn


def _level_rows(ctx: RunContext, record: dict) -> list[dict]:
    """The stored rows of a finished level: its main branch, and its control branch when it has one."""
    rows = [level_row(record)]
    if record.get("control") is not None:
        rows.append(level_row(record, f"control_{ctx.resolved.prune.method_options.control}"))
    return rows


def _store_level(ctx: RunContext, record: dict) -> None:
    ctx.store.log_levels(ctx.rid, _level_rows(ctx, record))
    s = record["summary"]
    ctx.log(f"[{ctx.rid}] level {record['level']}: density {100 * record['density']:.2f}%, "
            f"{s.get('epochs')} epochs ({s.get('stop_reason')}), test {100 * (s.get('final_test_acc') or 0):.2f}%")
