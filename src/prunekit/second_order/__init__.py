"""Moved to :mod:`prunekit.families.obs` (the OBS engines: block layouts, inverse engines, gradient matrix, memory
planner); these names stay importable here, and ``prunekit.second_order.<module>`` are aliases of the moved
modules."""
from ..families.obs import *  # noqa: F401,F403
from ..families.obs import __all__  # noqa: F401
