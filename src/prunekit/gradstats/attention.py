"""Second-order scoring on transformers models: :func:`twice_differentiable` runs their attention as "eager" (a
double backward through the fused kernels does not exist) and restores each model's setting after."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def twice_differentiable(model: nn.Module):
    """Second-order scoring (Hessian-vector products: grasp, naivehess) on a transformers model, or a module that
    wraps one: its attention runs as ``"eager"`` (plain matmul + softmax, differentiable twice) while scoring, since
    PyTorch's fused scaled-dot-product attention kernels have no double backward; each model's own setting is
    restored after. The eager and fused kernels compute the same function (to float rounding). Models without a
    transformers attention setting are left as they are."""
    switched = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        before = getattr(cfg, "_attn_implementation", None)
        setter = getattr(m, "set_attn_implementation", None)
        if callable(setter) and before not in (None, "eager") and not any(m is s for s, _ in switched):
            if any(any(m is c for c in s.modules()) for s, _ in switched):
                continue  # inside a model already switched
            setter("eager")
            switched.append((m, before))
    try:
        yield
    finally:
        for m, before in reversed(switched):
            m.set_attn_implementation(before)
