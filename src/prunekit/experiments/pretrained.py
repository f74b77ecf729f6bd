"""Models that start from published weights: a Hugging Face encoder with a new head
(``model.pretrained: {source: hf}``) and a zoo model's published weights (``{source: zoo}``), each also as the
same architecture freshly initialised (``init: random``, the from-scratch reference).

A Hugging Face folder is read as data only (:func:`prunekit.hf.load_hf`: config + safetensors); a zoo model's
weights are a ``weights_only`` state_dict fetched with a pinned sha256 (:mod:`prunekit.models.fetch`).
"""
from __future__ import annotations

from pathlib import Path

from ..hf import text_classifier
from ..models import get_model, load_published
from .resolved import PretrainedHF, PretrainedRun, PretrainedZoo, ResolvedRun


def hf_folder(pre: PretrainedHF, data_dir) -> Path:
    """The local folder of a Hugging Face source: a fetched model in the data directory, or the folder named."""
    from ..models.fetch import ASSETS, asset_path

    return asset_path(ASSETS[pre.name], data_dir) if not pre.folder else Path(pre.folder)


def build_model(resolved: ResolvedRun, splits, data_dir):
    """The run's model, seeded: a zoo model, or a Hugging Face encoder with a new head (its pretrained weights or
    a fresh initialisation); a zoo model's published weights are loaded here too (all but a head of another
    size)."""
    pre = resolved.model.pretrained
    if isinstance(pre, PretrainedRun):  # the architecture of the run it starts from (its weights come after)
        return build_model(pre.resolved, splits, data_dir)
    if isinstance(pre, PretrainedHF):
        return text_classifier(hf_folder(pre, data_dir), splits.num_classes, init=pre.init)
    model = get_model(resolved.model.name, num_classes=splits.num_classes, input_shape=tuple(splits.input_shape))
    if isinstance(pre, PretrainedZoo) and pre.init == "pretrained":
        load_published(resolved.model.name, model, data_dir)
    return model
