"""Moved to :mod:`prunekit.families.obs.gradients`; this name stays importable and is the same module object."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("prunekit.families.obs.gradients")
