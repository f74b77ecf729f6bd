"""Layer-wise reconstruction methods for one-shot post-training pruning from a small calibration set (no
gradients): ``sparsegpt`` (:mod:`.sparsegpt`), ``wanda`` (:mod:`.wanda`) and the exact per-row reference ``obc``
(:mod:`.obc`, small layers), on the shared driver of :mod:`.base`
and the hook-based input capture of :mod:`.calibration`."""
from . import obc, sparsegpt, wanda  # noqa: F401  (registers the methods)
