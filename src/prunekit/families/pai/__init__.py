"""Pruning at initialization: gradient (GN, SNIP, GraSP), Fisher (FD, FP, FTS, FBSS) and path (SynFlow, PX) scores."""
from . import fisher, gradient, paths  # noqa: F401  (registers the codes)
