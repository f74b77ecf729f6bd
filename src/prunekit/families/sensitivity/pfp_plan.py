"""PFP's selection for one round (seed 002, methods/sensitivity.md §5–7): the readers (compressed layers) of
the prunable channel groups, the groups that lose the channels all their readers drop, the kept-weight count of a
selection at one ε (from per-layer count matrices, no pass over the weights), channel rounding, the det
prediction of the size search, the step-by-step fill, and the per-weight masks of the chosen selection (see
:mod:`prunekit.families.sensitivity.pfp`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ...params import PrunableParam
from ...registry import ScoreContext
from ...structured.channel_group import ChannelGroup, row_channels
from ...structured.channel_masks import channel_masks_to_masks
from ...structured.latency_table import resolve_round_channels
from .pfp_reader import PREDICT_STEPS, Reader
from .scores import DRAW_CAP, KAPPA_MIN, is_conv1d, out_first

#: log ε range of the search (methods/sensitivity.md §5).
LOG_EPS_MIN, LOG_EPS_MAX = math.log(1e-300), math.log(1e150)
#: The layers whose weights pfp prunes.
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def readers_of(groups: Sequence[ChannelGroup]) -> dict[str, list[tuple[ChannelGroup, int]]]:
    out: dict[str, list[tuple[ChannelGroup, int]]] = {}
    for g in groups:
        for cname, block in g.consumers:
            out.setdefault(cname, []).append((g, block))
    return out


def input_group(p: PrunableParam, readers: Mapping[str, list]) -> tuple[ChannelGroup, int] | None:
    """(group, features per channel) when ``p``'s input channels may be pruned, else None."""
    got = readers.get(p.module_name, [])
    if p.attr != "weight" or len(got) != 1:
        return None
    g, block = got[0]
    m, w = p.module, p.tensor
    if not g.prunable or not (isinstance(m, LAYERS) or is_conv1d(m)):
        return None
    if is_conv1d(m):  # weight (in, out)
        return (g, block) if w.dim() == 2 and w.shape[0] == g.size * block else None
    if isinstance(m, nn.Linear):
        return (g, block) if w.dim() == 2 and w.shape[1] == g.size * block else None
    return (g, block) if m.groups == 1 and block == 1 and w.shape[1] == g.size else None



@dataclass
class _Counter:
    """Kept entries of one prunable weight for given kept rows and input channels: r^T A c."""

    name: str
    A: torch.Tensor              # (out, C or 1) float64: alive entries per (row, input channel)
    row_group: str | None        # group whose removed channels mask the rows
    reader: int | None           # index of the Reader compressing the input, or None
    units: torch.Tensor | None = None  # the channel of each row when a channel owns several (attention heads)


class Plan:
    """PFP's selection for one round: the readers, the groups that may lose channels, the counters."""

    def __init__(self, ctx: ScoreContext, scores: Mapping[str, torch.Tensor], st: dict, seed: int, min_keep: int):
        o = ctx.options
        self.model, self.variant, self.seed = ctx.model, o.variant, seed
        self.groups: list[ChannelGroup] = st["groups"]
        positions = st["positions"]
        self.params = list(ctx.params)
        self.alive = {p.name: ctx.masks[p.name].to(torch.bool) for p in self.params}
        readers = readers_of(self.groups)
        self.readers: list[Reader] = []
        reader_of: dict[str, int] = {}
        for p in self.params:
            ig = input_group(p, readers)
            if ig is None:
                continue
            g, block = ig
            out = out_first(p.module, p.tensor).shape[0]
            alive = out_first(p.module, self.alive[p.name]).reshape(out, g.size, -1).cpu()
            sc = out_first(p.module, scores[p.name].detach())
            s = (sc.reshape(out, g.size, -1).cpu().double() * alive).amax(dim=(0, 2))
            pos, k = positions[p.name]
            reader_of[p.module_name] = len(self.readers)
            self.readers.append(Reader(p, g.name, block, s.clamp(0.0, 1.0), alive.any(2).any(0), pos, k,
                                        o.delta_s, o.C, min_keep))
        # groups that lose the channels all their readers drop
        self.removable: dict[str, list[int]] = {}
        for g in self.groups:
            if g.prunable and g.consumers and all(c in reader_of for c, _ in g.consumers):
                self.removable[g.name] = [reader_of[c] for c, _ in g.consumers]
        self.round_to = resolve_round_channels(o.round_channels, ctx.model, st.get("example"))
        self.group_order: dict[str, tuple[torch.Tensor, int]] = {}  # rank of a group's channels, alive count
        for gname, idx in self.removable.items():
            best = torch.stack([self.readers[i].s for i in idx]).amax(0)
            alive = torch.stack([self.readers[i].alive for i in idx]).any(0)
            order = torch.sort(best + alive.double(), descending=True, stable=True).indices
            self.group_order[gname] = (order, int(alive.sum()))
        row_group = {pr: g for g in self.groups if g.name in self.removable for pr in g.producers}
        self.counters: list[_Counter] = []
        for p in self.params:
            a = out_first(p.module, self.alive[p.name])
            out = a.shape[0]
            r = reader_of.get(p.module_name) if p.attr == "weight" else None
            cols = self.readers[r].channels if r is not None else 1
            A = a.reshape(out, cols, -1).sum(2).cpu().double()
            g = row_group.get(p.module_name) if p.attr == "weight" else None
            units = row_channels(g) if g is not None and (g.rows != 1 or g.splits != 1) else None
            self.counters.append(_Counter(p.name, A, g.name if g is not None else None, r, units))
        active = [r for r in self.readers if r.nnz > 0]
        if active:
            t_hi = max(r.t_single() for r in active) + 1.0
            t_lo = min(r.t_full() for r in active) - 1.0
            self.t_hi = min(LOG_EPS_MAX, t_hi)
            self.t_lo = max(LOG_EPS_MIN, min(t_lo, self.t_hi - 1.0))
        else:
            self.t_lo, self.t_hi = LOG_EPS_MIN, LOG_EPS_MAX

    def t_of(self, x: float) -> float:
        return self.t_hi - x * (self.t_hi - self.t_lo)

    def units(self, t: float) -> list[int]:
        """u_ℓ(ε) of every reader at log ε = t."""
        return [r.unique(t) for r in self.readers]

    def evaluate_u(self, us: Sequence[int], variant: str | None = None,
                   ms: Sequence[int | None] | None = None) -> tuple[int, dict]:
        """(kept prunable weights, selection) when reader ℓ keeps u_ℓ = ``us[ℓ]`` input channels (``ms``: rand
        draw counts overriding those of u_ℓ)."""
        variant = variant or self.variant
        ms = ms if ms is not None else [None] * len(us)
        sel = [r.select(u, variant, self.seed, m) for r, u, m in zip(self.readers, us, ms)]
        group_keep = {}
        for gname, idx in self.removable.items():
            keep = torch.zeros_like(sel[idx[0]][0])
            for i in idx:
                keep |= sel[i][0]
            if not bool(keep.any()):
                keep[0] = True
            if self.round_to > 1:
                added = self._round_up(gname, keep)
                if added is not None:
                    keep = keep | added
                    for i in idx:  # every reader reads the channels the rounding brings back (unscaled)
                        sel[i] = (sel[i][0] | added, sel[i][1], sel[i][2])
            group_keep[gname] = keep
        kept = 0.0
        for c in self.counters:
            v = c.A @ sel[c.reader][0].double() if c.reader is not None else c.A[:, 0]
            if c.row_group is not None:
                gk = group_keep[c.row_group]
                kept += float(v @ (gk if c.units is None else gk[c.units]).double())
            else:
                kept += float(v.sum())
        kept = int(round(kept))
        return kept, {"u": list(us), "select": sel, "groups": group_keep}

    def _round_up(self, gname: str, keep: torch.Tensor) -> torch.Tensor | None:
        """The channels that bring group ``gname``'s kept count up to a multiple of ``round_channels`` (or to all its
        alive channels): the best ones not yet kept, by the largest sensitivity any reader gives them; None when
        the count is already one."""
        order, n_alive = self.group_order[gname]
        n = int(keep.sum())
        want = min(self.round_to * math.ceil(n / self.round_to), max(n_alive, n))
        if want <= n:
            return None
        free = order[~keep[order]][:want - n]
        added = torch.zeros_like(keep)
        added[free] = True
        return added

    def evaluate_t(self, t: float, variant: str | None = None) -> tuple[int, dict]:
        kept, res = self.evaluate_u(self.units(t), variant)
        res["t"] = t
        return kept, res

    def evaluate(self, x: float) -> tuple[int, dict]:
        return self.evaluate_t(self.t_of(x))

    def predict(self, count: float) -> float:
        """x whose det size is closest to ``count`` (bisection; the det size does not decrease with x)."""
        lo, hi = 0.0, 1.0
        k_lo = self.evaluate_t(self.t_of(lo), "det")[0]
        k_hi = self.evaluate_t(self.t_of(hi), "det")[0]
        if count <= k_lo:
            return KAPPA_MIN
        if count >= k_hi:
            return 1.0
        for _ in range(PREDICT_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            k = self.evaluate_t(self.t_of(mid), "det")[0]
            if k == count:
                return mid
            if k < count:
                lo, k_lo = mid, k
            else:
                hi, k_hi = mid, k
        return max(KAPPA_MIN, lo if count - k_lo <= k_hi - count else hi)

    def fill(self, t: float, target: int, tol: float) -> tuple[int, dict, int, list[str]]:
        """Continue the shared-ε path past log ε = ``t`` (a selection below the target) one step at a time.

        A step is u_ℓ → u_ℓ + 1 (det, top), or one more draw for a sampling rand layer (each adds at most one
        channel; the draws of u_ℓ + 1 belong to the ε where u_ℓ + 1 is reached). The next step is the one the
        shared ε reaches first as it decreases (largest entry ε, lower reader index on ties); it is taken if the
        size stays ≤ target·(1 + tol), else that reader is frozen where it is. Stops within tol, or when every
        reader is frozen or full. Returns (kept, selection, steps taken, frozen readers)."""
        us = self.units(t)
        sampling = [self.variant == "rand" and 0 < u < r.nnz for r, u in zip(self.readers, us)]
        ms = [r.draws_for(r.p, u) if smp else None for r, u, smp in zip(self.readers, us, sampling)]
        kept, res = self.evaluate_u(us, ms=ms)
        taken, frozen, nxt = 0, set(), {}
        hi_ok = target * (1.0 + tol)

        def step(i: int) -> tuple[float, int, int | None]:
            """(entry log ε, new u, new draws) of reader i's next step."""
            r = self.readers[i]
            if ms[i] is None:
                return r.entry(us[i] + 1, self.t_lo, t), us[i] + 1, None
            v = int(math.floor(r.expected_unique(ms[i] + 1) + 0.5))
            if v >= r.nnz or ms[i] >= DRAW_CAP * r.nnz:  # the layer becomes full (every channel, unscaled)
                return r.entry(r.nnz, self.t_lo, t), r.nnz, None
            return (r.entry(v, self.t_lo, t) if v > us[i] else t), max(us[i], v), ms[i] + 1

        while kept < target * (1.0 - tol):
            for i, r in enumerate(self.readers):
                if i not in frozen and i not in nxt and us[i] < r.nnz:
                    nxt[i] = step(i)
            if not nxt:
                break
            i = max(nxt, key=lambda j: (nxt[j][0], -j))
            _, u_new, m_new = nxt.pop(i)
            trial_u, trial_m = list(us), list(ms)
            trial_u[i], trial_m[i] = u_new, m_new
            k, r = self.evaluate_u(trial_u, ms=trial_m)
            if k <= hi_ok:
                us, ms, kept, res = trial_u, trial_m, k, r
                taken += 1
            else:
                frozen.add(i)
        res["t"] = t
        return kept, res, taken, [self.readers[i].param.name for i in sorted(frozen)]

    def masks(self, result: dict) -> dict[str, torch.Tensor]:
        """Per-weight masks of a selection: current masks AND removed channels AND dropped input slices."""
        removed = {g: k for g, k in result["groups"].items() if not bool(k.all())}
        wm = channel_masks_to_masks(self.model, self.groups, removed) if removed else {}
        out = {}
        for c in self.counters:
            m = self.alive[c.name].clone()
            if c.name in wm:
                m &= wm[c.name].to(m.device)
            if c.reader is not None:
                keep = result["select"][c.reader][0].to(m.device)
                mo = out_first(self.readers[c.reader].param.module, m)  # a view: writes reach m
                view = mo.view(mo.shape[0], keep.numel(), -1)
                view[:, ~keep, :] = False
            out[c.name] = m
        return out
