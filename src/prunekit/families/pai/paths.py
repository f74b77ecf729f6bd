"""Path-based pruning at initialization: ``synflow`` (data-free) and ``px`` (Path eXclusion, seed 004).

The codes live in :mod:`.synflow` and :mod:`.px`, what they share (the activation interception and the scoring
copies) in :mod:`.path_copies`. This module names both codes' public objects together, at their former import path
(also reachable as ``prunekit.criteria.paths``).
"""
from .px import PXOptions, px
from .synflow import SynflowOptions, synflow

__all__ = ["PXOptions", "SynflowOptions", "px", "synflow"]
