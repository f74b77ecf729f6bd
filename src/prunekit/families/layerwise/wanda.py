"""``wanda``: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning
Approach for Large Language Models").

Score, the paper's Eq. (1): S_ij = |W_ij|·‖X_j‖₂, with X_j the j-th input feature over every token of the
calibration set (for a convolution: the j-th im2col column, i.e. one input channel at one kernel tap, over every
example and output position). The weights of lowest score are removed; nothing else changes (no weight update).

Comparison group (``compare``), the paper's §3 ("per output"):

- ``row`` (default, the paper's choice): the scores are compared within each output row; the layer's budget
  k = min(round((1 − s)·n), alive) is split over its rows in proportion to their length, capped by what is alive
  in each row (:func:`~.quotas.allocate`), so a layer keeps exactly k and a fresh layer keeps the same number in
  every row (±1);
- ``layer``: one ranking per layer (k kept per layer);
- ``global``: one ranking over every prunable weight of the model (exact total count; the per-layer sparsities then
  differ). Needs ``sequential: false`` (a global ranking needs every layer's scores at once).

``sequential`` (default false here: the paper's score is one pass over the calibration set): true recomputes
‖X_j‖₂ of each group of layers on the outputs of the groups already pruned (one transformer block at a time, as the
Wanda reference code does for LLaMA). ``pattern="N:M"`` (the shared option of
:class:`prunekit.prune.PruneOptions`): N of every M consecutive inputs per row, M input channels at one kernel
position for a convolution (the paper's semi-structured 2:4 / 4:8 setting; groups of :mod:`prunekit.patterns`).

Cost: one forward pass over the calibration set (non-sequential); sequential runs one more pass per group after the
first, each stopped after the group's last layer (a Hugging Face model: its blocks alone on cached inputs, as for
sparsegpt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import PrunekitError
from ...registry import register
from ...select import keep_among_alive
from ...select import select as select_top
from .base import FAMILY, LayerwiseMethod, LayerwiseOptions, nm_keep, row_keep
from .quotas import allocate


@dataclass(frozen=True)
class WandaOptions(LayerwiseOptions):
    """``wanda``: ``compare`` row | layer | global (see the module); ``sequential`` defaults to false."""

    sequential: bool = False
    compare: Literal["row", "layer", "global"] = "row"

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.compare == "global" and self.sequential:
            raise error("wanda compare: global ranks every layer at once, so it needs sequential: false")


def wanda_keep(scores: torch.Tensor, alive: torch.Tensor, k: int, compare: str, pattern) -> torch.Tensor:
    """The kept entries of one layer's [G, rows, cols] scores: ``k`` of them (``row`` / ``layer``) or the N:M
    pattern."""
    G, R, C = scores.shape
    s2, a2 = scores.reshape(G * R, C), alive.reshape(G * R, C)
    if pattern is not None:
        keep = nm_keep(s2, a2, *pattern)
    elif compare == "row":
        quota = torch.tensor(allocate(a2.sum(1).tolist(), [C] * (G * R), k))
        keep = row_keep(s2, a2, quota)
    else:
        keep = keep_among_alive(s2.reshape(-1), a2.reshape(-1), k).reshape(G * R, C)
    return keep.reshape(G, R, C)


class Wanda(LayerwiseMethod):
    """``wanda`` (see the module docstring)."""

    def stat_bytes(self, layer, itemsize: int) -> int:
        return layer.groups * layer.cols * 8

    def check_pattern(self, ctx, pattern) -> None:
        if ctx.options.compare == "global":
            raise PrunekitError(f"wanda: pattern {pattern} compares within groups of each row; it cannot be combined "
                                "with compare: global (use compare: row, the default)")

    def select(self, ctx, scores, sparsity):
        if ctx.options.compare == "global":
            return select_top(scores, ctx.masks, sparsity, "global")
        return super().select(ctx, scores, sparsity)

    def solve_group(self, ctx, group, alive, keep, pattern, scores, first) -> dict:
        o = ctx.options
        sq = self.norms if not o.sequential or first else self.column_norms(group)
        out = {}
        for i in group:
            L = self.layers[i]
            s = L.matrices(torch.float64).abs().cpu() * sq[i].sqrt()[:, None, :]
            k = wanda_keep(s, alive[L.name], keep[L.name], o.compare, pattern)
            out[i] = (k.to(L.param.tensor.device), L.matrices(L.param.tensor.dtype))
        return out


register("wanda", family=FAMILY, needs_data="inputs", options=WandaOptions, scope="layer", dict_batches=True,
         default_samples={"random": 128},
         summary="Wanda: |W_ij|·‖X_j‖₂ from one calibration pass, compared within each output row (no weight "
                 "update)")(Wanda)
