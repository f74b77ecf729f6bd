"""FLOPs of a (masked) model, counted as multiply-accumulates (MACs) per example (second_order.md §6).

For a conv or linear layer ℓ, MACs = nnz(weight) × P_ℓ, P_ℓ the number of output positions per example
(H_out·W_out for a 2-d conv, the product of the leading dims for a linear layer applied to a sequence, 1 for a
plain linear layer). GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out)) counts like a Linear.
A transformer is traced on an example input (``example=``: token ids or a dict batch of one example), not on a
zero tensor of ``input_shape``; the positions are then those of that example's sequence length. Conv/Linear layers that are not prunable count densely, as a constant. Normalization, pooling
and activation costs are not counted (they do not change with weight sparsity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import PrunekitError
from .batches import DictInputs, call
from .params import is_prunable_type


@dataclass(frozen=True)
class LayerFlops:
    module: str
    positions: int  # P_ℓ, output positions per example
    weights: int    # weight entries of the module (dense)


def layer_positions(model: nn.Module, input_shape: Sequence[int] | None = None, example=None
                    ) -> dict[str, LayerFlops]:
    """``{module name: LayerFlops}`` for every Conv/Linear (and transformers Conv1D) module, from one forward pass of
    a single example: zeros of ``input_shape`` (default ``model.input_shape``), or ``example`` when given (a tensor
    with a batch dimension of 1, a dict of such tensors called as ``model(**example)``, or a
    :class:`prunekit.batches.DictInputs`)."""
    if example is None:
        shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
        if shape is None:
            raise PrunekitError("FLOPs need the input shape: pass input_shape=(C, H, W) or set model.input_shape "
                                "(a transformer: pass example=, e.g. a dict batch of one example)")
    out: dict[str, LayerFlops] = {}
    hooks = []
    for name, m in model.named_modules():
        if is_prunable_type(m):
            def hook(mod, inputs, output, name=name):
                if not isinstance(mod, nn.modules.conv._ConvNd):  # Linear, Conv1D: positions = leading dims
                    pos = output.numel() // output.shape[-1]
                else:  # [N, C_out, *spatial]
                    pos = output[0, 0].numel()
                out[name] = LayerFlops(name, int(pos), mod.weight.numel())
            hooks.append(m.register_forward_hook(hook))
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if example is None:
                call(model, torch.zeros(1, *shape, dtype=p.dtype, device=p.device))
            else:
                x = DictInputs(example) if isinstance(example, dict) else example
                call(model, x.to(p.device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def macs(layers: Mapping[str, LayerFlops], nnz: Mapping[str, int] | None = None) -> int:
    """Total MACs per example; ``nnz`` maps module names to their kept weight counts (others count densely)."""
    nnz = nnz or {}
    return sum(l.positions * nnz.get(name, l.weights) for name, l in layers.items())


def masked_macs(model: nn.Module, masks, input_shape=None, layers: Mapping[str, LayerFlops] | None = None,
                example=None) -> int:
    """MACs per example of ``model`` under ``masks`` (a :class:`prunekit.Masks` or ``{param name: bool}``)."""
    layers = layers if layers is not None else layer_positions(model, input_shape, example)
    nnz = {}
    for pname, m in masks.items():
        mod, _, attr = pname.rpartition(".")
        if attr == "weight":
            nnz[mod] = int(m.sum())
    return macs(layers, nnz)


def theoretical_speedup(model: nn.Module, masks, input_shape=None, example=None) -> float:
    """Dense MACs / masked MACs."""
    layers = layer_positions(model, input_shape, example)
    return macs(layers) / max(1, masked_macs(model, masks, layers=layers))
