"""Curvature baselines of seed 003: the naive Hessian diagonal (OBD), the diagonal Fisher and K-FAC."""
from . import diagfisher, kfac, naivehess  # noqa: F401  (registers the codes)
