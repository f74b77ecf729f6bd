"""Provable sensitivity pruning (seed 002): SiPP (weights) and PFP (filters)."""
from . import pfp, sipp  # noqa: F401  (registers the codes)
