"""The prune-retrain cascade as an experiment (``prune.cascade``, sensitivity.md section 8).

Level 0 trains the dense network with the ``train`` recipe. Level L >= 1 starts from level L-1's weights, prunes
to each keep ratio of its chunk in turn with the run's method (masks stay nested; weight updates such as SiPP's
reweighting or the OBS update carry over), then retrains (``retrain_epochs`` or the whole recipe). It reuses the
level engine of :func:`prunekit.families.imp.lottery.run_imp` with ``rewind='none'``, so levels are checkpointed,
an interrupted cascade resumes at the level it stopped, and each level is one row of the ``levels`` table.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import sub_owner
from ..families.imp.lottery import run_imp
from ..masks import Masks
from ..params import prunable_params
from ..prune import prune
from ..train import Trainer
from .imp_runner import fit_level
from .resolved import ResolvedRun


def run_cascade(resolved: ResolvedRun, run_dir: Path, loaders_: tuple, model_fn: Callable[..., torch.nn.Module],
                score_data: Callable[[int], object], log: Callable[[str], None],
                on_level: Callable[[dict], None]) -> list[dict]:
    """Run (or resume) the cascade of a resolved run; returns the level records of ``run_imp``."""
    p = resolved.prune
    cascade = p.cascade.schedule()
    chunks = cascade.chunks()
    tcfg = resolved.train
    retrain = dataclasses.replace(tcfg, epochs=cascade.retrain_epochs or tcfg.epochs)
    train_dl, val_dl, test_dl = loaders_
    options = p.prune_kwargs()

    def train_fn(model, masks, level, level_dir, rewind_epoch=None):
        trainer = Trainer(model, tcfg if level == 0 else retrain, train_dl, val_dl, test_dl, run_dir=level_dir,
                          owner=sub_owner(run_dir, level_dir), seed=resolved.seed, masks=masks, log=log)
        return fit_level(trainer)

    def prune_rule(masks: Masks, model, level: int):
        t0 = time.perf_counter()
        current = masks
        for ratio in chunks[level]:
            current = prune(model, p.method, sparsity=1.0 - ratio, data=score_data(level) if p.uses_data else None,
                            masks=current, **options)
        return current.as_dict(), {"ratios": chunks[level], "seconds": time.perf_counter() - t0,
                                   "achieved_density": current.density()}

    return run_imp(
        model_fn, train_fn, len(chunks), run_dir=run_dir / "cascade", prune_fraction=0.5, rewind="none",
        prune_rule=prune_rule, rule_config={"method": p.method, "chunks": chunks, "options": options},
        on_level=on_level, masks_fn=lambda model: Masks(model, prunable_params(model, p.options.param_spec())),
        owner=sub_owner(run_dir, run_dir / "cascade"),
    )
