"""Lottery-ticket search: iterative magnitude pruning (IMP) with rewinding (methods/imp.md sections 1-3).

- :func:`level_masks`: the next level's nested masks, removing ``ceil(f * alive)`` of the alive weights by abs(θ)
  (globally or per tensor), with the output layer optionally pruned separately at ``output_fraction``.
- :func:`kept_after` / :func:`density_after`: exact integer counts and the closed form (1 - f)^k per group.
- :func:`run_imp`: the driver. It is pure library code: ``model_fn`` builds the model and ``train_fn`` trains one
  level (typically wrapping :class:`prunekit.train.Trainer`). Every finished level is checkpointed atomically to
  ``run_dir/level_{k}.pt`` plus ``run_dir/imp.json``, so an interrupted search resumes at the level it stopped.

``train_fn`` protocol: ``train_fn(model, masks, level, level_dir, rewind_epoch=None) -> dict``. ``model`` already
holds the level's starting weights with ``masks`` applied; train it in place. With ``rewind=('epoch', k)`` (or
``('step', k)``, k optimizer steps) level 0 is called with ``rewind_epoch=k`` and must return the model's
``state_dict()`` at the end of epoch (step) k under ``'rewind_state'`` (k = 0: the initial weights). Other levels get
``rewind_epoch=None``; starting them at the rewind point of the schedule is the train_fn's job.

Controls (``control='reinit'`` / ``'random_prune'``) are side branches trained at every level >= 1 from that
level's ticket; they never feed back into the main chain. ``reinit`` calls ``model_fn(seed=control_seed)`` (or,
if ``model_fn`` takes no ``seed``, ``model_fn()`` under a forked torch RNG seeded with ``control_seed``) and applies
the ticket's mask; ``random_prune`` draws a random mask with the ticket's per-tensor kept counts and starts from the
rewind weights.
"""
from __future__ import annotations

import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ... import distributed
from ...checkpoint import CheckpointError, CorruptCheckpointWarning, load_checked, on_corrupt_policy, quarantine, \
    save_checked
from ...errors import PrunekitError
from ...io import atomic_write_json
from ...masks import Masks
from ...seeding import generator
from ...select import keep_among_alive

CONTROLS = (None, "reinit", "random_prune")


def _check_fraction(name: str, f: float, allow_zero: bool = False) -> float:
    try:
        f = float(f)
    except (TypeError, ValueError):
        raise PrunekitError(f"{name} must be a number in (0, 1), got {f!r}") from None
    lo_ok = f >= 0.0 if allow_zero else f > 0.0
    if math.isnan(f) or not (lo_ok and f < 1.0):
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        raise PrunekitError(f"{name} {f!r} is outside {rng}: it is the fraction of the remaining weights removed "
                            "at each level (0.2 removes 20% of what is left)")
    return f


def prune_count(alive: int, fraction: float) -> int:
    """ceil(fraction * alive), robust to float error (0.1 * 300 is 30, not 31)."""
    return min(alive, math.ceil(round(fraction * alive, 9)))


def level_masks(
    masks: Masks | Mapping[str, torch.Tensor],
    model: nn.Module,
    prune_fraction: float,
    output_fraction: float | None = None,
    scope: str = "global",
    output_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """The next IMP level's masks (nested in ``masks``) from abs of the current weights of ``model``.

    Removes ``ceil(prune_fraction * alive)`` alive weights, ranked over all tensors (``scope='global'``) or in each
    tensor (``'layer'``). The output tensor (``output_name``, default the last tensor of ``masks``) is pruned on its
    own at ``ceil(output_fraction * alive_out)`` when ``output_fraction`` is given (0 exempts it) and is then left
    out of the global ranking. Returns ``{name: bool mask}`` for every tensor of ``masks``.
    """
    f = _check_fraction("prune_fraction", prune_fraction)
    fo = None if output_fraction is None else _check_fraction("output_fraction", output_fraction, allow_zero=True)
    if scope not in ("global", "layer"):
        raise PrunekitError(f"unknown scope {scope!r}: use 'global' or 'layer'")
    current = masks.as_dict() if isinstance(masks, Masks) else dict(masks)
    if not current:
        raise PrunekitError("no masks given: the model has nothing prunable")
    names = list(current)
    out_name = output_name if output_name is not None else names[-1]
    if out_name not in current:
        raise PrunekitError(f"output_name {out_name!r} is not a masked tensor; known: {', '.join(names)}")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise PrunekitError(f"mask {missing[0]!r} names no parameter of {type(model).__name__}")
    scores, alive = {}, {}
    for n in names:
        w = params[n].detach()
        a = current[n].to(device=w.device, dtype=torch.bool)
        if tuple(a.shape) != tuple(w.shape):
            raise PrunekitError(f"mask for {n!r} has shape {tuple(a.shape)}, the tensor has {tuple(w.shape)}")
        scores[n], alive[n] = w.abs().double().reshape(-1), a.reshape(-1)

    new: dict[str, torch.Tensor] = {}
    separate = {out_name} if fo is not None else set()
    for n in names:
        if scope == "layer" or n in separate:
            fl = fo if (n == out_name and fo is not None) else f
            n_alive = int(alive[n].sum())
            new[n] = keep_among_alive(scores[n], alive[n], n_alive - prune_count(n_alive, fl))
    ranked = [n for n in names if n not in new]
    if ranked:
        flat_s = torch.cat([scores[n].cpu() for n in ranked])
        flat_a = torch.cat([alive[n].cpu() for n in ranked])
        n_alive = int(flat_a.sum())
        keep = keep_among_alive(flat_s, flat_a, n_alive - prune_count(n_alive, f))
        off = 0
        for n in ranked:
            k = alive[n].numel()
            new[n] = keep[off:off + k].to(alive[n].device)
            off += k
    return {n: new[n].reshape(current[n].shape) for n in names}


def _groups(counts: Sequence[int], fractions: Sequence[float]):
    if len(counts) != len(fractions):
        raise PrunekitError(f"counts ({len(counts)}) and fractions ({len(fractions)}) must have the same length")
    return [(int(c), float(fr)) for c, fr in zip(counts, fractions)]


def density_after(levels: int, counts: Sequence[int], fractions: Sequence[float]) -> float:
    """Closed-form remaining fraction after ``levels`` levels: sum(n_g (1 - f_g)^k) / sum(n_g).

    Each group g (a tensor in layer scope; the globally ranked tensors together, and the separately pruned output
    layer, in global scope) has ``counts[g]`` weights pruned at ``fractions[g]`` of its remaining weights per level.
    LeNet-300-100 (layer scope, 0.2 / 0.1 output): ``density_after(k, [265200, 1000], [0.2, 0.1])``.
    """
    g = _groups(counts, fractions)
    return sum(c * (1.0 - fr) ** levels for c, fr in g) / sum(c for c, _ in g)


def kept_after(levels: int, counts: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """Exact kept counts per group after ``levels`` levels (each level removes ceil(f * alive))."""
    kept = [c for c, _ in _groups(counts, fractions)]
    for _ in range(int(levels)):
        kept = [k - prune_count(k, fr) for k, (_, fr) in zip(kept, _groups(counts, fractions))]
    return kept


def random_masks(masks: Mapping[str, torch.Tensor], seed: int, *tags: str) -> dict[str, torch.Tensor]:
    """Uniformly random masks with the same per-tensor kept counts as ``masks``."""
    out = {}
    for n, m in masks.items():
        g = generator(seed, "random_prune", n, *tags)
        perm = torch.randperm(m.numel(), generator=g)
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[perm[: int(m.sum())]] = True
        out[n] = r.reshape(m.shape).to(m.device)
    return out


def _parse_rewind(rewind, train_epochs, train_steps=None):
    if rewind in ("init", "none"):
        return rewind, None
    if isinstance(rewind, (tuple, list)) and len(rewind) == 2 and rewind[0] in ("epoch", "step"):
        kind, k = rewind
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise PrunekitError(f"rewind {kind} must be an integer >= 0, got {k!r}")
        if kind == "epoch" and train_epochs is None:
            raise PrunekitError("rewind=('epoch', k) needs train_epochs= (the epochs of one level) to be checked")
        bound = train_epochs if kind == "epoch" else train_steps  # steps are checked only when known
        if bound is not None and k > int(bound):
            raise PrunekitError(f"rewind {kind} {k} is after the end of training ({bound} {kind}s per level); "
                                f"choose k <= {bound}")
        return kind, k
    raise PrunekitError(f"unknown rewind {rewind!r}: use 'init', 'none', ('epoch', k) or ('step', k)")


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _reinit_model(model_fn: Callable, seed: int) -> nn.Module:
    try:
        takes_seed = "seed" in inspect.signature(model_fn).parameters
    except (TypeError, ValueError):
        takes_seed = False
    if takes_seed:
        return model_fn(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn()


def run_imp(
    model_fn: Callable[..., nn.Module],
    train_fn: Callable[..., dict],
    levels: int,
    *,
    run_dir,
    prune_fraction: float = 0.2,
    output_fraction: float | None = None,
    scope: str = "global",
    output_name: str | None = None,
    rewind="init",
    train_epochs: int | None = None,
    train_steps: int | None = None,
    control: str | None = None,
    control_seed: int = 1,
    control_levels: Sequence[int] | None = None,
    prune_rule: Callable[[Masks, nn.Module, int], tuple[Mapping[str, torch.Tensor], dict]] | None = None,
    rule_config: Mapping | None = None,
    on_level: Callable[[dict], None] | None = None,
    masks_fn: Callable[[nn.Module], Masks] | None = None,
    owner: str | None = None,
) -> list[dict]:
    """Iterative magnitude pruning: ``levels`` pruning levels after the dense level 0 (``levels + 1`` trainings).

    Returns one record per level: ``level``, ``kept``, ``total``, ``density``, ``summary`` (``train_fn``'s dict
    without ``rewind_state``) and, with a control, ``control`` (the control branch's summary). See the module
    docstring for the ``train_fn`` protocol. Finished levels found in ``run_dir`` are loaded, not retrained.

    ``prune_rule(masks, model, level) -> (new masks, info)`` replaces the fixed-fraction rule (SAP's PQ index:
    :func:`prunekit.families.imp.incop.pq_level_masks`); the new masks must be nested in ``masks``; ``info`` is
    stored in the NEXT level's record under ``prune``. ``rule_config`` (JSON data) identifies the rule in the resume
    check. The rule may also change the weights of ``model`` in place (an OBS or SiPP update): with
    ``rewind='none'`` the next level starts from the weights as the rule leaves them (the prune-retrain cascade).
    ``control_levels``: the levels that get a control branch (default: every level >= 1). ``on_level(record)`` is
    called after each level is saved (and for levels loaded on resume). ``masks_fn(model)``: the level-0 masks, i.e.
    which tensors are pruned (default ``Masks(model)``: conv and linear weights)."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise PrunekitError(f"levels must be an integer >= 1 (the number of pruning levels), got {levels!r}")
    _check_fraction("prune_fraction", prune_fraction)
    if output_fraction is not None:
        _check_fraction("output_fraction", output_fraction, allow_zero=True)
    if scope not in ("global", "layer"):
        raise PrunekitError(f"unknown scope {scope!r}: use 'global' or 'layer'")
    if control not in CONTROLS:
        raise PrunekitError(f"unknown control {control!r}: use None, 'reinit' or 'random_prune'")
    mode, rewind_epoch = _parse_rewind(rewind, train_epochs, train_steps)
    config = {"levels": levels, "prune_fraction": prune_fraction, "output_fraction": output_fraction,
              "scope": scope, "output_name": output_name, "rewind": [mode, rewind_epoch], "control": control,
              "control_seed": control_seed}
    if control_levels is not None:
        config["control_levels"] = sorted(int(x) for x in control_levels)
    if rule_config is not None:
        config["rule"] = dict(rule_config)
    search = _Search(model_fn, train_fn, Path(run_dir), config, mode, rewind_epoch, prune_rule, control_levels,
                     on_level, owner)
    search.start(masks_fn)
    for level in range(search.resume(), levels + 1):
        search.level(level)
    return search.records


class _Search:
    """One IMP search of :func:`run_imp`: its settings, and what the next level starts from (the masks, the last
    level's final weights, the rewind weights, the last prune rule's info); every finished level is saved."""

    def __init__(self, model_fn, train_fn, run_dir: Path, config: dict, mode: str, rewind_epoch, prune_rule,
                 control_levels, on_level, owner: str | None):
        self.model_fn, self.train_fn, self.run_dir, self.config = model_fn, train_fn, run_dir, config
        self.mode, self.rewind_epoch, self.prune_rule = mode, rewind_epoch, prune_rule
        self.control_levels, self.on_level, self.owner = control_levels, on_level, owner
        self.index_path = run_dir / "imp.json"
        self.records: list[dict] = []
        self.prune_info: dict = {}

    def start(self, masks_fn) -> None:
        """θ_0 (``init.pt``; ``model_fn()`` is deterministic, so a lost or damaged one is written again, identical)
        and the level-0 masks."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_path = self.run_dir / "init.pt"
        model = self.model_fn()
        theta0 = _trusted(init_path, self.owner)
        if theta0 is None:
            theta0 = _clone_state(model)
            save_checked(theta0, init_path, self.owner)
        first = masks_fn(model) if masks_fn is not None else Masks(model)
        self.theta0 = self.prev_final = theta0
        self.masks_next = {n: m.cpu() for n, m in first.state_dict().items()}
        at_init = self.mode in ("init", "epoch", "step") and self.rewind_epoch in (None, 0)
        self.rewind_state = theta0 if at_init else None

    def resume(self) -> int:
        """Load the finished levels found in ``run_dir`` (up to the first untrusted one); returns the next level."""
        done = 0
        if self.index_path.exists():
            index = json.loads(self.index_path.read_text())
            if index.get("config") != json.loads(json.dumps(self.config)):
                raise PrunekitError(f"{self.run_dir} holds an IMP search with other settings ({index.get('config')}); "
                                    "use another run_dir")
            done = int(index.get("done", 0))
        for level in range(done):
            blob = _trusted(self.run_dir / f"level_{level}.pt", self.owner)
            if blob is None:  # untrusted: this level and the ones after it are trained again
                return level
            self.records.append(blob["record"])
            self.masks_next, self.prev_final = blob["next_masks"], blob["final_state"]
            self.prune_info = blob.get("prune_info") or {}
            if blob.get("rewind_state") is not None:
                self.rewind_state = blob["rewind_state"]
            if self.on_level is not None:
                self.on_level(blob["record"])
        return done

    def level(self, level: int) -> None:
        """Train level ``level`` from its start weights under the current masks, run its control branch, choose the
        next masks, and save the level (``level_<L>.pt`` and the index)."""
        c = self.config
        cur_masks = self.masks_next
        start = self.theta0 if level == 0 else (self.prev_final if self.mode == "none" else self.rewind_state)
        model = self.model_fn()
        model.load_state_dict(start)
        masks = Masks.from_state_dict(model, cur_masks)
        level_dir = self.run_dir / f"level_{level}"
        captures = level == 0 and self.mode in ("epoch", "step")
        summary = dict(self.train_fn(model, masks, level, level_dir,
                                     rewind_epoch=self.rewind_epoch if captures else None) or {})
        saved_rewind = self._rewind_weights(summary) if captures else None
        summary.pop("rewind_state", None)
        record = {"level": level, "kept": masks.kept(), "total": masks.total(), "density": masks.density(),
                  "summary": summary}
        if level >= 1:
            record["prune"] = self.prune_info
        control = c["control"]
        if control is not None and level >= 1 and (self.control_levels is None or level in self.control_levels):
            record["control"] = _run_control(control, c["control_seed"], self.model_fn, self.train_fn, cur_masks,
                                             start, level, level_dir / f"control_{control}")
        if level < c["levels"]:
            self.masks_next = self._next_masks(masks, model, level, cur_masks)
        self.prev_final = _clone_state(model)  # after the prune rule, which may move weights (kept with rewind none)
        save_checked({"record": record, "masks": cur_masks, "next_masks": self.masks_next,
                      "prune_info": self.prune_info, "final_state": self.prev_final, "rewind_state": saved_rewind},
                     self.run_dir / f"level_{level}.pt", self.owner)
        self.records.append(record)
        atomic_write_json(self.index_path, {"config": c, "done": level + 1,
                                            "levels": [{k: r[k] for k in ("level", "kept", "total", "density")}
                                                       for r in self.records]})
        if self.on_level is not None:
            self.on_level(record)

    def _rewind_weights(self, summary: dict) -> dict:
        """Level 0 of an epoch/step rewind: the weights train_fn captured at the rewind point."""
        rs = summary.pop("rewind_state", None)
        if rs is None and self.rewind_epoch == 0:
            rs = self.theta0
        if rs is None:
            raise PrunekitError(f"rewind=('{self.mode}', {self.rewind_epoch}): train_fn must return the weights at "
                                f"{self.mode} {self.rewind_epoch} under 'rewind_state' at level 0")
        self.rewind_state = {k: v.detach().cpu().clone() for k, v in rs.items()}
        return self.rewind_state

    def _next_masks(self, masks: Masks, model: nn.Module, level: int, cur_masks: dict) -> dict:
        c = self.config
        if self.prune_rule is None:
            nxt = level_masks(masks, model, c["prune_fraction"], c["output_fraction"], c["scope"], c["output_name"])
            self.prune_info = {}
        else:
            nxt, info = self.prune_rule(masks, model, level)
            self.prune_info = dict(info or {})
            _check_nested(cur_masks, nxt)
        return {n: m.cpu().to(torch.bool) for n, m in nxt.items()}


def _trusted(path: Path, owner: str | None):
    """The contents of a checked level file, or None when it is missing or cannot be trusted (then it is moved
    aside with a warning, or, with ``PRUNEKIT_ON_CORRUPT=error``, the search stops with the reason)."""
    if not path.exists():
        return None
    try:
        return load_checked(path, owner)
    except CheckpointError as e:
        if on_corrupt_policy() == "error":
            raise CheckpointError(path, f"{e.reason}; not resumed (--no-restart-corrupt): move it aside to redo the "
                                        "work it held") from None
        kept = quarantine(path) if distributed.is_main() else path
        warnings.warn(CorruptCheckpointWarning(f"{path}: {e.reason}; not used (kept as {kept.name}), its work is "
                                               "done again"), stacklevel=3)
        return None


def _check_nested(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    if set(old) != set(new):
        raise PrunekitError(f"prune_rule returned masks for {sorted(new)}, expected {sorted(old)}")
    for n in old:
        o, m = old[n].cpu().to(torch.bool), new[n].cpu().to(torch.bool)
        if o.shape != m.shape or bool((m & ~o).any()):
            raise PrunekitError(f"prune_rule revived pruned weights of {n!r}: IMP masks must be nested")


def _run_control(control, seed, model_fn, train_fn, ticket, start, level, level_dir) -> dict:
    if control == "reinit":
        model = _reinit_model(model_fn, seed)
        fresh = model.state_dict()
        same = all(torch.equal(fresh[k].cpu(), start[k]) for k in start if k in fresh and start[k].is_floating_point())
        if same:
            raise PrunekitError("control 'reinit': model_fn drew the same weights as the ticket; let model_fn take "
                                "a seed= argument (or leave the global torch seed to the caller)")
        masks = Masks.from_state_dict(model, ticket)
    else:
        model = model_fn()
        model.load_state_dict(start)
        masks = Masks.from_state_dict(model, random_masks(ticket, seed, str(level)))
    summary = dict(train_fn(model, masks, level, level_dir, rewind_epoch=None) or {})
    summary.pop("rewind_state", None)
    return summary
