"""Layer-wise reconstruction methods for one-shot post-training pruning from a small calibration set (no
gradients): ``sparsegpt`` (:mod:`.sparsegpt`) and ``wanda`` (:mod:`.wanda`), on the shared driver of :mod:`.base`
and the hook-based input capture of :mod:`.calibration`."""
from . import sparsegpt, wanda  # noqa: F401  (registers the methods)
