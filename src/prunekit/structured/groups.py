"""Channel groups: which tensors move together when one channel of a network is removed.

A *channel group* is one space of channels: the output rows (weight and bias) of every layer that writes it (its
*producers*), the BatchNorm entries that follow it (*norms*) and the input slices of every layer that reads it
(*consumers*: ``conv.weight[:, c]``, or the ``H*W`` in-features block of a linear layer after a flatten).
Residual additions tie the channels of all their inputs into one group with several producers; a depthwise conv
ties its input and output channel (it is then a producer of its input's group).

Hugging Face transformers models are not traced: their groups (attention heads, FFN neurons) are read off the
module structure by :mod:`prunekit.structured.transformer_groups`; a channel there may own several output units of
a producer (``ChannelGroup.rows`` / ``splits``), which the mask functions handle, as they handle GPT-2's Conv1D
whose weight is stored (in, out) like a transposed conv's (:func:`transposed`).

Groups are found by tracing the model with :func:`torch.fx.symbolic_trace` and recording every tensor's shape
with :class:`torch.fx.passes.shape_prop.ShapeProp` on an example input. Every operation is handled by a rule that
says how channel ``c`` of its output relates to channel ``c`` of its inputs. What has no rule (an unknown module,
function or method, a transpose, a roll over channels, a concatenation along channels, a hard-coded reshape, ...)
never fails the analysis: the groups it touches are marked not prunable, with a reason that names it, and the
rest of the network stays prunable.

Supported (channel ``c`` in = channel ``c`` out, unless stated):

- leaf modules: ``Conv1d/2d/3d`` (ordinary, or depthwise: ``groups == in == out``), ``ConvTranspose1d/2d/3d``
  (``groups == 1``) and ``Linear`` (input of rank 2) are producers and consumers; ``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm`` and ``InstanceNorm1d/2d/3d`` are norms; activations, dropout, pooling (max/avg/adaptive/LP),
  ``Upsample``, ``ZeroPad``/``ConstantPad``/``ReflectionPad``/``ReplicationPad``, ``Identity``, ``Flatten``,
  ``Softmax``/``LogSoftmax`` over a non-channel dim pass channels through;
- functions and tensor methods: element-wise activations and arithmetic with scalars, element-wise binary ops
  between tensors (``+ - * /``, ``maximum``, ...; broadcasting over a size-1 channel dim is fine), functional
  pooling / interpolation / dropout, ``F.pad`` on spatial dims, reductions over spatial dims
  (``mean/sum/amax/amin``), ``flatten``/``view``/``reshape`` that merge the trailing dims into the channel dim
  (each channel then owns a contiguous block of features) or keep dims 0 and 1, basic slicing that keeps dim 1
  whole, ``cat`` along a non-channel dim, ``size``/``dim``/``shape`` queries.

Not supported (the affected groups are marked not prunable): channel-mixing or channel-reordering ops
(``transpose``, ``permute``, ``roll``/``flip`` over channels, ``cat``/``stack``/``chunk``/``split`` along
channels, reductions over channels, ``GroupNorm``/``LayerNorm`` over channels, per-channel ``PReLU``),
``F.pad`` of the channel dim (option-A ResNet shortcuts), grouped but not depthwise convs, reshapes with
hard-coded sizes, tensor attributes used directly (``x * self.scale``), division by a tied tensor, and anything
unknown. Model inputs and everything that reaches the model's output are never prunable.

Where the parts live (this module holds the entry point :func:`channel_groups` and re-exports the public names):

- :mod:`prunekit.structured.channel_group`: the :class:`ChannelGroup` data class, :func:`row_channels`,
  :func:`transposed`;
- :mod:`prunekit.structured.fx_trace`: :func:`trace` and the shape-propagation forward;
- :mod:`prunekit.structured.channel_analysis`: the rules above, with its op tables
  (:mod:`prunekit.structured.op_tables`), channel spaces (:mod:`prunekit.structured.channel_spaces`) and node
  helpers (:mod:`prunekit.structured.fx_nodes`);
- :mod:`prunekit.structured.channel_masks`: :func:`check_channel_masks`, :func:`channel_masks_to_masks`,
  :func:`make_exact`, :func:`channel_masks_from_masks`;
- :mod:`prunekit.structured.transformer_groups`: the head and neuron groups of transformers models.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .channel_analysis import _Analysis
from .channel_group import ChannelGroup, row_channels, transposed
from .channel_masks import channel_masks_from_masks, channel_masks_to_masks, check_channel_masks, make_exact
from .fx_trace import _propagate_shapes, trace
from .transformer_groups import is_transformer, transformer_groups

__all__ = [
    "ChannelGroup", "channel_groups", "channel_masks_to_masks", "make_exact", "channel_masks_from_masks",
    "check_channel_masks", "trace", "row_channels", "transposed",
]


def channel_groups(model: nn.Module, example_input, exclude: Sequence[str] = ()) -> list[ChannelGroup]:
    """The channel groups of ``model``, in forward order of their first producer.

    Traces ``model`` with ``torch.fx`` and runs ``example_input`` (a tensor, or a tuple of tensors for several
    inputs; a batch of at least 2 is best) through it in eval mode without gradients to record shapes; the model
    itself is not changed (its training flag is restored). Every Conv/Linear that is called in the forward pass is
    a producer of exactly one group. A group is prunable only if every operation touching its channels is
    understood (see the module docstring), it does not reach the model's output, and all sizes agree; otherwise
    ``reason`` names the cause (for unknown operations: the module name and type, or the function / method).

    ``exclude``: submodule names to treat as opaque blocks (use it for submodules that ``torch.fx`` cannot trace;
    their neighbouring groups become not prunable). Raises :class:`PrunekitError` if tracing fails.

    A Hugging Face transformers model is not traced: its attention heads and FFN neurons are found from its module
    structure (:func:`prunekit.structured.transformer_groups.transformer_groups`), ``example_input`` is then not
    needed (it may be None).
    """
    if is_transformer(model):
        return transformer_groups(model)
    gm = trace(model, exclude)
    _propagate_shapes(model, gm, example_input)
    analysis = _Analysis(model, gm)
    analysis.run()
    return analysis.groups()
