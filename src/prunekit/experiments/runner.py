"""``run(cfg) -> RunRecord``: one experiment, a pure function of its resolved config.

The run's identity is the hash of its resolved config. Its folder is ``<root>/<run_id>/`` (config.json,
last.pt for resuming, best.pt, record.json) and its rows in ``<root>/results.sqlite`` are keyed by the same id:
rerunning a finished config is a no-op that returns the stored record; an interrupted run resumes from its last
checkpoint.

:func:`run` orchestrates: the run's lifecycle (:mod:`.lifecycle`: store lookup, lock, begin, failure record,
finish), its data and model, and the protocol of its method's kind (:mod:`.protocols`: schedule, levels, cascade),
which measures what it needs through :mod:`.measure`.

Under ``torchrun`` (several ranks, :mod:`prunekit.distributed`) every rank runs the same function: scoring and
training share the work, and rank 0 alone takes the run's lock and writes its folder and its store rows.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from .. import data as datasets
from ..checkpoint import load_checked, verify_digest
from ..data import loaders, resized, subset_test, with_channels
from ..models import input_stats
from ..masks import Masks, load
from ..seeding import seed_everything
from ..train.config import resolve_device
from .config import resolve_run
from .lifecycle import RankStore, RunLifecycle
from .measure import reset_peak_memory
from .pretrained import build_model, hf_folder
from .protocols import PROTOCOLS, RunContext
from .record import RunRecord, hardware, versions
from .resolved import (Pretrained, PretrainedFile, PretrainedHF, PretrainedRun, PretrainedZoo, ResolvedRun, hf_source,
                       zoo_source)
from .store import Store

__all__ = ["run", "RunRecord", "RankStore", "hardware", "versions"]


def run(
    cfg: dict | ResolvedRun,
    root: str | Path = "runs",
    *,
    data_dir: str | Path | None = None,
    store: Store | None = None,
    log: Callable[[str], None] | None = None,
) -> RunRecord:
    """Run (or resume, or look up) the experiment ``cfg`` (plain data of one run, no grid, or its resolved run)."""
    resolved = cfg if isinstance(cfg, ResolvedRun) else resolve_run(cfg)
    with RunLifecycle(resolved, root, store, log) as life:
        done = life.cached()
        if done is not None:
            return done
        # checked before anything is written: a bad device or a missing dataset is the user's to fix, not a run
        tcfg = resolved.train
        device = str(resolve_device(tcfg.device))
        life.use_threads(tcfg.threads)
        splits = _dataset(resolved, data_dir)
        done = life.begin(device)
        if done is not None:
            return done
        t_start = time.perf_counter()
        reset_peak_memory(device)  # the record's peak_memory_mb is this run's
        with life.recording_failure():
            seed_everything(resolved.seed)
            model = build_model(resolved, splits, data_dir)
            start_masks = _load_pretrained(model, resolved.model.pretrained, life, data_dir)
            dls = loaders(splits, tcfg.batch_size, eval_batch_size=tcfg.eval_batch_size, device=device,
                          seed=resolved.seed, augment=resolved.data.augment)
            ctx = RunContext(resolved, life.rid, life.run_dir, splits, dls, device, model, start_masks, life.store,
                             life.log, t_start)
            return life.finish(*PROTOCOLS[resolved.prune.protocol](ctx))


_LAST_DATASET: dict = {}


def _dataset(resolved: ResolvedRun, data_dir):
    """The splits of a resolved run's data section (a text dataset tokenized by its encoder's tokenizer, images
    normalized as a zoo model's published weights expect); the last one is kept, so the runs of a grid load it
    once."""
    d, hf, zoo = resolved.data, hf_source(resolved.model), zoo_source(resolved.model)
    where = str(data_dir) if data_dir is not None else os.environ.get("PRUNEKIT_DATA", "")
    tokenizer = hf.tokenizer_sha256 if hf is not None else None
    norm = input_stats(zoo.name) if zoo is not None else None
    key = (d.name, where, d.val_size, d.split_seed, d.subset, d.resize, d.channels, d.test_size, d.max_length,
           tokenizer, norm)
    if key not in _LAST_DATASET:
        _LAST_DATASET.clear()  # the old splits go before the new ones load
        if hf is not None:
            splits = datasets.load_tokenized(d.name, hf_folder(hf, data_dir),
                                             d.max_length or datasets.DEFAULT_MAX_LENGTH, root=data_dir,
                                             val_size=d.val_size, split_seed=d.split_seed, subset=d.subset)
        else:
            splits = datasets.load_dataset(d.name, root=data_dir, val_size=d.val_size, split_seed=d.split_seed,
                                           subset=d.subset)
            if d.resize is not None:
                splits = resized(splits, d.resize)
            if d.channels is not None:
                splits = with_channels(splits, d.channels)
            if norm is not None:  # the published weights were trained on inputs normalized this way
                splits = dataclasses.replace(splits, mean=norm[0], std=norm[1])
        if d.test_size is not None:
            splits = subset_test(splits, d.test_size, d.split_seed)
        _LAST_DATASET[key] = splits
    return _LAST_DATASET[key]


def _load_pretrained(model, pre: Pretrained | None, life: RunLifecycle, data_dir) -> Masks | None:
    """Load the starting weights (and masks) named by a resolved ``model.pretrained``; returns the masks or None.
    A starting run is run first when the store lacks it (a no-op once it is done)."""
    if pre is None or isinstance(pre, (PretrainedHF, PretrainedZoo)):  # loaded by _build_model
        return None
    if isinstance(pre, PretrainedFile):
        return load(pre.file, model)
    rec = run(pre.resolved, life.root, data_dir=data_dir, store=life.store, log=life.log)
    if pre.weights == "best":
        best = Path(rec.run_dir) / "best.pt"
        verify_digest(best, rec.run_id)
        return load(best, model)
    state = load_checked(Path(rec.run_dir) / "last.pt", rec.run_id)
    model.load_state_dict(state["model"])
    return Masks.from_state_dict(model, state["masks"]) if state["masks"] is not None else None
