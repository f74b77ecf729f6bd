"""How well a pruned model reproduces its dense self on held-out data: the layer reconstruction errors that the
layer-wise methods minimise, and the error of the model's output.

For every pruned weight that :func:`~.calibration.as_layer` reads (Linear, GPT-2 Conv1D, Conv1d/2d/3d), with W the
dense weight, Ŵ the pruned one and X̂ the inputs the layer receives *in the pruned model* (every earlier layer
already pruned) on the held-out batches::

    layer error = ‖(W − Ŵ) X̂‖²_F / ‖W X̂‖²_F

the fraction of the layer's (bias-free) output that pruning loses. This is SparseGPT's objective ‖WX − ŴX‖²
(Frantar & Alistarh 2023, eq. 1) normalised by the layer's output, evaluated on inputs it was not calibrated on,
with its sequential inputs: a method that reconstructs (sparsegpt) lowers it, one that only selects (magnitude,
wanda) does not. ``output`` is ‖f(x) − f̂(x)‖² / ‖f(x)‖² summed over the batches, f the dense model's output
(logits, or the first output of a Hugging Face model) and f̂ the pruned model's.

Sums are taken in float64 over all held-out tokens (examples × positions), so the ratios do not depend on the
batching. Tensors the layer-wise methods do not read (biases, embeddings) are left out of the per-layer errors and
counted in the output error only.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch

from ...batches import call
from ...errors import PrunekitError
from ...masks import Masks
from .calibration import Calibration, as_layer, batch_inputs, calibrating


def _output(out) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits`` / ``last_hidden_state`` of a Hugging Face
    output, or the first entry of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    return out[0]


@torch.no_grad()
def reconstruction_errors(model: torch.nn.Module, dense: Mapping[str, torch.Tensor], masks: Masks,
                          data: Iterable) -> dict:
    """The errors of the pruned ``model`` against its dense weights ``dense`` (a state_dict taken before pruning)
    on the held-out batches ``data`` (see the module docstring). Returns ``{"layers": {name: error}, "mean": mean
    of the layer errors, "output": output error, "samples": examples read}``."""
    params = [p for p in masks.params if p.attr == "weight" and p.name in dense]
    layers = []
    for p in params:
        try:
            layers.append(as_layer(p))
        except PrunekitError:  # a tensor the layer-wise view cannot read: in the output error only
            continue
    batches = list(data)
    cal = Calibration(model, layers, batches)
    lost = [torch.zeros((), dtype=torch.float64) for _ in layers]
    kept = [torch.zeros((), dtype=torch.float64) for _ in layers]
    f64 = torch.float64
    Wd = [L.matrices(f64, dense[L.name].to(L.param.tensor.device)) for L in layers]
    dW = [w - L.matrices(f64) for w, L in zip(Wd, layers)]

    def add(i: int, x: torch.Tensor) -> None:
        X = layers[i].inputs(x, f64)  # [tokens, G, cols]
        kept[i] += torch.einsum("tgc,grc->tgr", X, Wd[i]).pow(2).sum().cpu()
        lost[i] += torch.einsum("tgc,grc->tgr", X, dW[i]).pow(2).sum().cpu()

    if layers:
        cal.capture(range(len(layers)), add, stop=False)
    errors = {L.name: float(lo / k) if k > 0 else 0.0 for L, lo, k in zip(layers, lost, kept)}
    ref = copy.deepcopy(model)
    ref.load_state_dict({**ref.state_dict(), **dense})
    diff = norm = 0.0
    with calibrating(model), calibrating(ref):
        for x in cal.inputs:
            f, fh = _output(call(ref, x)).double(), _output(call(model, x)).double()
            diff += float((f - fh).pow(2).sum())
            norm += float(f.pow(2).sum())
    return {"layers": errors, "mean": sum(errors.values()) / len(errors) if errors else None,
            "output": diff / norm if norm > 0 else None, "samples": cal.samples}


def held_out(loader, samples: int) -> list:
    """The first ``samples`` examples of ``loader`` (its batches, the last one cut), as the batches to measure on."""
    out, n = [], 0
    for batch in loader:
        x = batch_inputs(batch)
        take = min(int(x.shape[0]), samples - n)
        out.append(x[:take] if take < x.shape[0] else x)
        n += take
        if n >= samples:
            break
    return out
