"""Hugging Face models in and out, as data only: read with safetensors, written as safetensors + config.

    from prunekit.hf import load_hf, save_hf, load_hf_masks
    model = load_hf(minilm_path(), task="sequence-classification", num_labels=2)   # never unpickles
    masks = pk.prune(model, "magnitude", sparsity=0.5)                               # block Linear weights
    save_hf(model, "pruned/", masks)          # transformers' from_pretrained("pruned/") gives the pruned model
    masks = load_hf_masks("pruned/", fresh_model)                                    # prunekit's masks back

``load_hf`` reads a local folder only (no hub access, ``local_files_only``) and only its ``model.safetensors``
(``use_safetensors=True``): a folder with only pickled weights (``pytorch_model.bin``) is refused with the reason.
``save_hf`` writes through a temporary folder renamed into place, so a crash leaves no half-written model: the
config, the weights as safetensors (pruned entries are exact zeros, so ``from_pretrained`` gives the pruned model)
and, with masks, ``prunekit_masks.safetensors`` (one uint8 tensor per prunable weight) that :func:`load_hf_masks`
reads back.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError
from .masks import Masks

MASKS_FILE = "prunekit_masks.safetensors"
TASKS = ("base", "sequence-classification", "causal-lm")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PrunekitError("Hugging Face models need transformers: pip install 'prunekit[hf]'") from None
    return transformers


def load_hf(path: str | os.PathLike, task: str = "base", **config_overrides) -> nn.Module:
    """The model in the local folder ``path`` (``config.json`` + ``model.safetensors``), with the head of ``task``
    (``base``: the bare encoder/decoder; ``sequence-classification``: a new or stored classification head;
    ``causal-lm``), ``config_overrides`` passed to ``from_pretrained`` (e.g. ``num_labels=2``)."""
    path = Path(path)
    if task not in TASKS:
        raise PrunekitError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if not (path / "config.json").is_file():
        raise PrunekitError(f"{path} has no config.json: pass the folder of a Hugging Face model (prunekit models "
                            "fetch minilm puts one under the data directory)")
    if not (path / "model.safetensors").is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        why = f" (it has {', '.join(found)}: pickled weights, which prunekit never loads)" if found else ""
        raise PrunekitError(f"{path} has no model.safetensors{why}: convert the weights to safetensors first")
    tf = _transformers()
    cls = {"base": tf.AutoModel, "sequence-classification": tf.AutoModelForSequenceClassification,
           "causal-lm": tf.AutoModelForCausalLM}[task]
    try:
        return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **config_overrides)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PrunekitError(f"{path}: transformers cannot load it as {task!r} ({first[:200]})") from None


def save_hf(model: nn.Module, out_dir: str | os.PathLike, masks=None) -> Path:
    """Write ``model`` (a transformers model) to ``out_dir`` as safetensors + config, with ``masks`` (prunekit
    :class:`~prunekit.masks.Masks`) as ``prunekit_masks.safetensors``; atomic (a temporary folder renamed into
    place; an existing ``out_dir`` is replaced only once the new one is complete)."""
    if not hasattr(model, "save_pretrained"):
        raise PrunekitError(f"save_hf needs a transformers model (with save_pretrained), got {type(model).__name__}; "
                            "use prunekit.save for other models")
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if masks is not None:
            masks.apply()  # the stored weights are the pruned ones
        model.save_pretrained(str(tmp), safe_serialization=True)
        if masks is not None:
            save_file({n: m.to(torch.uint8).contiguous().cpu() for n, m in masks.as_dict().items()},
                      str(tmp / MASKS_FILE), metadata={"format": "prunekit.masks/1"})
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_hf_masks(out_dir: str | os.PathLike, model: nn.Module):
    """The :class:`~prunekit.masks.Masks` that :func:`save_hf` stored beside ``model``'s weights (None when the
    folder has none), attached to ``model`` (loaded from the same folder) and checked against its tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(out_dir) / MASKS_FILE
    if not path.is_file():
        return None
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PrunekitError(f"{path} is not a readable safetensors file ({e}): save the model again") from None
    return Masks.from_state_dict(model, {n: t.to(torch.bool) for n, t in stored.items()})
