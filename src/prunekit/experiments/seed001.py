import importlib, sys; sys.modules[__name__] = importlib.import_module("prunekit.compat.incop_flags")  # moved there (issue 15)
