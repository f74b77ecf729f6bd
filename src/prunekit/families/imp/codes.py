"""Iterative magnitude pruning codes of seed 001: ``lth``, ``sap``, ``ciap`` (``incop_if``), ``giap`` (``incop_gf``).

These methods are training loops, not one-shot criteria: each level trains, prunes by magnitude and rewinds
(methods/imp.md). Run them with a config (``prunekit run``; :mod:`prunekit.experiments.imp_runner`) or in code with
:func:`prunekit.families.imp.lottery.run_imp`. The registered score is abs(θ), the ranking every level uses;
``pk.prune`` refuses them with a pointer to the loop. Their options are the fields of :class:`ImpOptions`."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import PrunekitError
from ...registry import ScoreContext, register

DEFAULT_STOP = {"lth": "fixed", "sap": "fixed", "ciap": "if", "giap": "gf"}
IMP_CODES = tuple(DEFAULT_STOP)  # lth, sap, ciap, giap: the codes whose runs are made of levels
DEFAULT_SCOPE = {"lth": "layer", "sap": "global", "ciap": "global", "giap": "global"}
_REWIND = re.compile(r"^step:(\d+)(ep|it)$")


@dataclass(frozen=True)
class ImpOptions:
    """Options of ``lth``/``sap``/``ciap``/``giap`` (methods/imp.md sections 1-4; the recipe of one level is the
    experiment's ``train`` section).

    - ``levels``: pruning levels after the dense level 0 (seed ``exper_imp_total_iter`` - 1).
    - ``prune_fraction``: ``lth``'s fraction of the alive weights removed per level; ``output_fraction``: the
      output layer's own rate (None: f/2 in layer scope, ranked with the rest in global scope; 0 exempts it).
    - ``rewind``: ``init`` (θ_0), ``none`` (continue from the trained weights), ``step:<k>ep`` or ``step:<k>it``
      (θ after k epochs / iterations of dense training; later levels resume the LR schedule and the data order
      there, mid-epoch for iterations).
    - ``stop``: ``fixed`` (the whole budget), ``acc`` (accuracy guard and cap), ``if`` / ``gf`` (the flow rules);
      None = the code's own (lth/sap fixed, ciap if, giap gf). ``stop_mode``: ``fixed`` (prunekit's corrected
      rule) or ``original`` (seed 001, defects kept).
    - ``p``, ``q``, ``eta``, ``gamma``, ``beta``: the PQ rule of ``sap``/``ciap``/``giap``.
    - ``control``: ``none``, ``reinit`` or ``random_prune`` side branches at ``control_levels`` (None: all >= 1).
    - Stop rule: ``epsilon`` (None: 0.1 IF / 0.5 GF; 1.0 in original mode), ``chunk_epochs``, ``min_chunks``,
      ``max_chunks`` (None: the level's epoch budget / ``chunk_epochs``, the same cap as ``lth``), ``patience``,
      ``acc_guard``, ``acc_tol``; data of the checks: ``flow_batches`` x ``flow_batch_size`` validation samples,
      ``if_stat``, ``gf_stat``.
    """

    levels: int = 14
    prune_fraction: float = 0.2
    output_fraction: float | None = None
    rewind: str = "init"
    stop: Literal["fixed", "acc", "if", "gf"] | None = None
    stop_mode: Literal["fixed", "original"] = "fixed"
    p: float = 0.5
    q: float = 1.0
    eta: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9
    control: Literal["none", "reinit", "random_prune"] = "none"
    control_levels: tuple[int, ...] | None = None
    control_seed: int = 1
    epsilon: float | None = None
    chunk_epochs: int = 2
    min_chunks: int = 1
    max_chunks: int | None = None
    patience: int = 2
    acc_guard: bool = True
    acc_tol: float = 0.0
    flow_batches: int = 8
    flow_batch_size: int = 128
    if_stat: Literal["mean", "mean_abs", "fro"] = "mean"
    gf_stat: Literal["mean_abs", "mean_abs_alive", "fro"] = "mean_abs"


def rewind_step(rewind: str, epochs: int, steps_per_epoch: int | None = None) -> int | None:
    """The rewind point of ``rewind`` in optimizer steps (None for ``init``/``none``; ``step:<k>ep`` is
    ``k * steps_per_epoch``), checked against the ``epochs`` of a level. Without ``steps_per_epoch`` only the
    format and the epoch bound are checked, and the result is the number written (epochs or iterations)."""
    if rewind in ("init", "none"):
        return None
    m = _REWIND.match(str(rewind))
    if m is None:
        raise PrunekitError(f"unknown rewind {rewind!r}: use 'init', 'none', 'step:<k>ep' (epochs, e.g. step:2ep) "
                            "or 'step:<k>it' (iterations)")
    k, unit = int(m.group(1)), m.group(2)
    if unit == "ep" and k > epochs:
        raise PrunekitError(f"rewind {rewind!r} is after the end of training (train.epochs = {epochs}); "
                            f"choose k <= {epochs}")
    if steps_per_epoch is None:
        return k
    steps = k * steps_per_epoch if unit == "ep" else k
    if steps > epochs * steps_per_epoch:
        raise PrunekitError(f"rewind {rewind!r} is after the end of training ({epochs} epochs x {steps_per_epoch} "
                            f"steps = {epochs * steps_per_epoch} iterations); choose a smaller k")
    return steps


def check_imp_options(code: str, o: ImpOptions, epochs: int) -> None:
    """Raise a clear error for options that cannot run (zero levels, p >= q, a late rewind, ...)."""
    if o.levels < 1:
        raise PrunekitError(f"levels must be at least 1 (the number of prune-retrain levels after the dense one), "
                            f"got {o.levels}")
    if not 0.0 < o.prune_fraction < 1.0:
        raise PrunekitError(f"prune_fraction {o.prune_fraction} is outside (0, 1): it is the fraction of the remaining "
                            "weights removed per level (0.2 removes 20%)")
    if o.output_fraction is not None and not 0.0 <= o.output_fraction < 1.0:
        raise PrunekitError(f"output_fraction {o.output_fraction} is outside [0, 1)")
    if code != "lth" and not (math.isfinite(o.p) and math.isfinite(o.q) and 0 < o.p < o.q):
        raise PrunekitError(f"the PQ index needs 0 < p < q, got p={o.p}, q={o.q}: use e.g. p: 0.5, q: 1 or p: 1, q: 2")
    if not 0.0 < o.beta <= 1.0 or o.gamma <= 0 or o.eta < 0:
        raise PrunekitError(f"PQ rule needs 0 < beta <= 1, gamma > 0, eta >= 0; got beta={o.beta}, gamma={o.gamma}, "
                            f"eta={o.eta}")
    if epochs < 1:
        raise PrunekitError("IMP trains every level: set train.epochs >= 1 (the budget of one level)")
    k = rewind_step(o.rewind, epochs)
    budget = epochs - (k or 0) if o.rewind.endswith("ep") else epochs
    if budget < 1:
        raise PrunekitError(f"rewind {o.rewind!r} leaves no training after the rewind point (train.epochs = {epochs})")
    if o.chunk_epochs < 1 or o.min_chunks < 1 or o.patience < 1:
        raise PrunekitError("chunk_epochs, min_chunks and patience must be >= 1")
    if o.max_chunks is not None and o.max_chunks < o.min_chunks:
        raise PrunekitError(f"max_chunks ({o.max_chunks}) is below min_chunks ({o.min_chunks})")
    if o.flow_batches < 1 or o.flow_batch_size < 1:
        raise PrunekitError("flow_batches and flow_batch_size must be >= 1")
    if o.epsilon is not None and not o.epsilon > 0:
        raise PrunekitError(f"epsilon must be > 0, got {o.epsilon}")
    if o.control_levels is not None and any(int(x) < 1 or int(x) > o.levels for x in o.control_levels):
        raise PrunekitError(f"control_levels must lie in 1..{o.levels}, got {list(o.control_levels)}")


def _abs_weights(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}


_COMMON = dict(needs_data="training", options=ImpOptions, sources=("001",))

register("lth", family="iterative (IMP)", summary="lottery-ticket IMP: train, prune a fixed fraction by |w|, rewind",
         **_COMMON)(_abs_weights)
register("sap", family="iterative (IMP)", summary="IMP with the PQ-index adaptive prune fraction per level",
         **_COMMON)(_abs_weights)
register("ciap", family="iterative (IMP)", aliases=("incop_if",),
         summary="InCoP-IF: SAP pruning, each level stops on information-flow consistency", **_COMMON)(_abs_weights)
register("giap", family="iterative (IMP)", aliases=("incop_gf",),
         summary="InCoP-GF: SAP pruning, each level stops on gradient-flow consistency", **_COMMON)(_abs_weights)


def check_not_training(info) -> None:
    """The error for running an IMP code through the one-shot API."""
    if info.kind == "levels":
        raise PrunekitError(f"method {info.name!r} is iterative magnitude pruning: it trains between levels, so it "
                            "runs as an experiment (`prunekit run` with a config, see configs/seed001/) or with "
                            "prunekit.families.imp.lottery.run_imp; for one-shot magnitude pruning use method "
                            "'magnitude'")
