"""Channel spaces of the channel analysis: the channel structure of a traced value (:class:`_Ch`) and the union-find
over spaces (:class:`_Spaces`).

Each root of the union-find carries its producers, norms and consumers and the reasons it is not prunable. An
element-wise op between channelled tensors (a residual addition) or a concatenation along a non-channel dim unions
their spaces with ``tied=True``; a tied space with several producers becomes one ``"add:<first producer>"`` group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Ch:
    """Channel structure of a tensor value: dim 1 holds ``size * block`` entries, ``block`` per channel of
    union-find space ``space``."""

    space: int
    block: int = 1


class _Spaces:
    """Union-find over channel spaces, each root carrying its members and the reasons it is not prunable."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[dict[str, Any]] = []

    def new(self, reason: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.data.append({"producers": [], "norms": [], "consumers": {}, "reasons": [], "tied": False})
        if reason:
            self.data[i]["reasons"].append(reason)
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, tied: bool = False) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            if tied:
                self.data[ra]["tied"] = True
            return ra
        if rb < ra:
            ra, rb = rb, ra
        da, db = self.data[ra], self.data[rb]
        for key in ("producers", "norms", "reasons"):
            da[key] += [x for x in db[key] if x not in da[key]]
        for k, v in db["consumers"].items():
            da["consumers"].setdefault(k, v)
        da["tied"] = da["tied"] or db["tied"] or tied
        self.parent[rb] = ra
        return ra

    def get(self, i: int) -> dict[str, Any]:
        return self.data[self.find(i)]

    def mark(self, i: int, reason: str) -> None:
        d = self.get(i)
        if reason not in d["reasons"]:
            d["reasons"].append(reason)
