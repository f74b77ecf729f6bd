"""A Linear layer whose weight is a torch sparse CSR tensor, for float32 CPU inference.

:class:`SparseLinear` computes ``y = x @ Wᵀ + b`` for inputs of any leading dims with one
``torch.addmm(b[:, None], W_csr, x₂ᵀ)`` (``x₂`` the input flattened to 2-D rows), transposed back to a contiguous
``[..., out_features]`` result. On torch 2.13's CPU build that is the fastest correct CSR route measured
(``bench/bench_sparse_cpu.py --paths``): ``F.linear(x, W_csr, b)`` and ``x @ W_csrᵀ`` (CSC) give the same numbers but
are several times slower than the dense matmul once there are more than a few rows; the contiguous copy of the output
costs a few percent and is needed because the transformers attention code calls ``.view`` on it.

The layer is inference-only: the CSR weight is a buffer, not a parameter, and an input that requires grad is refused.
Training keeps the masked dense model (:class:`prunekit.masks.Masks`); convert at the end with
:func:`prunekit.speedup.to_sparse`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import PrunekitError


class SparseLinear(nn.Module):
    """``y = x @ Wᵀ + b`` with ``W`` ([out_features, in_features], float32) held as a sparse CSR buffer ``weight``
    and ``b`` (float32 [out_features], or None) as a dense buffer ``bias``. Build it with :meth:`from_dense`."""

    def __init__(self, weight_csr: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight_csr.layout != torch.sparse_csr or weight_csr.dim() != 2:
            raise PrunekitError(f"SparseLinear needs a 2-D sparse CSR weight, got layout {weight_csr.layout} with "
                                f"{weight_csr.dim()} dims: use SparseLinear.from_dense(weight, bias)")
        if weight_csr.dtype != torch.float32:
            raise PrunekitError(f"SparseLinear runs float32 (got {weight_csr.dtype}): convert the model with "
                                "model.float() first")
        out_f, in_f = weight_csr.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise PrunekitError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},) for a weight of "
                                f"{out_f}x{in_f}")
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.register_buffer("weight", weight_csr)
        # a column so addmm broadcasts it over the rows of the [out, rows] product
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(out_f, 1))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "SparseLinear":
        """The layer computing ``F.linear(x, weight, bias)`` from the dense ``weight`` [out, in] (its exact zeros
        are not stored)."""
        if not torch.is_tensor(weight) or weight.dim() != 2 or weight.layout != torch.strided:
            raise PrunekitError(f"from_dense needs a dense 2-D weight [out_features, in_features], got "
                                f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.device.type != "cpu":
            raise PrunekitError(f"SparseLinear is the CPU path (weight is on {weight.device}): on CUDA use "
                                "prunekit.speedup.to_semi_structured with a 2:4 mask")
        w = weight.detach().to(torch.float32).contiguous()
        with warnings.catch_warnings():  # torch's one-time "Sparse CSR tensor support is in beta state" notice
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = w.to_sparse_csr()
        return cls(csr, None if bias is None else bias.detach().to(torch.float32))

    @property
    def nnz(self) -> int:
        """Stored (nonzero) weight entries."""
        return int(self.weight._nnz())

    @property
    def sparsity(self) -> float:
        """Fraction of weight entries not stored."""
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The dense weight [out_features, in_features] (pruned entries 0)."""
        return self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise PrunekitError(f"SparseLinear takes float32 inputs, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise PrunekitError(f"SparseLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise PrunekitError("SparseLinear is inference-only (no gradients through the CSR weight): call the "
                                "converted model under torch.inference_mode(), and train the masked dense model")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.bias is None:
            y = torch.mm(self.weight, x2.t())
        else:
            y = torch.addmm(self.bias, self.weight, x2.t())
        return y.t().contiguous().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.4f}")
