"""The channel-group data class and how a group's channels map onto weight tensors.

:class:`ChannelGroup` describes one space of channels that is removed as a unit (:mod:`prunekit.structured.groups`
explains what a group holds); :func:`row_channels` and :func:`expand_rows` map its channels onto its producers'
output units (several per channel for attention heads), and :func:`transposed` tells which layers store their
weight (in, out, ...) (transposed convs, GPT-2's ``Conv1D``). ``CONV_TYPES`` / ``CONVT_TYPES`` are the conv module
classes the channel analysis and :func:`prunekit.structured.shrink` handle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..params import hf_conv1d

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class ChannelGroup:
    """One space of channels that is removed as a unit.

    - ``name``: id used as the key of channel masks: the first producer's module name, or ``"add:<first
      producer>"`` when residual additions (or other element-wise ops) tie several producers together.
    - ``size``: number of channels.
    - ``producers``: modules whose output channels (weight rows and bias; a depthwise conv's rows; a transposed
      conv's ``weight[:, c]``) are the group's channels.
    - ``norms``: BatchNorm / InstanceNorm modules whose entries follow these channels.
    - ``consumers``: ``(module name, features per channel)``: 1 for a conv input channel (or a linear layer on
      unflattened features), ``H*W`` for a linear layer after a flatten.
    - ``prunable`` / ``reason``: whether channels may be removed, and if not, why.
    - ``rows`` and ``splits``: the producers' output units per channel. The output dim of every producer holds
      ``splits`` equal segments of ``size * rows`` units, and channel ``c`` owns units ``c*rows ... c*rows+rows-1``
      of each segment (:func:`row_channels`). 1 and 1 for a CNN channel; an attention head of a transformer has
      ``rows = head_dim`` (its rows of each of query, key, value), and GPT-2's fused ``c_attn`` (q|k|v) has
      ``splits = 3``.
    - ``kind``: ``"channel"`` (found by tracing), ``"head"`` (attention heads) or ``"neuron"`` (FFN neurons of a
      transformer block); ``attention``: for heads, the attention module whose head count :func:`shrink` updates.
    """

    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None
    rows: int = 1
    splits: int = 1
    kind: str = "channel"
    attention: str | None = None


def row_channels(g: ChannelGroup) -> torch.Tensor:
    """The channel of every output unit of ``g``'s producers (a LongTensor of ``size * rows * splits``)."""
    ch = torch.arange(g.size)
    if g.rows != 1:
        ch = ch.repeat_interleave(g.rows)
    return ch.repeat(g.splits) if g.splits != 1 else ch


def expand_rows(keep: torch.Tensor, g: ChannelGroup) -> torch.Tensor:
    """A per-channel vector of ``g`` repeated onto its producers' output units (identity for plain channels)."""
    return keep if g.rows == 1 and g.splits == 1 else keep[row_channels(g).to(keep.device)]


def transposed(mod: nn.Module) -> bool:
    """True when ``mod.weight`` stores (in, out, ...): transposed convs and GPT-2's ``Conv1D``; its output units
    are then ``weight[:, j]`` and its inputs ``weight[i]``."""
    if isinstance(mod, CONVT_TYPES):
        return True
    conv1d = hf_conv1d()
    return conv1d is not None and isinstance(mod, conv1d)
