"""Scores -> masks.

Rules (METHODS.md, pai.md section 3.2):

- Global scope keeps k = round((1 - s)·N) entries (round half up), at least one when s < 1. Layer scope keeps
  k_l = max(1, round((1 - s)·n_l)) in each tensor, capped by what is still alive there.
- Entries are ordered by (score descending, flat index ascending) and the first k are kept: exact counts and
  deterministic ties. (SynFlow/PX prune every entry with score <= the k-th value and over-prune on ties; seed 000
  breaks ties arbitrarily with topk. prunekit does neither.)
- Only alive entries compete, so masks are nested: a pruned entry is never revived.
- NaN scores raise (``nan_policy="error"``, naming tensors and counts) or rank lowest (``"lowest"``); +inf ranks
  first. (topk ranks NaN above every number, so seed 000 keeps exactly the weights whose fbss score is undefined.)
- ``min_keep_per_layer = q`` (global scope) first reserves the q best alive entries of every tensor.

The selection runs in O(N) with ``kthvalue`` rather than a full sort.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

from .errors import PrunekitError

SCOPES = ("global", "layer")
NAN_POLICIES = ("error", "lowest")


def check_sparsity(sparsity: float, allow_one: bool = False) -> float:
    """Validate a sparsity value: a number in [0, 1) (or [0, 1] with ``allow_one``)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise PrunekitError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    hi_ok = s <= 1.0 if allow_one else s < 1.0
    if not (s >= 0.0 and hi_ok) or math.isnan(s):
        raise PrunekitError(
            f"sparsity {sparsity!r} is outside [0, 1): it is the fraction of prunable weights removed "
            "(0.9 keeps 10%); to give the kept fraction use density=..."
        )
    return s


def keep_count(n: int, sparsity: float, at_least_one: bool = True) -> int:
    """round((1 - s)·n), half up; at least 1 when s < 1 and ``at_least_one``."""
    if sparsity >= 1.0:
        return 0
    k = int(math.floor((1.0 - sparsity) * n + 0.5))
    return max(1, k) if at_least_one and n > 0 else min(k, n)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; ties go to the lower index. O(n)."""
    n = scores.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    thr = torch.kthvalue(scores, n - k + 1).values
    keep = scores > thr
    need = k - int(keep.sum())
    if need > 0:  # the first `need` entries equal to the threshold, in index order (int64 of the ties only)
        keep[torch.nonzero(scores == thr, as_tuple=True)[0][:need]] = True
    return keep


def clean_scores(name: str, s: torch.Tensor, nan_policy: str) -> torch.Tensor:
    """Scores as a floating tensor with NaN handled by ``nan_policy`` (``error`` raises naming ``name``,
    ``lowest`` maps NaN to -inf)."""
    s = s.detach()
    if not torch.is_floating_point(s):
        s = s.double()
    nan = torch.isnan(s)
    if bool(nan.any()):
        if nan_policy == "error":
            raise PrunekitError(
                f"scores of {name!r} contain {int(nan.sum())} NaN values of {s.numel()}; fix the method's inputs or "
                "pass nan_policy='lowest' to rank them last"
            )
        s = torch.where(nan, torch.full_like(s, -math.inf), s)
    return s


def select(
    scores: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor] | None,
    sparsity: float,
    scope: str = "global",
    *,
    min_keep_per_layer: int = 0,
    nan_policy: str = "error",
) -> dict[str, torch.Tensor]:
    """New boolean masks (``True`` = keep) from ``scores`` (higher = keep), nested inside ``current``.

    ``current`` maps the same names to the masks in force (``None``: nothing pruned yet). Returns a mask for every
    name in ``scores``.
    """
    if scope not in SCOPES:
        raise PrunekitError(f"unknown scope {scope!r}: use 'global' or 'layer'")
    if nan_policy not in NAN_POLICIES:
        raise PrunekitError(f"unknown nan_policy {nan_policy!r}: use 'error' or 'lowest'")
    s = check_sparsity(sparsity, allow_one=True)
    if not scores:
        raise PrunekitError("no scores to select from: the model has nothing prunable")
    names = list(scores)
    alive: dict[str, torch.Tensor] = {}
    for n in names:
        cur = None if current is None else current.get(n)
        if cur is not None and tuple(cur.shape) != tuple(scores[n].shape):
            raise PrunekitError(f"scores of {n!r} have shape {tuple(scores[n].shape)}, its mask {tuple(cur.shape)}")
        alive[n] = (
            torch.ones_like(scores[n], dtype=torch.bool) if cur is None else cur.to(scores[n].device, torch.bool)
        )
    if s >= 1.0:
        warnings.warn("sparsity 1.0 removes every prunable entry", stacklevel=2)
        return {n: torch.zeros_like(alive[n]) for n in names}
    if s == 0.0:
        return {n: alive[n].clone() for n in names}

    clean = {n: clean_scores(n, scores[n], nan_policy) for n in names}
    if scope == "layer":
        out = {}
        for n in names:
            a = alive[n].reshape(-1)
            k = min(keep_count(a.numel(), s), int(a.sum()))
            out[n] = keep_among_alive(clean[n].reshape(-1), a, k).reshape(alive[n].shape)
        return out

    total = sum(a.numel() for a in alive.values())
    n_alive = sum(int(a.sum()) for a in alive.values())
    k = keep_count(total, s)
    if k > n_alive:
        raise PrunekitError(
            f"sparsity {s:g} keeps {k} entries but only {n_alive} are still alive (current sparsity "
            f"{1 - n_alive / total:.4f}); masks are nested, so ask for a sparsity of at least that"
        )
    flat_scores = torch.cat([clean[n].reshape(-1).double() for n in names])
    flat_alive = torch.cat([alive[n].reshape(-1) for n in names])
    reserved = torch.zeros_like(flat_alive)
    if min_keep_per_layer > 0:
        off = 0
        for n in names:
            a = alive[n].reshape(-1)
            q = min(int(min_keep_per_layer), int(a.sum()))
            reserved[off : off + a.numel()] = keep_among_alive(clean[n].reshape(-1), a, q)
            off += a.numel()
        n_res = int(reserved.sum())
        if n_res > k:
            raise PrunekitError(
                f"min_keep_per_layer={min_keep_per_layer} reserves {n_res} entries but sparsity {s:g} keeps only {k}; "
                "lower min_keep_per_layer or the sparsity"
            )
        k_rest = k - n_res
    else:
        k_rest = k
    keep = reserved | keep_among_alive(flat_scores, flat_alive & ~reserved, k_rest)
    out, off = {}, 0
    for n in names:
        numel = alive[n].numel()
        out[n] = keep[off : off + numel].reshape(alive[n].shape)
        off += numel
    return out


def keep_among_alive(flat_scores: torch.Tensor, flat_alive: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask keeping the k alive entries with the largest score (ties: lower flat index)."""
    if bool(flat_alive.all()):  # nothing pruned yet: no index list or gathered copy of the scores
        return top_k_mask(flat_scores, k)
    idx = torch.nonzero(flat_alive, as_tuple=True)[0]
    keep = torch.zeros_like(flat_alive)
    if k > 0 and idx.numel():
        keep[idx[top_k_mask(flat_scores[idx], k)]] = True
    return keep
