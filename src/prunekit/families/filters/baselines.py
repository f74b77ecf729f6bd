"""Filter (channel) pruning baselines of seed 002's comparisons: ``filter_l1``, ``filter_l2``, ``filter_random``,
``bn_scale``.

- ``filter_l1`` (FT, "FilterThresNet": Li et al., Pruning Filters for Efficient ConvNets): a channel scores the l1
  norm of the filters that write it (summed over the producers of a residual-tied group); the same keep ratio in
  every layer.
- ``filter_l2`` (SoftNet: He et al., Soft Filter Pruning): the l2 norm of those filters; uniform ratio.
- ``filter_random`` (FilterUniNet): uniformly random channels (the mask generator, so ``seed`` fixes them); uniform.
- ``bn_scale`` (network slimming: Liu et al., Learning Efficient Convolutional Networks through Network Slimming):
  |gamma| of the channel's BatchNorm (largest over the tied norms of a residual group), one GLOBAL ranking of the
  raw |gamma|. Channel groups without a BatchNorm (a conv without BN, the linear layers of a classifier) are left
  whole, with a warning: their channels have no gamma, and splicing another criterion's numbers into a raw |gamma|
  ranking would compare different scales. A model whose prunable groups have no BatchNorm at all is an error.

All four prune whole channels (:mod:`prunekit.structured`): a removed channel loses its producer rows, its bias,
its BN entries and every consumer's input slice, so after ``masks = pk.prune(model, "filter_l1", sparsity=0.5)``
the model can be made physically smaller with ``pk.shrink(model, masks)``, with the same outputs. The size target
is the usual one, ``round((1 - s) * n)`` kept prunable weights (Conv/Linear weights by default), met within
``size_tol`` (:func:`prunekit.structured.select_channels`). Layers whose channels cannot be removed (the output
layer, anything next to an operation the channel tracer does not understand) keep their rows; their input slices
still go with the channels that feed them.

Options (each method has its own defaults): ``allocation`` (``uniform``: the same keep fraction per group;
``global``: one ranking), ``normalize`` (global ranking only: ``max`` divides each group's scores by their
maximum, ``none`` compares raw scores), ``size_tol`` and ``min_channels`` (channels always kept per group). The
common option ``scope`` does not apply: ``allocation`` is the knob.

``pk.score`` gives per-weight scores: an entry gets its channel's score (the smaller of the two for an entry that
is both in a producer row and in a consumer slice), +inf for entries that channel pruning never removes.

Transformers (BERT family, GPT-2): the channels are attention heads and FFN neurons
(:mod:`prunekit.structured.transformer_groups`, docs/structured.md). A head's filters are its ``head_dim`` rows of
each of query, key and value (GPT-2: its columns of the fused ``c_attn``): ``filter_l1`` sums their l1 norms,
``filter_l2`` takes the l2 norm of them all; no data is read (dict batches are accepted and ignored). ``bn_scale``
refuses (no BatchNorm).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ...errors import PrunekitError
from ...registry import PruningMethod, ScoreContext, register
from ...select import check_sparsity, keep_count
from ...structured.channel_group import ChannelGroup
from ...structured.channel_masks import make_exact
from ...structured.latency_table import check_round_channels, resolve_round_channels
from ...structured.select import (bn_scale_scores, broadcast_channel_scores, cached_channel_groups,
                                 example_input_for, filter_norm_scores, masks_from_channels, select_channels)


@dataclass(frozen=True)
class FilterOptions:
    """Options of the filter-pruning baselines.

    - ``allocation``: ``uniform`` (every channel group keeps the same fraction of its channels, +-1) or
      ``global`` (one ranking of all channels).
    - ``normalize``: for ``global``, ``max`` divides each group's scores by the group's largest score, ``none``
      ranks the raw scores.
    - ``size_tol``: relative tolerance on the kept weight count (target ``round((1 - s) * n)``).
    - ``min_channels``: channels every group keeps at least (its best ones).
    - ``round_channels``: every channel group (a residual-tied group as a whole, an attention layer's heads, an
      FFN's neurons) keeps a multiple of this many channels, or all of them; the size search moves in blocks of
      it (:func:`prunekit.structured.select_channels` ``round_to``). 8 or 16 give SIMD-friendly shrunk widths;
      ``"auto"`` picks the multiple from a per-layer latency table measured once per device and layer shape and
      cached on disk (:func:`prunekit.structured.latency_table.auto_round_channels`).
    """

    allocation: Literal["uniform", "global"] = "uniform"
    normalize: Literal["max", "none"] = "max"
    size_tol: float = 0.005
    min_channels: int = 1
    round_channels: int | Literal["auto"] | None = None  # None = 1 (no rounding; None keeps the ids of runs made before the option)

    def validate(self, path: str, error) -> None:
        if not 0.0 <= self.size_tol < 1.0:
            raise error(f"size_tol must be in [0, 1), got {self.size_tol}")
        if self.min_channels < 1:
            raise error(f"min_channels must be at least 1 (a layer cannot lose every channel), got {self.min_channels}")
        if self.round_channels is not None:
            check_round_channels(self.round_channels, error)


@dataclass(frozen=True)
class BNScaleOptions(FilterOptions):
    """Network slimming's defaults: one global ranking of the raw BatchNorm |gamma|."""

    allocation: Literal["uniform", "global"] = "global"
    normalize: Literal["max", "none"] = "none"


def why_fixed(groups: list[ChannelGroup], n: int = 6) -> str:
    """``'name' (reason); ...`` for the first ``n`` channel groups that cannot lose channels."""
    fixed = [g for g in groups if not g.prunable]
    text = "; ".join(f"{g.name!r} ({g.reason})" for g in fixed[:n])
    return text + (f"; and {len(fixed) - n} more" if len(fixed) > n else "")


def require_prunable_group(code: str, model, groups: list[ChannelGroup]) -> None:
    """A structured method needs at least one channel group that may lose channels: otherwise a PrunekitError that
    names every group's reason and the ways out, raised before any scoring work."""
    if any(g.prunable for g in groups):
        return
    raise PrunekitError(
        f"{code} removes whole channels, but no channel group of {type(model).__name__} can lose channels: "
        f"{why_fixed(groups) or 'the tracer found no channel groups'}. Use an unstructured method (magnitude, snip, "
        "woodfisherblock, ...), or change the layers named (e.g. groups=1 instead of a grouped conv, a BatchNorm "
        "instead of a LayerNorm over channels) so their channels can be removed together")


def _l1(ctx: ScoreContext, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    return filter_norm_scores(ctx.model, groups, p=1)


def _l2(ctx: ScoreContext, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    return filter_norm_scores(ctx.model, groups, p=2)


def _random(ctx: ScoreContext, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """One uniform draw per channel of every group, in forward order, from the mask generator."""
    return {g.name: torch.rand(g.size, generator=ctx.generator, dtype=torch.float64) for g in groups}


def _bn(ctx: ScoreContext, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    scores = bn_scale_scores(ctx.model, groups)
    prunable = [g for g in groups if g.prunable]
    without = [g.name for g in prunable if g.name not in scores]
    if prunable and len(without) == len(prunable):
        raise PrunekitError(f"bn_scale ranks channels by their BatchNorm |gamma|, but no prunable channel group of "
                            f"{type(ctx.model).__name__} has a BatchNorm with a scale; use filter_l1 or filter_l2")
    if without:
        warnings.warn(f"bn_scale leaves {len(without)} channel group(s) without a BatchNorm whole: "
                      f"{', '.join(repr(n) for n in without[:8])}{', ...' if len(without) > 8 else ''}",
                      stacklevel=4)
    return scores


class FilterMethod(PruningMethod):
    """A channel method as one object per prune call: the round's groups and channel scores are computed once
    (by the score, or by the selection when called alone) and reused by its selection and update."""

    code = ""
    channel_score: Callable = None  # (ctx, groups) -> channel scores; set by each code's subclass

    def __init__(self):
        self._ctx: ScoreContext | None = None
        self._st: dict = {}

    def _state(self, ctx: ScoreContext) -> dict:
        if self._ctx is not ctx:  # a new round
            groups = cached_channel_groups(ctx.model, ctx)
            with torch.no_grad():
                scores = type(self).channel_score(ctx, groups)
            self._ctx, self._st = ctx, {"method": self.code, "groups": groups, "scores": scores,
                                        "channel_masks": None}
        return self._st

    def score(self, ctx: ScoreContext) -> dict[str, torch.Tensor]:
        st = self._state(ctx)
        tensors = {p.name: p.tensor.detach() for p in ctx.params}
        return broadcast_channel_scores(ctx.model, st["groups"], st["scores"], tensors)

    def select(self, ctx: ScoreContext, scores: dict, sparsity: float) -> dict[str, torch.Tensor]:
        o = ctx.options
        s = check_sparsity(sparsity)
        st = self._state(ctx)
        require_prunable_group(self.code, ctx.model, st["groups"])
        alive = {p.name: ctx.masks[p.name].to(torch.bool) for p in ctx.params}
        total = sum(m.numel() for m in alive.values())
        target = keep_count(total, s)
        if "round_to" not in st:
            st["round_to"] = resolve_round_channels(o.round_channels or 1, ctx.model,
                                                    example_input_for(ctx.model, ctx) if o.round_channels == "auto"
                                                    else None)
        keep, kept = select_channels(ctx.model, st["groups"], st["scores"], target, alive, o.allocation,
                                     o.min_channels, o.size_tol, normalize=o.normalize, round_to=st["round_to"])
        st.update(channel_masks=keep, kept=kept, target=target)
        return masks_from_channels(ctx.model, st["groups"], keep, alive)

    def update(self, ctx: ScoreContext, before: dict, after: dict) -> None:
        """Removed channels output exactly 0: their biases and BN gamma, beta and running mean are zeroed."""
        st = self._st if self._ctx is ctx else {}
        if st.get("channel_masks"):
            make_exact(ctx.model, st["groups"], st["channel_masks"])


def _register(code: str, summary: str, options: type, channel_score: Callable) -> None:
    cls = type(f"Filter_{code}", (FilterMethod,), {
        "code": code, "channel_score": staticmethod(channel_score), "__module__": __name__,
        "__doc__": f"{summary}. Per-weight view of the channel scores (see the module docstring)."})
    register(code, family="structured baseline", needs_data="none", sources=("002",), structured=True,
             options=options, summary=summary)(cls)


_register("filter_l1", "FT (Li et al.): remove the channels whose filters have the smallest l1 norm, same ratio per "
          "layer", FilterOptions, _l1)
_register("filter_l2", "SoftNet (He et al.): remove the channels whose filters have the smallest l2 norm, same ratio "
          "per layer", FilterOptions, _l2)
_register("filter_random", "FilterUniNet: remove uniformly random channels, same ratio per layer", FilterOptions,
          _random)
_register("bn_scale", "network slimming (Liu et al.): remove the channels with the smallest BatchNorm |gamma|, one "
          "global ranking", BNScaleOptions, _bn)
