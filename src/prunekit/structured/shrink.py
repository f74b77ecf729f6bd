"""Physical channel removal: turn channel masks into a smaller model that computes the same function.

``shrink(model, channel_masks)`` deep-copies ``model`` and slices every tensor of every removed channel out of
it: producer rows and biases, BatchNorm entries (γ, β, running statistics), consumer input slices (a conv's
``weight[:, c]``, a flattened linear layer's ``H*W`` block), and updates the module attributes
(``in_channels``, ``out_channels``, ``in_features``, ``out_features``, ``num_features``, ``groups`` of depthwise
convs). Channels are keyed by group (:func:`prunekit.structured.channel_groups`), so the members of a
residual-tied group are removed together or not at all.

Transformers (BERT family, GPT-2; groups from :mod:`prunekit.structured.transformer_groups`): a removed attention
head loses its ``head_dim`` rows and bias entries of query, key and value (GPT-2: its columns in each third of the
fused ``c_attn``, whose ``nf`` is updated) and its ``head_dim`` input columns of the output projection, and the
attention module's head count is updated (BERT: ``num_attention_heads``, ``all_head_size``; GPT-2: ``num_heads``,
``split_size``; transformers 5.x reshapes with ``-1`` heads, so nothing else changes); a removed FFN neuron loses
its row of the first FFN layer and its input column of the second. The shared ``config`` is not changed (it keeps
the dense sizes; :func:`prunekit.structured.save_shrunk_hf` stores the per-layer sizes).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..batches import DictInputs
from ..errors import PrunekitError
from ..flops import layer_positions, macs
from ..masks import Masks
from ..params import hf_conv1d
from .channel_group import CONV_TYPES, CONVT_TYPES, ChannelGroup, expand_rows
from .channel_masks import channel_masks_from_masks, channel_masks_to_masks, check_channel_masks, make_exact
from .fx_trace import inputs_tuple
from .groups import channel_groups
from .transformer_groups import is_transformer

__all__ = ["shrink", "shrink_report", "masked_copy", "relative_error", "TOLERANCE", "transformer_example"]

#: relative tolerance of the shrunk-versus-masked check (max abs difference / max abs masked output)
TOLERANCE = 1e-5


def transformer_example(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A fixed random dict batch for a transformers model: ``input_ids`` (``batch`` x ``length``, seed 0, below the
    config's ``vocab_size``) and an ``attention_mask`` whose first example has its last 3 positions padded."""
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else "cpu"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, max(1, length - 3):] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _example(model: nn.Module, example_input):
    """``example_input``, or a fixed random batch of 2 built from ``model.input_shape`` (a transformers model: from
    :func:`transformer_example`); None if neither exists."""
    if example_input is not None:
        return example_input
    if is_transformer(model):
        return transformer_example(model)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    p = next(iter(model.parameters()), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=gen)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def _slice(mod: nn.Module, attr: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(mod, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(mod, attr, new)


def _is_conv1d(mod: nn.Module) -> bool:
    conv1d = hf_conv1d()
    return conv1d is not None and isinstance(mod, conv1d)


def _shrink_producer(mod: nn.Module, idx: torch.Tensor) -> None:
    n = int(idx.numel())
    if _is_conv1d(mod):  # GPT-2's Conv1D: weight (in, out)
        _slice(mod, "weight", 1, idx)
        _slice(mod, "bias", 0, idx)
        mod.nf = n
    elif isinstance(mod, nn.Linear):
        _slice(mod, "weight", 0, idx)
        _slice(mod, "bias", 0, idx)
        mod.out_features = n
    elif isinstance(mod, CONVT_TYPES):
        _slice(mod, "weight", 1, idx)
        _slice(mod, "bias", 0, idx)
        mod.out_channels = n
    elif isinstance(mod, CONV_TYPES):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        _slice(mod, "weight", 0, idx)
        _slice(mod, "bias", 0, idx)
        mod.out_channels = n
        if depthwise:
            mod.in_channels = mod.groups = n
    else:  # pragma: no cover - channel_groups only makes Conv/Linear producers
        raise PrunekitError(f"cannot shrink producer of type {type(mod).__name__}")


def _shrink_consumer(mod: nn.Module, idx: torch.Tensor, block: int) -> None:
    if isinstance(mod, nn.Linear) or _is_conv1d(mod):
        cols = (idx[:, None] * block + torch.arange(block)).reshape(-1) if block != 1 else idx
        if _is_conv1d(mod):
            _slice(mod, "weight", 0, cols)
            mod.nx = int(cols.numel())
        else:
            _slice(mod, "weight", 1, cols)
            mod.in_features = int(cols.numel())
    elif isinstance(mod, CONVT_TYPES):
        _slice(mod, "weight", 0, idx)
        mod.in_channels = int(idx.numel())
    elif isinstance(mod, CONV_TYPES):
        _slice(mod, "weight", 1, idx)
        mod.in_channels = int(idx.numel())
    else:  # pragma: no cover
        raise PrunekitError(f"cannot shrink consumer of type {type(mod).__name__}")


def _set_heads(mod: nn.Module, heads: int) -> None:
    """Update an attention module's head count and width: BERT's ``num_attention_heads`` / ``all_head_size``,
    GPT-2's ``num_heads`` / ``split_size`` (the head size stays; its shared ``config`` is not changed)."""
    if isinstance(getattr(mod, "num_attention_heads", None), int):
        mod.num_attention_heads = heads
        mod.all_head_size = heads * mod.attention_head_size
    if isinstance(getattr(mod, "num_heads", None), int):
        mod.num_heads = heads
        if isinstance(getattr(mod, "split_size", None), int):
            mod.split_size = heads * mod.head_dim


def _shrink_norm(mod: nn.Module, idx: torch.Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _slice(mod, attr, 0, idx)
    mod.num_features = int(idx.numel())


@torch.no_grad()
def masked_copy(model: nn.Module, groups: Sequence[ChannelGroup],
                channel_masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with the removed channels zeroed (weight masks of
    :func:`channel_masks_to_masks` multiplied in, then :func:`make_exact`); shapes unchanged."""
    masked = copy.deepcopy(model)
    for name, m in channel_masks_to_masks(masked, groups, channel_masks).items():
        masked.get_parameter(name).mul_(m.to(masked.get_parameter(name).dtype))
    make_exact(masked, groups, channel_masks)
    return masked


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _call(model: nn.Module, example):
    """``model`` on an example input: a tensor or tuple of tensors (positional), a dict of tensors or
    :class:`prunekit.batches.DictInputs` (keyword arguments, Hugging Face style)."""
    if isinstance(example, DictInputs):
        return model(**example.tensors)
    if isinstance(example, Mapping):
        return model(**example)
    return model(*inputs_tuple(example))


@torch.no_grad()
def _eval_outputs(model: nn.Module, example) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        return _tensors(_call(model, example))
    finally:
        model.train(was)


def relative_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """max |a - b| / max |b| over all output tensors (0 when both are identical)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(y.double().abs().max()) for y in b if y.numel()), default=0.0)
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def _are_weight_masks(model: nn.Module, groups: Sequence[ChannelGroup], masks) -> bool:
    """True for per-weight masks (a :class:`prunekit.Masks`, or a dict keyed by parameter names only)."""
    if isinstance(masks, Masks):
        return True
    names = {g.name for g in groups}
    params = {n for n, _ in model.named_parameters()}
    keys = list(masks.keys())
    return bool(keys) and all(k in params and k not in names for k in keys)


def shrink(model: nn.Module, channel_masks: Mapping[str, torch.Tensor], example_input=None,
           groups: Sequence[ChannelGroup] | None = None, check: bool = True, *,
           exclude: Sequence[str] = ()) -> nn.Module:
    """A new, physically smaller copy of ``model`` without the channels that ``channel_masks`` removes.

    ``channel_masks``: ``{group name: bool tensor of length group.size}`` (``True`` = keep) for any subset of the
    groups of :func:`channel_groups` (``groups`` if given, else computed from ``example_input``; ``exclude`` is
    passed on). Per-weight masks (a :class:`prunekit.Masks`, or a dict keyed by parameter names) are accepted
    too: they are turned into channel masks by :func:`channel_masks_from_masks` (a channel goes when all its
    producer rows or all its consumer slices are masked; tied groups only when all members agree). Guarantees:

    - ``model`` is not modified; the result is a deep copy of the same class and training mode whose removed
      channels are sliced out of every producer (weight rows / transposed-conv columns, bias), norm (weight,
      bias, running mean and variance, ``num_features``) and consumer (conv input channels, the ``H*W`` block of
      each channel in a linear layer after a flatten), with ``in_channels`` / ``out_channels`` /
      ``in_features`` / ``out_features`` / depthwise ``groups`` updated. Removed parameters are new tensors
      (optimizer state of the old ones does not carry over; build a new optimizer).
    - A channel of a residual-tied group is removed from all of its members at once; removing channels from a
      group that is not prunable, or every channel of a group, raises :class:`PrunekitError`.
    - With ``check=True``, the shrunk model's eval-mode output on ``example_input`` equals that of the masked
      model (:func:`masked_copy`: same masks as zeroed weights plus :func:`make_exact`) within relative
      :data:`TOLERANCE` (1e-5), else :class:`PrunekitError` is raised.

    ``example_input`` may be left out when the model has an ``input_shape`` attribute (a fixed random batch of
    2 is used); it is needed to find the groups or to check. For a transformers model it may be a dict of tensors
    (or :class:`prunekit.batches.DictInputs`), run as ``model(**example_input)``; left out, a fixed random batch
    of token ids with a padded example is used (:func:`transformer_example`).
    """
    example_input = _example(model, example_input)
    if example_input is None and (groups is None or check):
        raise PrunekitError(f"shrink needs example_input (a batch for {type(model).__name__}) to trace the channel "
                            "groups and to check the result; or set model.input_shape")
    if groups is None:
        groups = channel_groups(model, example_input, exclude)
    if _are_weight_masks(model, groups, channel_masks):
        channel_masks = channel_masks_from_masks(model, groups, channel_masks)
    cm = check_channel_masks(groups, channel_masks)
    shrunk = copy.deepcopy(model)
    mods = dict(shrunk.named_modules())
    for g in groups:
        keep = cm.get(g.name)
        if keep is None or bool(keep.all()):
            continue
        idx = keep.nonzero().reshape(-1)
        rows = expand_rows(keep, g).nonzero().reshape(-1)
        for p in g.producers:
            _shrink_producer(mods[p], rows)
        for n in g.norms:
            _shrink_norm(mods[n], idx)
        for cname, block in g.consumers:
            _shrink_consumer(mods[cname], idx, block)
        if g.attention is not None:
            _set_heads(mods[g.attention], int(idx.numel()))
    if check:
        ref = _eval_outputs(masked_copy(model, groups, cm), example_input)
        try:
            got = _eval_outputs(shrunk, example_input)
        except Exception as e:  # noqa: BLE001 - e.g. a hard-coded size in the model's forward
            first = (str(e).strip().splitlines() or [""])[0]
            raise PrunekitError(f"the shrunk {type(model).__name__} fails on the example input "
                                f"({type(e).__name__}: {first}); its forward may hard-code channel counts") from None
        err = relative_error(got, ref)
        if not err <= TOLERANCE:
            raise PrunekitError(f"the shrunk {type(model).__name__} differs from the masked one: relative error "
                                f"{err:.3g} > {TOLERANCE:g}; an operation in its forward is not handled correctly")
    return shrunk


def _nonzero(model: nn.Module, layers) -> dict[str, int]:
    mods = dict(model.named_modules())
    return {name: int(torch.count_nonzero(mods[name].weight)) for name in layers}


@torch.no_grad()
def _latency(model: nn.Module, inputs: tuple, runs: int) -> float:
    was = model.training
    model.eval()
    try:
        model(*inputs)  # warm-up
        times = []
        for _ in range(runs):
            if inputs and inputs[0].is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(*inputs)
            if inputs and inputs[0].is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        model.train(was)


def shrink_report(dense: nn.Module, shrunk: nn.Module, example_input, *, latency_runs: int = 0) -> dict[str, Any]:
    """Sizes and costs of ``dense`` (the original, possibly masked model) against ``shrunk``.

    Keys: ``params_dense``, ``params_shrunk`` (all parameters), ``params_ratio`` (shrunk / dense); ``macs_dense``,
    ``macs_shrunk`` (multiply-accumulates per example of every Conv/Linear: weights × output positions, as
    :mod:`prunekit.flops`), ``macs_ratio``; ``nonzero_params_*`` and ``nonzero_macs_*`` (the same counting only
    nonzero weights / entries, which is what a masked model is credited with). With ``latency_runs > 0`` also
    ``latency_dense_s``, ``latency_shrunk_s`` (median eval-mode forward time of ``example_input`` over that many
    runs after one warm-up) and ``latency_ratio``. Neither model is changed.
    """
    inputs = inputs_tuple(example_input)
    shape = tuple(inputs[0].shape[1:])
    out: dict[str, Any] = {}
    for key, m in (("dense", dense), ("shrunk", shrunk)):
        layers = layer_positions(m, shape)
        out[f"params_{key}"] = sum(p.numel() for p in m.parameters())
        out[f"nonzero_params_{key}"] = sum(int(torch.count_nonzero(p)) for p in m.parameters())
        out[f"macs_{key}"] = macs(layers)
        out[f"nonzero_macs_{key}"] = macs(layers, _nonzero(m, layers))
    out["params_ratio"] = out["params_shrunk"] / max(1, out["params_dense"])
    out["macs_ratio"] = out["macs_shrunk"] / max(1, out["macs_dense"])
    if latency_runs > 0:
        out["latency_dense_s"] = _latency(dense, inputs, latency_runs)
        out["latency_shrunk_s"] = _latency(shrunk, inputs, latency_runs)
        out["latency_ratio"] = out["latency_shrunk_s"] / max(out["latency_dense_s"], 1e-12)
    return out
