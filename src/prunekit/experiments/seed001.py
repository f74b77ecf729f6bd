"""Moved to :mod:`prunekit.compat.incop_flags` (issue 15): this old name is an alias of that module."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("prunekit.compat.incop_flags")
