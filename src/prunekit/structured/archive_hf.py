"""Save and reload a shrunk Hugging Face transformers model (fewer heads / FFN neurons per layer).

A transformers config has one ``num_attention_heads`` and one ``intermediate_size`` for every layer, so
``from_pretrained`` cannot rebuild a model whose layers were shrunk by different amounts. :func:`save_shrunk_hf`
therefore writes the folder of :func:`prunekit.hf.save_hf` (the original ``config.json`` and the shrunk weights as
``model.safetensors``) plus ``prunekit_shrunk.json``: the number of heads / neurons each group kept. Written last,
so a folder without it is incomplete. :func:`load_shrunk_hf` builds the model from the config (transformers code,
no weights read), shrinks every group to the stored size (the first channels: their values are overwritten) and
loads the safetensors weights strictly (every stored tensor must fit; only tied copies such as GPT-2's ``lm_head``
may be absent). Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunekitError
from ..io import atomic_write_json
from ..params import require_transformers
from .shrink import shrink
from .transformer_groups import is_transformer, transformer_groups

__all__ = ["save_shrunk_hf", "load_shrunk_hf", "SIZES_FILE"]

SIZES_FILE = "prunekit_shrunk.json"
FORMAT = "prunekit.shrunk_hf/1"


def save_shrunk_hf(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write a (shrunk) transformers ``model`` to ``out_dir``: config + safetensors weights
    (:func:`prunekit.hf.save_hf`) and the kept size of every head / neuron group (``prunekit_shrunk.json``)."""
    from ..hf import save_hf

    if not is_transformer(model) or not hasattr(model, "save_pretrained"):
        raise PrunekitError(f"save_shrunk_hf needs a transformers model, got {type(model).__name__}; use "
                            "prunekit.structured.save_shrunk for other shrunk models")
    sizes = {g.name: g.size for g in transformer_groups(model)}
    out = save_hf(model, out_dir)
    atomic_write_json(out / SIZES_FILE, {"format": FORMAT, "sizes": sizes})
    return out


def _read_sizes(path: Path) -> dict[str, int]:
    f = path / SIZES_FILE
    if not f.is_file():
        raise PrunekitError(f"{path} has no {SIZES_FILE}: it was not written by save_shrunk_hf (or the write did "
                            "not finish); a model that was not shrunk loads with prunekit.hf.load_hf")
    try:
        blob = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise PrunekitError(f"{f} is not readable JSON ({e}); save the model again") from None
    sizes = blob.get("sizes") if isinstance(blob, dict) else None
    if blob.get("format") != FORMAT or not isinstance(sizes, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 1 for k, v in sizes.items()):
        raise PrunekitError(f"{f} is not a {FORMAT} file (expected {{'format': ..., 'sizes': {{group: int >= 1}}}})")
    return sizes


def load_shrunk_hf(path: str | os.PathLike, task: str = "base") -> nn.Module:
    """The shrunk model that :func:`save_shrunk_hf` wrote to ``path``, with the head of ``task`` (``base``,
    ``sequence-classification``, ``causal-lm``: as :func:`prunekit.hf.load_hf`), in eval mode."""
    from safetensors.torch import load_file

    from ..hf import TASKS

    path = Path(path)
    if task not in TASKS:
        raise PrunekitError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    sizes = _read_sizes(path)
    if not (path / "model.safetensors").is_file():
        raise PrunekitError(f"{path} has no model.safetensors: save the model again with save_shrunk_hf")
    tf = require_transformers()
    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = {"base": tf.AutoModel, "sequence-classification": tf.AutoModelForSequenceClassification,
           "causal-lm": tf.AutoModelForCausalLM}[task]
    model = cls.from_config(config)
    groups = {g.name: g for g in transformer_groups(model)}
    unknown = [n for n in sizes if n not in groups]
    if unknown:
        raise PrunekitError(f"{path}: group {unknown[0]!r} of {SIZES_FILE} is not in a {type(model).__name__} built "
                            f"for task {task!r}; load it with the task it was saved with")
    too_big = [n for n, k in sizes.items() if k > groups[n].size]
    if too_big:
        raise PrunekitError(f"{path}: group {too_big[0]!r} keeps {sizes[too_big[0]]} of {groups[too_big[0]].size}")
    keep = {n: torch.arange(groups[n].size) < k for n, k in sizes.items()}
    model = shrink(model, keep, groups=list(groups.values()), check=False)
    state = load_file(str(path / "model.safetensors"))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[:3]
        raise PrunekitError(f"{path}: the stored weights do not fit the shrunk model ({' '.join(first)[:300]})") from None
    loaded = {t.data_ptr() for n, t in model.state_dict().items() if n in state}
    untied = [n for n in missing if model.state_dict()[n].data_ptr() not in loaded]
    if unexpected or untied:
        what = f"unexpected {unexpected[:3]}" if unexpected else f"missing {untied[:3]}"
        raise PrunekitError(f"{path}: model.safetensors does not match a {type(model).__name__} ({what}); load it "
                            "with the task it was saved with")
    return model.eval()
