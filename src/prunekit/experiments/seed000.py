import importlib, sys; sys.modules[__name__] = importlib.import_module("prunekit.compat.fts_json")  # moved there (issue 15)
