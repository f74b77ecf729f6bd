"""Where a run's weights and data come from, checked and identified: a Hugging Face folder or fetched encoder
(``model.pretrained: {source: hf}``), a zoo model's published weights (``{source: zoo}``) and the data section that
must fit them (text for an encoder, images otherwise)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import dataset_names, text_dataset_names
from ..errors import ConfigError, PrunekitError, unknown
from ..models import canonical_name
from .resolved import PretrainedHF, PretrainedZoo, ResolvedModel, hf_source

if TYPE_CHECKING:
    from .config import DataSection, PretrainedSource


def check_data(d: DataSection, model: ResolvedModel) -> None:
    """The data section fits the dataset and the model: text data needs a Hugging Face encoder (its tokenizer),
    ``max_length`` is for text only, ``channels``/``resize`` are for images only."""
    text = d.name in text_dataset_names()
    if not text and d.name not in dataset_names():
        raise ConfigError(f"field 'data.name': {unknown('dataset', d.name, dataset_names() + text_dataset_names())}")
    hf = hf_source(model) is not None
    if text and not hf:
        raise ConfigError(f"data.name {d.name!r} is text: it needs a Hugging Face encoder to tokenize and read it; "
                          "set model.pretrained: {source: hf, name: minilm}")
    if hf and not text:
        raise ConfigError(f"model.pretrained.source 'hf' reads text; data.name {d.name!r} is not a text dataset "
                          f"(text datasets: {', '.join(text_dataset_names())})")
    if d.max_length is not None and not text:
        raise ConfigError(f"field 'data.max_length' applies to text datasets only, not {d.name!r}: remove it")
    if text:
        for key in ("resize", "channels", "augment"):
            if getattr(d, key) not in (None, False):
                raise ConfigError(f"field 'data.{key}' applies to images only, not the text dataset {d.name!r}: "
                                  "remove it")


#: sha256 of files already hashed in this process, by (path, size, mtime): a grid resolves the same folder often.
_HASHED: dict = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def resolve_hf(src: PretrainedSource, model_name: str | None) -> ResolvedModel:
    """``model.pretrained: {source: hf, name: ...}``: a fetched model is identified by its pinned hashes (nothing
    is read: the data directory is the runner's), a folder by the hashes of its files. ``model_name``: the config's
    ``model.name`` when set (an error: the folder's config.json gives the architecture)."""
    from ..models.fetch import ASSETS

    if src.path is not None:
        raise ConfigError("field 'model.pretrained.path' is for source file/run; an hf source takes name (a "
                          "fetched model such as minilm, or a folder)")
    if not src.name:
        raise ConfigError("field 'model.pretrained.name': an hf source needs a name: a fetched model (minilm) or "
                          "a folder with config.json, model.safetensors and tokenizer.json")
    if model_name is not None:
        raise ConfigError(f"field 'model.name' ({model_name!r}) is not used with model.pretrained.source 'hf' (the "
                          "folder's config.json gives the architecture): remove it")
    asset = ASSETS.get(src.name)
    if asset is not None:
        if "tokenizer.json" not in asset.files:
            raise ConfigError(f"field 'model.pretrained.name': {src.name!r} is not a Hugging Face text model; "
                              f"use source zoo for it")
        weights = asset.files["config.json" if src.init == "random" else "model.safetensors"]
        pre = PretrainedHF(src.name, "", weights, asset.files["tokenizer.json"], src.init)
        return ResolvedModel(f"hf:{src.name}", pre)
    folder = Path(src.name).expanduser()
    need = ("config.json", "tokenizer.json") + (("model.safetensors",) if src.init == "pretrained" else ())
    missing = [f for f in need if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"field 'model.pretrained.name': {src.name!r} is neither a fetched model "
                          f"({', '.join(a for a in ASSETS if 'tokenizer.json' in ASSETS[a].files)}) nor a folder "
                          f"with {', '.join(need)} ({missing[0]} missing)")
    weights = _sha256(folder / ("config.json" if src.init == "random" else "model.safetensors"))
    pre = PretrainedHF(folder.name, str(folder.resolve()), weights, _sha256(folder / "tokenizer.json"), src.init)
    return ResolvedModel(f"hf:{folder.name}", pre)


def resolve_zoo(src: PretrainedSource, name: str) -> PretrainedZoo:
    """``{source: zoo, name: ...}``: the published weights of a zoo model (``name`` defaults to model.name)."""
    from ..models.fetch import ASSETS

    if src.path is not None:
        raise ConfigError("field 'model.pretrained.path' is for source file/run; a zoo source takes name")
    if src.name is not None:
        try:
            zoo = canonical_name(src.name)
        except PrunekitError as e:
            raise ConfigError(f"field 'model.pretrained.name': {e}") from None
        if zoo != name:
            raise ConfigError(f"field 'model.pretrained.name': {src.name!r} is not model.name {name!r}: set both "
                              "to the same zoo model (or leave pretrained.name out)")
    asset = ASSETS.get(name)
    if asset is None or "tokenizer.json" in asset.files:
        have = [a for a in ASSETS if "tokenizer.json" not in ASSETS[a].files]
        raise ConfigError(f"model {name!r} has no published weights in prunekit (zoo models with weights: "
                          f"{', '.join(have)})")
    return PretrainedZoo(name, next(iter(asset.files.values())), src.init)
