"""The options of the OBS codes (:mod:`prunekit.families.obs.woodfisher`): :class:`OBSOptions` and the defaults of
each code (full, group, WoodTaylor, FLOPs target)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class OBSOptions:
    """Options of the OBS family (second_order.md; reference flags in brackets).

    Fisher (§1): ``fisher_samples`` N [--fisher-subsample-size]; ``fisher_batch`` b, examples per gradient
    [--fisher-mini-bsz]; ``fisher_damp`` λ [--fisher-damp]; ``effective_damp``: λ += ``weight_decay``;
    ``true_fisher``: labels sampled from the model; ``hess_label_smoothing``: label smoothing of this loss only;
    ``max_micro_batch``: examples per batched forward (default: the memory planner's).
    Blocks (§4): ``block_size`` c (null = whole tensor, or with ``blocks: global`` one block of all weights);
    ``blocks``: ``layer`` (blocks inside tensors) or ``global`` (chunks of the concatenated vector).
    Engines (§3): ``engine`` auto | gram | direct | sherman_morrison; ``sm_parts`` k (Sherman–Morrison tiling);
    ``centered``: use F − ḡḡᵀ.
    Update (§2): ``scale_prune_update`` σ (0 = no compensation); ``update`` sum | joint; ``joint_max``: largest
    |Q∩B| solved jointly (larger blocks fall back to sum with a warning); ``zero_after_prune``: write δw_q = −w_q;
    ``normalize_update``: rescale δw to ``update_mult``·‖w‖ when longer; ``log_loss_change``: log the measured loss
    change on the Fisher subset next to the predicted one.
    FLOPs (§6): ``flops_power`` p divides ρ by φ_ℓ^p (φ_ℓ = nnz_ℓ·P_ℓ MACs, or P_ℓ with ``flops_per_param``);
    ``input_shape`` for the FLOPs count (default: ``model.input_shape``).
    Memory (§9): ``memory_limit`` bytes (default 70% of available RAM, 90% of free CUDA memory); ``grad_device``,
    ``factor_device``, ``compute_device`` (e.g. ``cpu`` to offload); ``cache_factors`` auto | always | never. When
    the gradient matrix does not fit but the block inverses do, the step streams the gradients into the inverses
    (G never stored; not with ``centered`` or ``update: joint``; see :mod:`.planner`).
    """

    fisher_samples: int = 1000
    fisher_batch: int = 1
    fisher_damp: float = 1e-5
    effective_damp: bool = False
    weight_decay: float = 0.0
    true_fisher: bool = False
    hess_label_smoothing: float = 0.0
    max_micro_batch: int | None = None
    block_size: int | None = 2000
    blocks: Literal["layer", "global"] = "layer"
    engine: Literal["auto", "gram", "direct", "sherman_morrison"] = "auto"
    sm_parts: int = 1
    centered: bool = False
    scale_prune_update: float = 1.0
    update: Literal["sum", "joint"] = "sum"
    joint_max: int = 2048
    zero_after_prune: bool = False
    normalize_update: bool = False
    update_mult: float = 1.0
    log_loss_change: bool = False
    flops_power: float = 0.0
    flops_per_param: bool = False
    input_shape: tuple[int, ...] | None = None
    memory_limit: int | None = None
    grad_device: str | None = None
    factor_device: str | None = None
    compute_device: str | None = None
    cache_factors: Literal["auto", "always", "never"] = "auto"

    def validate(self, path, error) -> None:
        if self.fisher_samples < 1:
            raise error(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.fisher_batch < 1:
            raise error(f"fisher_batch must be >= 1, got {self.fisher_batch}")
        if not self.fisher_damp > 0:
            raise error(f"fisher_damp must be > 0 (it makes the Fisher invertible), got {self.fisher_damp}")
        if self.weight_decay < 0:
            raise error(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.hess_label_smoothing < 1.0:
            raise error(f"hess_label_smoothing must be in [0, 1), got {self.hess_label_smoothing}")
        if self.max_micro_batch is not None and self.max_micro_batch < 1:
            raise error(f"max_micro_batch must be >= 1, got {self.max_micro_batch}")
        if self.block_size is not None and self.block_size < 1:
            raise error(f"block_size must be >= 1 or null, got {self.block_size}")
        if self.sm_parts < 1:
            raise error(f"sm_parts must be >= 1, got {self.sm_parts}")
        if self.joint_max < 1:
            raise error(f"joint_max must be >= 1, got {self.joint_max}")
        if self.update_mult <= 0:
            raise error(f"update_mult must be > 0, got {self.update_mult}")
        if self.flops_power < 0:
            raise error(f"flops_power must be >= 0, got {self.flops_power}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise error(f"memory_limit must be a positive number of bytes, got {self.memory_limit}")
        for name in ("grad_device", "factor_device", "compute_device"):
            v = getattr(self, name)
            if v is not None:
                try:
                    torch.device(v)
                except (RuntimeError, TypeError):
                    raise error(f"{name}: {v!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None


@dataclass(frozen=True)
class FullOptions(OBSOptions):
    """``woodfisher``: one block of all prunable weights (``block_size: null``, ``blocks: global``)."""

    block_size: int | None = None
    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class GroupOptions(OBSOptions):
    """``woodfisherblockgroup``: chunks of ``block_size`` over the concatenated weights (``blocks: global``)."""

    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class TaylorOptions(OBSOptions):
    """WoodTaylor (§5), block version: ``fisher_damp`` defaults to 0.1; ``grad_samples``: examples for ∇L (default:
    the mean of the N stored gradients); ``normalize_hgp``: h ← h/‖h‖; ``woodtaylor_abs``: rank by |ρ_q| with the
    constant −½∇ᵀF⁻¹∇ included (reproduction only)."""

    fisher_damp: float = 0.1
    grad_samples: int | None = None
    normalize_hgp: bool = False
    woodtaylor_abs: bool = False

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.grad_samples is not None and self.grad_samples < 1:
            raise error(f"grad_samples must be >= 1 or null, got {self.grad_samples}")


@dataclass(frozen=True)
class FullTaylorOptions(TaylorOptions):
    """``woodtaylor``: WoodTaylor over one block of all prunable weights."""

    block_size: int | None = None
    blocks: Literal["layer", "global"] = "global"


@dataclass(frozen=True)
class FlopsOptions(OBSOptions):
    """``woodfisherblock_flops`` (§6): ``flops_target`` in MFLOPs (multiply-accumulates per example / 1e6, as
    :mod:`prunekit.flops` counts them), ``flops_epsilon`` the tolerance of the bisection in MFLOPs,
    ``max_sparsity`` where an unreachable target stops. Used by :func:`prune_to_flops`; through ``pk.prune`` with a
    sparsity the code behaves like ``woodfisherblock`` (with the ``flops_power`` reweighting)."""

    flops_target: float | None = None
    flops_epsilon: float = 0.1
    max_sparsity: float = 0.99

    def validate(self, path, error) -> None:
        super().validate(path, error)
        if self.flops_target is not None and self.flops_target < 0:
            raise error(f"flops_target must be >= 0 MFLOPs, got {self.flops_target}")
        if not self.flops_epsilon > 0:
            raise error(f"flops_epsilon must be > 0, got {self.flops_epsilon}")
        if not 0.0 < self.max_sparsity < 1.0:
            raise error(f"max_sparsity must be in (0, 1), got {self.max_sparsity}")
