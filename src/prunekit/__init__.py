"""prunekit: neural-network pruning methods behind one API, one config format and one harness.

    import prunekit as pk
    pk.methods()                                   # MethodInfo for every method code
    masks = pk.prune(model, "magnitude", sparsity=0.9)
    scores = pk.score(model, "magnitude")
    pk.sparsity(model)
    print(masks.summary())
"""
from .errors import ConfigError, DatasetMissingError, PrunekitError
from .masks import LayerStat, Masks, load, save
from .params import ParamSpec, PrunableParam, prunable_params
from .prune import PruneOptions, prune, resolve_sparsity, round_sparsities, score, sparsity
from .registry import MethodInfo, PruningMethod, ScoreContext, get_method, methods, register
from .select import keep_count, select
from .structured import shrink

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DatasetMissingError", "PrunekitError", "LayerStat", "Masks", "load", "save", "ParamSpec",
    "PrunableParam", "prunable_params", "PruneOptions", "prune", "resolve_sparsity", "round_sparsities", "score",
    "sparsity", "MethodInfo", "PruningMethod", "ScoreContext", "get_method", "methods", "register", "keep_count",
    "select", "shrink",
    "__version__",
]
