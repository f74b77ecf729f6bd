"""Exact integer budgets: how many weights each part of a layer keeps (rows for Wanda, column blocks for SparseGPT).

The layer keeps k = min(round((1 − s)·n), alive) weights (prunekit's layer-scope rule). That k is split over parts
in proportion to their sizes, each part capped by the weights still alive in it (nested masks: a pruned weight never
comes back), so the parts' budgets always add up to k exactly."""
from __future__ import annotations

import math
from typing import Sequence


def allocate(capacity: Sequence[int], size: Sequence[int], k: int) -> list[int]:
    """Integers q_i with Σ q_i = k, 0 ≤ q_i ≤ capacity_i, proportional to ``size`` where the caps allow.

    Water-filling: the parts whose proportional share reaches their capacity are fixed at it and the rest is shared
    again among the others; the final shares are rounded by largest remainder (ties: the lower index). Raises
    ValueError when k exceeds the total capacity."""
    n = len(capacity)
    if k > sum(capacity):
        raise ValueError(f"cannot keep {k} weights: only {sum(capacity)} are alive")
    q = [0] * n
    free = [i for i in range(n) if capacity[i] > 0 and size[i] > 0]
    rest = k
    while free:
        total = sum(size[i] for i in free)
        full = [i for i in free if rest * size[i] / total >= capacity[i]]
        if not full:
            break
        for i in full:
            q[i] = capacity[i]
            rest -= capacity[i]
        free = [i for i in free if i not in set(full)]
    if free and rest > 0:
        total = sum(size[i] for i in free)
        shares = {i: rest * size[i] / total for i in free}
        for i in free:
            q[i] = int(math.floor(shares[i]))
        left = rest - sum(q[i] for i in free)
        order = sorted(free, key=lambda i: (-(shares[i] - q[i]), i))
        for i in order[:left]:
            q[i] += 1
    return q
