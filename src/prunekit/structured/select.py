"""Channel selection for structured (filter) pruning: which channels to keep so the network meets a size target.

    from prunekit.structured import channel_groups, example_input_for, filter_norm_scores, select_channels
    groups = channel_groups(model, example_input_for(model, data))
    keep, kept = select_channels(model, groups, filter_norm_scores(model, groups, p=1), target_kept=10_000,
                                 alive={n: torch.ones_like(p, dtype=torch.bool) for n, p in weights})
    masks = masks_from_channels(model, groups, keep, alive)        # per-weight masks, nested in ``alive``

Size. The size of a selection is the number of kept entries of the tensors in ``alive`` (the current masks of
the prunable tensors) once every removed channel's producer rows (and biases, BN entries if they are masked) and
consumer slices are zeroed: exactly ``channel_masks_to_masks`` combined with ``alive``. It is computed from
per-tensor count matrices (alive entries per output channel x input channel), so a size costs a few small
matrix-vector products, not a pass over the weights.

Order. The candidate channels of the prunable groups are put in one order, and a selection keeps a prefix of it
(plus ``min_keep`` best channels per group, always kept):

- ``uniform``: group ``g`` with ``a_g`` alive channels keeps its ``round(f * a_g)`` best channels for a keep
  fraction ``f``. Its r-th best channel enters at ``f = (r - 0.5) / a_g``; channels are ordered by that
  fraction, so every prefix keeps ``round(f * a_g)`` channels in every group, within one channel where several
  groups enter at the same ``f`` (ties go to the group that comes first in the forward pass).
- ``global``: one ranking of all channels by score, descending. With ``normalize="max"`` the scores are first
  divided by the largest score of the group's alive channels (so a layer of large weights does not win just by
  scale; the best channel of each group scores 1); ``normalize="none"`` compares raw scores (network slimming
  compares BN |gamma| across layers as they are).

Rounding (``round_to = k > 1``). A group's candidates are blocks of k channels by rank (its best ``min_keep``
rounded up to a block are forced, the last block ends at its alive count), so every prefix, and every walk,
keeps a multiple of k channels in every group, or all its alive channels. A block's uniform key is the fraction
at its middle, ``(r_first + r_last - 1) / (2 a_g)``; its global key the mean of its channels' normalized scores.
The walks move whole blocks, and in ``uniform`` mode stay within one block of the common fraction. With k = 1
this is exactly the order above.

Search. The size grows with the prefix length, so bisection (at most ``ceil(log2(channels + 1))`` <= 40 steps)
finds the prefixes just below and just above ``target_kept``; the one within ``size_tol`` (relative) is taken,
the one below when both are. One channel can carry many weights (a conv channel feeding a flattened linear
layer), so when neither prefix is within ``size_tol`` the selection walks the order from both sides: up from
the lower prefix, adding the following channels that still fit and passing over those that do not, and down
from the upper prefix, keeping the channel that overshot and dropping the channels before it, last first. Once a
channel of a group is passed over, that group changes no further, so each group always keeps a top set of its
channels. In ``uniform`` mode a walk also stops where the passed-over group would be more than one channel off
the common fraction: every group stays within one channel of ``f * a_g`` for one ``f``. Of all candidates, the
ones within ``size_tol`` win (not exceeding the target first, then the closest); else the closest (the one not
exceeding on a tie), with a warning.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import PrunekitError, closest
from .channel_group import ChannelGroup, row_channels, transposed
from .channel_masks import channel_masks_from_masks
from .channel_scores import bn_scale_scores, cached_channel_groups, example_input_for, filter_norm_scores

log = logging.getLogger(__name__)

__all__ = ["example_input_for", "select_channels", "masks_from_channels", "filter_norm_scores", "bn_scale_scores",
           "broadcast_channel_scores", "cached_channel_groups", "MODES", "NORMALIZATIONS"]

MODES = ("uniform", "global")
NORMALIZATIONS = ("max", "none")
#: warn about non-prunable groups when the rows they hold exceed this fraction of the prunable weights
_WARN_FRACTION = 0.10


# ------------------------------------------------------------------------------------------------- tensor plans
@dataclass
class _Plan:
    """How one masked tensor meets the selected groups: dims of its output / input channels and a count matrix."""

    name: str
    out_g: str | None
    out_dim: int
    in_g: str | None
    in_dim: int
    block: int
    C: torch.Tensor | None = None  # float64 (n_out or 1, n_in or 1): alive entries per channel pair
    out_rows: torch.Tensor | None = None  # the channel of each output unit when a channel owns several (heads)

    def count(self, keep: Mapping[str, torch.Tensor]) -> float:
        ko = keep[self.out_g] if self.out_g else None
        ki = keep[self.in_g] if self.in_g else None
        v = self.C @ ki if ki is not None else self.C.sum(1)
        return float(ko @ v if ko is not None else v.sum())


def _sides(mods: Mapping[str, nn.Module], name: str, shape: tuple, by: Mapping[str, dict]) -> _Plan:
    mname, _, attr = name.rpartition(".")
    mod = mods.get(mname)
    plan = _Plan(name, None, 0, None, 0, 1)
    g = by["producer"].get(mname) if attr in ("weight", "bias") else None
    if g is not None:
        d = 1 if (attr == "weight" and transposed(mod)) else 0
        if len(shape) > d and shape[d] == g.size * g.rows * g.splits:
            plan.out_g, plan.out_dim = g.name, d
            if g.rows != 1 or g.splits != 1:
                plan.out_rows = row_channels(g)
    g = by["norm"].get(mname) if attr in ("weight", "bias") and plan.out_g is None else None
    if g is not None and len(shape) >= 1 and shape[0] == g.size:
        plan.out_g, plan.out_dim = g.name, 0
    hit = by["consumer"].get(mname) if attr == "weight" else None
    if hit is not None:
        g, block = hit
        d = 0 if transposed(mod) else 1
        if len(shape) > d and shape[d] == g.size * block and not (plan.out_g and plan.out_dim == d):
            plan.in_g, plan.in_dim, plan.block = g.name, d, block
    return plan


def _index(groups: Sequence[ChannelGroup]) -> dict[str, dict]:
    by: dict[str, dict] = {"producer": {}, "norm": {}, "consumer": {}}
    for g in groups:
        for p in g.producers:
            by["producer"][p] = g
        for n in g.norms:
            by["norm"][n] = g
        for c, block in g.consumers:
            by["consumer"][c] = (g, block)
    return by


def _plans(model: nn.Module, groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor],
           full: Mapping[str, bool] | None = None) -> list[_Plan]:
    """One plan per tensor of ``alive``, over ``groups`` (the selectable ones), with its count matrix (exact
    integer counts; ``full``: the tensors already known to be entirely alive, by name)."""
    mods = dict(model.named_modules())
    by = _index(groups)
    sizes = {g.name: g.size for g in groups}
    plans = []
    for name, a in alive.items():
        plan = _sides(mods, name, tuple(a.shape), by)
        n_out = sizes[plan.out_g] if plan.out_g else 1
        n_in = sizes[plan.in_g] if plan.in_g else 1
        units = a.shape[plan.out_dim] if plan.out_g else 1  # output units: channels x rows x splits
        if (full[name] if full is not None and name in full else bool(a.all())):  # every entry alive (a first round): the same count in every cell
            C = torch.full((units, n_in), a.numel() / (units * n_in), dtype=torch.float64)
        else:
            x = a.detach()
            lead = [d for d, g in ((plan.out_dim, plan.out_g), (plan.in_dim, plan.in_g)) if g]
            if lead:
                x = x.permute(lead + [d for d in range(x.dim()) if d not in lead])
            C = torch.count_nonzero(x.reshape(units, n_in, -1), dim=-1).to(device="cpu", dtype=torch.float64)
        if plan.out_rows is not None:
            C = torch.zeros((n_out, n_in), dtype=torch.float64).index_add_(0, plan.out_rows, C)
        plan.C = C
        plans.append(plan)
    return plans


def _view(vec: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[dim] = -1
    return vec.reshape(shape)


def masks_from_channels(model: nn.Module, groups: Sequence[ChannelGroup], channel_masks: Mapping[str, torch.Tensor],
                        alive: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor masks for every tensor of ``alive``: ``alive`` AND the removal of the channels that
    ``channel_masks`` drops (``{group name: bool keep}``): producer weight rows and biases, norm ``weight``/``bias``
    entries (when those are masked tensors) and consumer input slices. For weights this equals
    ``channel_masks_to_masks`` combined with ``alive``; the result is on the devices of ``alive``."""
    named = {g.name: g for g in groups}
    unknown = [n for n in channel_masks if n not in named]
    if unknown:
        raise PrunekitError(f"channel mask for unknown group {unknown[0]!r}")
    chosen = [named[n] for n in channel_masks]
    keep = {n: torch.as_tensor(m).detach().to("cpu", torch.bool).reshape(-1) for n, m in channel_masks.items()}
    mods = dict(model.named_modules())
    by = _index(chosen)
    out = {}
    for name, a in alive.items():
        a = a.to(torch.bool)
        plan = _sides(mods, name, tuple(a.shape), by)
        cut = None  # the kept (output unit, input feature) pairs as a small broadcastable mask
        if plan.out_g:
            k = keep[plan.out_g] if plan.out_rows is None else keep[plan.out_g][plan.out_rows]
            cut = _view(k.to(a.device), plan.out_dim, a.dim())
        if plan.in_g:
            k = keep[plan.in_g].repeat_interleave(plan.block) if plan.block != 1 else keep[plan.in_g]
            k = _view(k.to(a.device), plan.in_dim, a.dim())
            cut = k if cut is None else cut & k
        out[name] = a.clone() if cut is None else a & cut  # one pass over the tensor
    return out


def broadcast_channel_scores(model: nn.Module, groups: Sequence[ChannelGroup], channel_scores: Mapping[str, torch.Tensor],
                             tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-entry scores (float32, same shape and device as each tensor of ``tensors``) from channel scores.

    An entry of a producer row (or bias, or norm entry) gets the score of its output channel, an entry of a
    consumer slice the score of its input channel, an entry that is both the smaller of the two (it goes as soon
    as either channel goes); entries of no prunable group in ``channel_scores`` get +inf (never removed by
    channel pruning)."""
    chosen = [g for g in groups if g.prunable and g.name in channel_scores]
    mods = dict(model.named_modules())
    by = _index(chosen)
    out = {}
    for name, t in tensors.items():
        plan = _sides(mods, name, tuple(t.shape), by)
        views = []
        if plan.out_g:
            v = torch.as_tensor(channel_scores[plan.out_g]).to(device=t.device, dtype=torch.float32)
            v = v if plan.out_rows is None else v[plan.out_rows.to(t.device)]
            views.append(_view(v, plan.out_dim, t.dim()))
        if plan.in_g:
            v = torch.as_tensor(channel_scores[plan.in_g]).to(device=t.device, dtype=torch.float32)
            v = v.repeat_interleave(plan.block) if plan.block != 1 else v
            views.append(_view(v, plan.in_dim, t.dim()))
        if not views:
            out[name] = torch.full(t.shape, math.inf, dtype=torch.float32, device=t.device)
        elif len(views) == 1:
            out[name] = views[0].expand(t.shape).contiguous()
        else:  # one pass: the broadcast minimum has the tensor's shape
            out[name] = torch.minimum(views[0], views[1]).expand(t.shape).contiguous()
    return out


# ------------------------------------------------------------------------------------------------- selection
def _warn_fixed(model: nn.Module, groups: Sequence[ChannelGroup], alive: Mapping[str, torch.Tensor],
                n_alive: int) -> None:
    """One warning naming the groups that cannot lose channels when their rows hold > 10% of the weights."""
    fixed = [g for g in groups if not g.prunable]
    if not fixed or n_alive == 0:
        return
    held = {}
    for g in fixed:
        for p in g.producers:
            for attr in ("weight", "bias"):
                name = f"{p}.{attr}" if p else attr
                if name in alive:
                    held[g.name] = held.get(g.name, 0) + int(alive[name].sum())
    total = sum(held.values())
    if total > _WARN_FRACTION * n_alive:
        reasons = "; ".join(f"{g.name!r} ({g.reason})" for g in fixed if held.get(g.name))
        warnings.warn(f"channel pruning works around {len(held)} channel group(s) that cannot lose channels and "
                      f"hold {total / n_alive:.1%} of the prunable weights: {reasons}", stacklevel=3)


def _describe_fixed(plans: list[_Plan], n: int = 3) -> str:
    fixed: dict[str, float] = {}
    for p in plans:
        if not p.out_g and not p.in_g:
            mod = p.name.rpartition(".")[0] or p.name
            fixed[mod] = fixed.get(mod, 0.0) + float(p.C.sum())
    top = sorted((v, k) for k, v in fixed.items() if v > 0)[::-1][:n]
    return ", ".join(f"'{k}' ({int(v)})" for v, k in top)


def _largest_sparsity(c_min: float, total: int, tol: float) -> tuple[float, int]:
    """The largest sparsity, rounded down to as few decimals as possible (4 to 9), whose target keeps ``c_min``
    within ``tol``; and the number of decimals."""
    exact = 1.0 - c_min / total
    for digits in range(4, 10):
        s = math.floor(exact * 10 ** digits) / 10 ** digits
        target = math.floor((1.0 - s) * total + 0.5)
        if abs(c_min - target) <= tol * max(target, 1):
            return max(0.0, s), digits
    return max(0.0, s), 9


class _Selector:
    """Channel order, prefix sizes and the walks of :func:`select_channels`."""

    def __init__(self, groups, scores, alive_ch, plans, mode, min_keep, normalize, round_to: int = 1):
        self.groups, self.plans = groups, plans
        self.by_group: dict[str, list[int]] = {g.name: [] for g in groups}
        for i, p in enumerate(plans):
            for g in {p.out_g, p.in_g} - {None}:
                self.by_group[g].append(i)
        self.active = [i for i, p in enumerate(plans) if p.out_g or p.in_g]
        self.fixed_count = sum(float(p.C.sum()) for p in plans if not (p.out_g or p.in_g))
        self.pos: dict[str, torch.Tensor] = {}   # per channel: -1 forced, >= 0 position in the order, inf dead
        # the candidate items (blocks of round_to channels by rank), per group in rank order: key, group, ranks
        keys, gids, r_first, r_last, sizes, spans = [], [], [], [], [], []
        self._ranked: list[torch.Tensor] = []
        for gi, g in enumerate(groups):
            s, live = scores[g.name], alive_ch[g.name]
            a = int(live.sum())
            key = torch.where(live, s, torch.full_like(s, -math.inf))
            ranked = torch.sort(key, descending=True, stable=True).indices[:a]
            self._ranked.append(ranked)
            m = min(_round_up(min(min_keep, a), round_to), a)
            pos = torch.full((g.size,), math.inf, dtype=torch.float64)
            pos[ranked[:m]] = -1.0
            self.pos[g.name] = pos
            if m >= a:
                spans.append(None)
                continue
            # blocks of round_to channels by rank: ranks m+1..m+k, m+k+1..m+2k, ..., the last one ends at a
            r_s = torch.arange(m + 1, a + 1, round_to, dtype=torch.int64)
            r_e = torch.clamp(r_s + (round_to - 1), max=a)
            if mode == "uniform":
                k = (r_s + r_e - 1).to(torch.float64) / (2.0 * a)   # (r - 0.5) / a for single channels
            else:
                scale = 1.0
                if normalize == "max":
                    top = float(s[ranked].abs().max())
                    scale = top if math.isfinite(top) and top > 0 else 1.0
                if round_to == 1:
                    k = -(s[ranked[m:]] / scale)
                else:
                    k = torch.tensor([float(-(s[ranked[f - 1:e]] / scale).mean()) for f, e in
                                      zip(r_s.tolist(), r_e.tolist())], dtype=torch.float64)
            spans.append((len(keys), m))
            keys.append(k)
            gids.append(torch.full((r_s.numel(),), gi, dtype=torch.int64))
            r_first.append(r_s)
            r_last.append(r_e)
            sizes.append(torch.full((r_s.numel(),), float(a), dtype=torch.float64))
        cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))
        key_all = cat(keys, torch.float64)
        # stable: forward order of groups, then rank (the order of a stable sort of the keys in that order)
        order = torch.sort(key_all, stable=True).indices
        item_of = torch.empty_like(order)
        item_of[order] = torch.arange(order.numel())
        g_all, rs_all, re_all, a_all = (cat(gids, torch.int64), cat(r_first, torch.int64), cat(r_last, torch.int64),
                                        cat(sizes, torch.float64))
        self.item_key = key_all[order].tolist()
        self.item_g = g_all[order].tolist()
        self.item_rs = rs_all[order].tolist()
        self.item_re = re_all[order].tolist()
        self.item_a = a_all[order].tolist()
        offsets = torch.cumsum(torch.tensor([0] + [x.numel() for x in keys], dtype=torch.int64), 0).tolist()
        for gi, span in enumerate(spans):
            if span is None:
                continue
            ki, m = span
            ranked = self._ranked[gi]
            block = torch.arange(ranked.numel() - m, dtype=torch.int64) // round_to   # each channel's item
            self.pos[groups[gi].name][ranked[m:]] = item_of[offsets[ki] + block].to(torch.float64)
        self.n_items = len(self.item_g)
        self.mode = mode
        self.evaluations = 0

    def _channels(self, j: int) -> torch.Tensor:
        """The channels of item ``j`` of the order."""
        return self._ranked[self.item_g[j]][self.item_rs[j] - 1:self.item_re[j]]

    def keep(self, k: int) -> dict[str, torch.Tensor]:
        return {name: (pos < k).to(torch.float64) for name, pos in self.pos.items()}

    def count_keep(self, keep: Mapping[str, torch.Tensor]) -> tuple[float, list[float]]:
        parts = [self.plans[i].count(keep) for i in self.active]
        return self.fixed_count + sum(parts), parts

    def count(self, k: int) -> float:
        self.evaluations += 1
        return self.count_keep(self.keep(k))[0]

    def adjust(self, k: int, target: int, tol: float, add: bool) -> tuple[float, dict[str, torch.Tensor]]:
        """From prefix ``k``, walk the order to get within ``tol`` of ``target`` (see the module docstring).

        ``add``: continue past the prefix with the channels that fit (size <= target·(1 + tol)). Otherwise the
        prefix ends with the channel that overshoots: keep it and drop the channels before it, last first, while
        the size stays >= target·(1 - tol). A group whose channel is passed over takes no further change (each
        group keeps a top set); in uniform mode the walk stops where that group would be more than one channel
        off the common keep fraction."""
        keep = self.keep(k)
        total, parts = self.count_keep(keep)
        part_of = {i: j for j, i in enumerate(self.active)}
        hi_ok, lo_ok = target * (1.0 + tol), target * (1.0 - tol)
        blocked: set[int] = set()
        if add:
            bound, steps = math.inf, range(k, self.n_items)
        else:
            last = k - 1
            blocked.add(self.item_g[last])
            bound, steps = (self.item_rs[last] - 1) / self.item_a[last], range(k - 2, -1, -1)
        for j in steps:
            if (lo_ok <= total <= target) if not add else (lo_ok <= total):
                break
            if self.mode == "uniform" and (self.item_key[j] >= bound if add else self.item_key[j] <= bound):
                break
            gi = self.item_g[j]
            if gi in blocked:
                continue
            name, c = self.groups[gi].name, self._channels(j)
            keep[name][c] = 1.0 if add else 0.0
            touched = self.by_group[name]
            new = {i: self.plans[i].count(keep) for i in touched}
            cand = total + sum(new[i] - parts[part_of[i]] for i in touched)
            if (cand <= hi_ok) if add else (cand >= lo_ok):
                total = cand
                for i in touched:
                    parts[part_of[i]] = new[i]
            else:
                keep[name][c] = 0.0 if add else 1.0
                blocked.add(gi)
                a = self.item_a[j]
                bound = min(bound, self.item_re[j] / a) if add else max(bound, (self.item_rs[j] - 1) / a)
                if len(blocked) == len(self.groups):
                    break
        return total, keep


def _round_up(n: int, k: int) -> int:
    return k * math.ceil(n / k) if k > 1 else n


def _check_arguments(mode: str, normalize: str, min_keep: int, size_tol: float, round_to: int = 1) -> None:
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise PrunekitError(f"round_channels must be an int >= 1 (kept channel counts are multiples of it), got "
                            f"{round_to!r}")
    if mode not in MODES:
        raise PrunekitError(f"allocation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if normalize not in NORMALIZATIONS:
        raise PrunekitError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 1:
        raise PrunekitError(f"min_keep must be an int >= 1 (a group cannot lose every channel), got {min_keep!r}")
    if not 0.0 <= float(size_tol) < 1.0:
        raise PrunekitError(f"size_tol must be in [0, 1), got {size_tol!r}")


def _selectable_groups(groups: Sequence[ChannelGroup], channel_scores: Mapping[str, torch.Tensor],
                       alive: Mapping[str, torch.Tensor]) -> list[ChannelGroup]:
    """The groups that take part (prunable, scored, every producer's weight in ``alive``); scores of a group that
    does not exist are refused."""
    named = {g.name: g for g in groups}
    unknown = [n for n in channel_scores if n not in named]
    if unknown:
        near = closest(unknown[0], list(named))
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise PrunekitError(f"channel scores for unknown group {unknown[0]!r}{hint}")
    return [g for g in groups if g.prunable and g.name in channel_scores
            and all((f"{p}.weight" if p else "weight") in alive for p in g.producers)]


def _group_scores(chosen: Sequence[ChannelGroup], channel_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores of each chosen group as a float64 CPU vector of the group's size, without NaN."""
    scores = {}
    for g in chosen:
        s = torch.as_tensor(channel_scores[g.name]).detach().to("cpu", torch.float64).reshape(-1)
        if s.numel() != g.size:
            raise PrunekitError(f"channel scores of group {g.name!r} have {s.numel()} entries, the group has {g.size}")
        if bool(torch.isnan(s).any()):
            raise PrunekitError(f"channel scores of group {g.name!r} contain NaN")
        scores[g.name] = s
    return scores


def _within(c: float, target: int, tol: float) -> bool:
    """``c`` kept entries are within the relative tolerance ``tol`` of ``target``."""
    return abs(c - target) <= tol * max(target, 1)


def _unreachable(sel: _Selector, plans: list[_Plan], c_min: float, target: int, total: int, min_keep: int,
                 n_groups: int, tol: float) -> PrunekitError:
    """The error for a target below the smallest network: the largest reachable sparsity and what to do."""
    smax, digits = _largest_sparsity(c_min, total, tol)
    fixed = _describe_fixed(plans)
    where = (f"; {int(sel.fixed_count)} of them are in tensors no prunable channel group touches: {fixed}"
             if fixed else "")
    return PrunekitError(
        f"cannot keep only {target} of {total} weights (sparsity {1 - target / total:.4f}) by removing whole "
        f"channels: the smallest network, with {min_keep} channel(s) in each of {n_groups} prunable group(s), "
        f"keeps {int(c_min)} (the largest reachable sparsity is {smax:.{digits}f}){where}. Ask for "
        f"sparsity <= {smax:.{digits}f}, or leave the layers that cannot shrink out of pruning (exclude=[...] or "
        "exclude_output=True) so they do not count")


def _bracket(sel: _Selector, c_min: float, target: int) -> tuple[int, float, int, float]:
    """(lo, size of lo, hi, size of hi): bisection for the prefixes just below and just above ``target``; lo = hi =
    every item when the whole order fits."""
    lo, hi = 0, sel.n_items
    c_lo, c_hi = c_min, sel.count(hi)
    if c_hi <= target:
        return hi, c_hi, hi, c_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = sel.count(mid)
        if c <= target:
            lo, c_lo = mid, c
        else:
            hi, c_hi = mid, c
    return lo, c_lo, hi, c_hi


def _best_selection(sel: _Selector, c_min: float, target: int, tol: float
                    ) -> tuple[int, float, dict[str, torch.Tensor] | None]:
    """(prefix length, size, None) of the selection closest to ``target`` (see the module docstring), or
    (-1, size, keep vectors) when a walk off the prefixes wins."""
    if c_min >= target or sel.n_items == 0:
        return 0, c_min, None
    lo, c_lo, hi, c_hi = _bracket(sel, c_min, target)
    if _within(c_lo, target, tol) or lo == sel.n_items:
        return lo, c_lo, None
    if _within(c_hi, target, tol):
        return hi, c_hi, None
    # one channel jumps over the tolerance band: walk up from below, then down from above
    cands = [(c_lo, lo), (c_hi, hi), sel.adjust(lo, target, tol, add=True)]
    if not _within(cands[-1][0], target, tol):
        cands.append(sel.adjust(hi, target, tol, add=False))
    best_c, best = min(cands, key=lambda t: (0, t[0] > target, abs(t[0] - target)) if _within(t[0], target, tol)
                       else (1, abs(t[0] - target), t[0] > target))
    if isinstance(best, dict):
        return -1, best_c, best
    return best, best_c, None


def select_channels(model: nn.Module, groups: Sequence[ChannelGroup], channel_scores: Mapping[str, torch.Tensor],
                    target_kept: int, alive: Mapping[str, torch.Tensor], mode: str = "uniform", min_keep: int = 1,
                    size_tol: float = 0.005, *, normalize: str = "max", round_to: int = 1
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """Which channels of the prunable groups to keep so that ``target_kept`` entries of ``alive`` remain.

    - ``groups``: from :func:`prunekit.structured.channel_groups`. A group takes part when it is prunable, has
      scores in ``channel_scores`` (``{group name: 1-D tensor of its size}``, higher = keep) and every producer's
      ``weight`` is in ``alive``; every other group is left whole (a warning names the non-prunable ones with
      their reasons when their rows hold more than 10% of the weights).
    - ``alive``: ``{tensor name: bool mask}``, the current masks of the prunable tensors; the size counted is the
      number of their kept entries after the removal (see the module docstring). Channels whose producer rows or
      consumer slices are already fully masked count as removed and are never kept again (masks stay nested).
    - ``mode``: ``uniform`` (the same keep fraction in every group, +-1 channel) or ``global`` (one ranking of
      the scores, normalized per group by their maximum with ``normalize="max"``, raw with ``"none"``).
    - ``min_keep``: channels always kept per group (its best alive ones), at least 1.
    - ``round_to``: every group keeps a multiple of ``round_to`` channels or all its alive channels (a group
      moves in blocks of ``round_to`` channels; ``min_keep`` is rounded up to a block).

    Returns ``({group name: bool keep mask}, achieved kept entries)`` for the groups that take part. The achieved
    size is the closest reachable one, within ``size_tol`` relative whenever a selection reaches that (a
    warning says so otherwise). Raises :class:`PrunekitError` when even the smallest network (``min_keep``
    channels in each group, plus every entry outside the selectable groups) keeps more than ``target_kept`` by
    more than ``size_tol``: the message gives the largest reachable sparsity and how to prune further.
    """
    _check_arguments(mode, normalize, min_keep, size_tol, round_to)
    target = int(target_kept)
    alive = {n: torch.as_tensor(m).to(torch.bool) for n, m in alive.items()}
    total = sum(m.numel() for m in alive.values())
    full = {n: bool(m.all()) for n, m in alive.items()}   # one pass; the counts only where entries are pruned
    n_alive = sum(m.numel() if full[n] else int(m.sum()) for n, m in alive.items())
    if target < 0 or target > n_alive:
        raise PrunekitError(f"target of {target} kept weights is outside [0, {n_alive}] (the alive entries; masks "
                            "are nested, so pruned weights cannot come back)")
    chosen = _selectable_groups(groups, channel_scores, alive)
    _warn_fixed(model, groups, alive, n_alive)
    scores = _group_scores(chosen, channel_scores)
    if all(full.values()):  # nothing pruned yet: every channel is alive
        alive_ch = {g.name: torch.ones(g.size, dtype=torch.bool) for g in chosen}
    else:
        alive_ch = channel_masks_from_masks(model, chosen, alive, side="either") if chosen else {}
    plans = _plans(model, chosen, alive, full)
    sel = _Selector(chosen, scores, alive_ch, plans, mode, min_keep, normalize, round_to)
    c_min = sel.count(0)
    if c_min > target and not _within(c_min, target, size_tol):
        raise _unreachable(sel, plans, c_min, target, total, min_keep, len(chosen), size_tol)
    best_k, best_c, keep = _best_selection(sel, c_min, target, size_tol)
    if keep is None:
        keep = sel.keep(best_k)
    channel_masks = {g.name: keep[g.name] > 0.5 for g in chosen}
    achieved = int(round(best_c))
    log.info("select_channels (%s): kept %d of target %d weights (%+.4f) after %d size evaluations%s", mode,
             achieved, target, achieved / max(target, 1) - 1.0, sel.evaluations, " and a walk" if best_k < 0 else "")
    if not _within(achieved, target, size_tol):
        warnings.warn(f"channel selection ({mode}) keeps {achieved} weights for a target of {target} "
                      f"({achieved / max(target, 1) - 1:+.2%}), outside size_tol={size_tol:g}: single channels carry "
                      "too many weights to get closer", stacklevel=2)
    return channel_masks, achieved
