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
INITS = ("pretrained", "random")


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
    tf.utils.logging.disable_progress_bar()  # no per-tensor loading bar in every run's log
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


class TextClassifier(nn.Module):
    """A Hugging Face encoder with a mean-pooling classification head, driven by one tensor per batch.

    ``x`` is ``[batch, 2, length]``: row 0 the token ids, row 1 the attention mask (any dtype; the harness's loaders
    hold them as float32, which represents every id below 2^24 exactly). The encoder's last hidden states are averaged
    over the unmasked tokens (the pooling of sentence-transformers, so a frozen MiniLM gives its sentence embeddings)
    and ``head`` (a Linear) maps them to class logits. Because the whole batch is one tensor, every part of prunekit
    that feeds ``(inputs, targets)`` pairs (training, scoring data, the data-dependent criteria, FLOP counts on a
    zero input) works on it unchanged. ``encoder`` is the ``transformers`` model: its block Linear weights are the
    default prunable tensors (:func:`prunekit.params.hf_block_layers`); the embeddings, LayerNorms and ``head`` are
    not pruned by default.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise PrunekitError(f"TextClassifier takes [batch, 2, length] inputs (token ids, attention mask), got "
                                f"{tuple(x.shape)}: tokenize with prunekit.data.tokenized")
        ids, mask = x[:, 0].long(), x[:, 1].long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


    def example_input(self, batch: int, input_shape: tuple = (2, 64)) -> torch.Tensor:
        """``batch`` texts of ``input_shape[-1]`` tokens (fixed random ids, every token attended) for timing and
        shrinking; a fixed generator, so every call gives the same batch."""
        length = int(input_shape[-1])
        g = torch.Generator().manual_seed(0)
        vocab = int(self.encoder.config.vocab_size)
        ids = torch.randint(min(1000, vocab - 1), vocab, (batch, length), generator=g)
        return torch.stack([ids, torch.ones_like(ids)], 1).float()


def text_classifier(path: str | os.PathLike, num_classes: int, init: str = "pretrained") -> TextClassifier:
    """A :class:`TextClassifier` on the encoder in the local folder ``path``: its pretrained weights
    (``init="pretrained"``, read by :func:`load_hf` from safetensors) or the same architecture freshly initialised
    from its ``config.json`` alone (``init="random"``: the from-scratch reference; seeded by torch's global RNG).
    The head is always new (seeded the same way)."""
    if init not in INITS:
        raise PrunekitError(f"unknown init {init!r}: use 'pretrained' or 'random'")
    if init == "pretrained":
        encoder = load_hf(path, "base")
    else:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise PrunekitError(f"{path} has no config.json: pass the folder of a Hugging Face model")
        tf = _transformers()
        encoder = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(str(path), local_files_only=True))
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, nn.Module):  # mean pooling instead; kept (frozen) so the encoder stays the model it was
        pooler.requires_grad_(False)  # (transformers reloads it) and DDP sees no trainable parameter without a gradient
    return TextClassifier(encoder, num_classes)
