"""Iterative magnitude pruning (seed 001): the codes ``lth``, ``sap``, ``ciap``, ``giap``, lottery levels with
rewinding (:mod:`.lottery`) and InCoP's flow statistics and stopping rule (:mod:`.incop`)."""
from . import codes  # noqa: F401  (registers the codes)
