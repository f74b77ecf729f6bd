"""Baselines: ``none`` (dense), ``random``, ``magnitude``, and seed 003's per-layer and global magnitude."""
from . import basic, magni  # noqa: F401  (registers the codes)
