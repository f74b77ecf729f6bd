"""Pruning at initialization: gradient (GN, SNIP, GraSP), Fisher (FD, FP, FTS, FBSS) and path (SynFlow, PX) scores.

Modules: :mod:`.gradient`, :mod:`.fisher`, :mod:`.synflow`, :mod:`.px` (each registers its codes, once), what
synflow and px share in :mod:`.path_copies`, and :mod:`.paths`, the former module of synflow and px.
"""
from . import fisher, gradient, paths, px, synflow  # noqa: F401  (registers the codes)
