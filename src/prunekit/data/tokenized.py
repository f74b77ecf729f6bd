"""Text corpora as tensors a model can train on: each text tokenized once into ``[2, max_length]`` (token ids and
attention mask), so the splits are ordinary :class:`~prunekit.data.datasets.DatasetSplits` and every loader,
trainer and pruning method of prunekit reads them as ``(inputs, targets)`` batches.

The tokenizer is a Hugging Face ``tokenizer.json`` read with the ``tokenizers`` package (a data file: no code is
loaded). Each text becomes ``[CLS] ... [SEP]`` (the file's own post-processor), truncated to ``max_length`` tokens
and padded with the pad id to exactly ``max_length``. The ids and the mask are stored as float32 (every id below
2^24 is exact) with scale 1 and the identity normalization (mean 0, std 1), so the loaders pass them through
unchanged; :class:`prunekit.hf.TextClassifier` turns them back into integers.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..errors import PrunekitError
from .datasets import DatasetSplits, TensorData, stratified_split
from .text import TextData, TextSplits, load_text

#: The default number of tokens per text in the harness (issue 16's measured MiniLM speeds are at 64).
DEFAULT_MAX_LENGTH = 64
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` of a model folder (or the file itself); a clear error when there is none."""
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.is_file():
        raise PrunekitError(f"no {TOKENIZER_FILE} at {p}: pass a Hugging Face model folder with a fast tokenizer "
                            "(prunekit models fetch minilm puts one under the data directory)")
    return f


def _tokenizer(path: str | os.PathLike, max_length: int):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PrunekitError("tokenizing text needs the tokenizers package: pip install 'prunekit[hf]'") from None
    f = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises its own Exception subclass for a bad file
        raise PrunekitError(f"{f} is not a readable tokenizer.json ({str(e).splitlines()[0][:160]})") from None
    pad = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0 if pad is None else pad)
    return tok


def encode(texts: list[str], tokenizer, max_length: int) -> torch.Tensor:
    """``[len(texts), 2, max_length]`` float32: token ids, then the attention mask."""
    enc = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.float32)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.float32)
    if ids.shape[-1] != max_length:  # enable_padding(length=...) guarantees it; a changed tokenizer would not
        raise PrunekitError(f"the tokenizer gave {ids.shape[-1]} tokens per text, not {max_length}")
    return torch.stack([ids, mask], dim=1)


def tokenized(splits: TextSplits, tokenizer: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH
              ) -> DatasetSplits:
    """``splits`` tokenized by the ``tokenizer.json`` in ``tokenizer`` (a model folder or the file)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 4096:
        raise PrunekitError(f"max_length must be a whole number of tokens in [2, 4096], got {max_length!r}")
    tok = _tokenizer(tokenizer, max_length)

    def one(d: TextData) -> TensorData:
        return TensorData(encode(d.texts, tok, max_length), d.labels.clone(), 1.0)

    return DatasetSplits(one(splits.train), one(splits.val), one(splits.test), splits.name, (2, max_length),
                         splits.num_classes, (0.0, 0.0), (1.0, 1.0))


def load_tokenized(name: str, tokenizer: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                   root: str | os.PathLike | None = None, val_size=None, split_seed: int = 42,
                   subset: int | None = None) -> DatasetSplits:
    """The text corpus ``name`` (:func:`prunekit.data.load_text`: stratified, seeded splits; ``val_size`` None keeps
    its default) tokenized; ``subset``: a stratified seeded subset of that many training texts."""
    kw = {} if val_size is None else {"val_size": val_size}
    text = load_text(name, root=root, split_seed=split_seed, **kw)
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= len(text.train):
            raise PrunekitError(f"subset={subset!r}: pass a number of training texts in [1, {len(text.train)}]")
        if subset < len(text.train):
            _, keep = stratified_split(text.train.labels, subset, split_seed + 2)
            keep = keep.sort().values.tolist()
            text = dataclasses.replace(text, train=TextData([text.train.texts[i] for i in keep],
                                                            text.train.labels[keep],
                                                            [text.train.groups[i] for i in keep]))
    return tokenized(text, tokenizer, max_length)
