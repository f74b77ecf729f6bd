"""Structured baselines: filter norms (``filter_l1``, ``filter_l2``), random filters and BatchNorm scales."""
from . import baselines  # noqa: F401  (registers the codes)
