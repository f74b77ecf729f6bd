"""N:M sparsity patterns (semi-structured sparsity): in every group of M consecutive weights along a layer's input
dimension exactly N are kept, the layout NVIDIA's sparse tensor cores accelerate (2:4; 4:8 and others are also
accepted).

Groups, per layer type (:func:`input_dim`):

- ``nn.Linear`` weight (out, in): M consecutive entries along ``in`` in each output row.
- ``nn.Conv1d/2d/3d`` weight (out, in/groups, *kernel): M consecutive input channels at each (output channel,
  kernel position), i.e. along dim 1 (the layout of a sparse implicit-GEMM convolution). Transposed convolutions
  are refused.
- GPT-2's ``transformers.pytorch_utils.Conv1D`` weight, stored (in, out): along dim 0, its input dimension.

A layer whose input dimension is not a multiple of M is refused (a :class:`~prunekit.errors.PrunekitError` naming
it and the fix: leave it out with ``ignore=[...]`` / ``exclude=[...]``); no remainder is left dense silently.
Biases and tensors of other modules (``include_bias``, ``modules=`` naming a BatchNorm, ...) are refused too.

Levels: the pattern fixes the sparsity at 1 − N/M. Schedules (``rounds``, gradual pruning) reach it through the
intermediate patterns n:M, N ≤ n ≤ M, each of sparsity 1 − n/M (:meth:`Pattern.level`,
:meth:`Pattern.nearest_level`): 2:4 in two rounds is 3:4, then 2:4. Each step keeps the top n alive entries of every
group of the previous step, so the masks are nested and every intermediate mask is itself a valid n:M pattern.

Selection (:func:`select_nm`): in every group the n alive entries of highest score are kept (ties: the lower index
along the input dimension). Pruned entries stay pruned; a group with fewer than n alive entries (earlier masks that
did not follow the pattern, or a model's exact zeros) keeps those it has, so it has fewer than n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import PrunekitError
from .masks import Masks
from .params import PrunableParam, hf_conv1d, prunable_params
from .select import NAN_POLICIES, clean_scores

_TOL = 1e-9


@dataclass(frozen=True)
class Pattern:
    """N of every M kept (0 < N < M)."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """1 − N/M, the sparsity of the pattern."""
        return 1.0 - self.n / self.m

    def level(self, sparsity: float, error=PrunekitError) -> int:
        """The n (N ≤ n ≤ M) with 1 − n/M = ``sparsity``; an error when the sparsity is no such level."""
        k = (1.0 - float(sparsity)) * self.m
        n = int(math.floor(k + 0.5))
        if abs(k - n) > _TOL * self.m or not self.n <= n <= self.m:
            levels = ", ".join(f"{1 - j / self.m:g}" for j in range(self.m, self.n - 1, -1))
            raise error(f"pattern {self} prunes {self.sparsity:g} of the weights: ask for sparsity={self.sparsity:g} "
                        f"or leave the sparsity out (got {float(sparsity):g}; schedules step through the levels "
                        f"{levels}, the patterns n:{self.m} with n from {self.m} down to {self.n})")
        return n

    def nearest_level(self, sparsity: float) -> int:
        """The n of the level nearest to ``sparsity``: round((1 − s)·M) (half up), clamped to [N, M]. Maps the
        sparsities of a schedule onto the patterns n:M."""
        return min(self.m, max(self.n, int(math.floor((1.0 - float(sparsity)) * self.m + 0.5))))

    def level_sparsity(self, n: int) -> float:
        """1 − n/M."""
        return 1.0 - n / self.m


def parse_pattern(value, error=PrunekitError) -> Pattern | None:
    """``"N:M"`` (or a :class:`Pattern`) → :class:`Pattern` with 0 < N < M; None → None (unstructured)."""
    if value is None or isinstance(value, Pattern):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise error(f"pattern must be a string 'N:M' such as '2:4', got the number {value!r} (in YAML quote it: "
                    "pattern: \"2:4\"; unquoted 2:4 is read as the base-60 number 124)")
    if not isinstance(value, str):
        raise error(f"pattern must be a string 'N:M' such as '2:4', got {value!r}")
    parts = value.strip().split(":")
    try:
        n, m = (int(v) for v in parts)
    except ValueError:
        raise error(f"pattern must look like 'N:M' (e.g. '2:4' or '4:8'), got {value!r}") from None
    if not 0 < n < m:
        raise error(f"pattern {value!r}: need 0 < N < M (N kept of every M)")
    return Pattern(n, m)


# ------------------------------------------------------------------------------------------------------ layout
def input_dim(p: PrunableParam) -> int:
    """The dimension of ``p``'s tensor along which its groups run (its layer's input dimension): 1 for Linear and
    Conv1d/2d/3d weights, 0 for GPT-2's Conv1D. A PrunekitError for any other tensor."""
    m = p.module
    fix = f"leave it out with ignore=[{p.module_name!r}] (or exclude=[...])"
    if p.attr != "weight":
        raise PrunekitError(f"pattern: {p.name!r} is not a layer weight; N:M patterns apply to the weights of "
                            f"Linear / Conv layers (turn include_bias off, or {fix})")
    conv1d = hf_conv1d()
    if conv1d is not None and isinstance(m, conv1d):
        return 0
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            raise PrunekitError(f"pattern: {p.name!r} belongs to a transposed convolution ({type(m).__name__}), "
                                f"whose N:M layout prunekit does not define; {fix}")
        return 1
    if isinstance(m, nn.Linear):
        return 1
    raise PrunekitError(f"pattern: {p.name!r} belongs to a {type(m).__name__}; N:M patterns apply to Linear, "
                        f"Conv1d/2d/3d and GPT-2 Conv1D weights; {fix}")


def check_layers(params: Sequence[PrunableParam], pattern: Pattern) -> None:
    """Every tensor has a known layout (:func:`input_dim`) and an input dimension that is a multiple of M."""
    for p in params:
        d = input_dim(p)
        size = p.tensor.shape[d]
        if size % pattern.m:
            what = "input channels" if isinstance(p.module, nn.modules.conv._ConvNd) else "inputs"
            raise PrunekitError(
                f"pattern {pattern}: {p.name!r} has {size} {what}, not a multiple of {pattern.m}, so it cannot be cut "
                f"into groups of {pattern.m}; leave the layer out with ignore=[{p.module_name!r}] (or "
                "exclude=[...]; the first layer of an image model, with 1 or 3 input channels, usually is)")


def to_groups(t: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """``t`` as [groups, m]: its input dimension ``dim`` moved last, then cut into runs of ``m``."""
    return t.movedim(dim, -1).reshape(-1, m)


def from_groups(g: torch.Tensor, shape: Sequence[int], dim: int) -> torch.Tensor:
    """The inverse of :func:`to_groups` for a tensor of ``shape``."""
    moved = list(shape)
    moved.append(moved.pop(dim))
    return g.reshape(moved).movedim(-1, dim).contiguous()


def keep_top_n(scores: torch.Tensor, alive: torch.Tensor, n: int) -> torch.Tensor:
    """[groups, m] bool: in each row the ``n`` alive entries of highest score (ties: the lower index); a row with
    fewer than ``n`` alive keeps them all. Alive entries rank before dead ones whatever their scores (-inf too)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    alive_first = torch.sort(alive.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, alive_first)
    keep = torch.zeros_like(alive)
    keep.scatter_(1, order[:, :n], True)
    return keep & alive


def select_nm(scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor] | None,
              params: Sequence[PrunableParam], n: int, pattern: Pattern, nan_policy: str = "error"
              ) -> dict[str, torch.Tensor]:
    """Masks keeping, in every group of ``pattern.m`` of every tensor, the ``n`` alive entries of highest score
    (N ≤ n ≤ M: the level of this step), nested in ``current``. NaN scores as in :func:`prunekit.select.select`."""
    if nan_policy not in NAN_POLICIES:
        raise PrunekitError(f"unknown nan_policy {nan_policy!r}: use 'error' or 'lowest'")
    out = {}
    for p in params:
        s = scores[p.name]
        cur = None if current is None else current.get(p.name)
        if cur is not None and tuple(cur.shape) != tuple(s.shape):
            raise PrunekitError(f"scores of {p.name!r} have shape {tuple(s.shape)}, its mask {tuple(cur.shape)}")
        alive = torch.ones_like(s, dtype=torch.bool) if cur is None else cur.to(s.device, torch.bool)
        d = input_dim(p)
        sg = to_groups(clean_scores(p.name, s, nan_policy).double(), d, pattern.m)
        keep = keep_top_n(sg, to_groups(alive, d, pattern.m), n)
        out[p.name] = from_groups(keep, s.shape, d)
    return out


# -------------------------------------------------------------------------------------------------- validation
def check_pattern(target, pattern, *, exact: bool = True, model: nn.Module | None = None,
                  **param_options) -> dict[str, int]:
    """Check that masks follow ``pattern`` (``"2:4"``): every group of M along each tensor's input dimension keeps
    exactly N (``exact=False``: at most N). Returns ``{tensor name: groups checked}``; raises a PrunekitError naming
    the first tensor and group that does not.

    ``target``: a :class:`~prunekit.masks.Masks`; a model (its prunable tensors, chosen by ``param_options`` as for
    :func:`prunekit.params.prunable_params`, with kept = nonzero: a kept weight that happens to be exactly 0 reads
    as pruned, so use ``exact=False`` or the Masks when that can happen); or a dict ``{param name: bool mask}``,
    whose layouts come from ``model=`` when given, else the PyTorch convention (input dimension 1, i.e. Linear /
    Conv weights).
    """
    pat = parse_pattern(pattern)
    if pat is None:
        raise PrunekitError("check_pattern needs a pattern such as '2:4'")
    if isinstance(target, Masks):
        items = [(p.name, input_dim(p), target[p.name]) for p in target.params]
    elif isinstance(target, nn.Module):
        items = [(p.name, input_dim(p), p.tensor.detach() != 0) for p in prunable_params(target, **param_options)]
    elif isinstance(target, Mapping):
        dims = {}
        if model is not None:
            named = dict(model.named_parameters())
            for name in target:
                mod_name, _, attr = name.rpartition(".")
                if name not in named:
                    raise PrunekitError(f"check_pattern: {name!r} is not a parameter of the model")
                dims[name] = input_dim(PrunableParam(name, mod_name, attr, model.get_submodule(mod_name)))
        items = [(name, dims.get(name, 1), m) for name, m in target.items()]
    else:
        raise PrunekitError(f"check_pattern takes Masks, a model or a dict of masks, got {type(target).__name__}")
    counts = {}
    for name, d, mask in items:
        mask = mask.to(torch.bool)
        if mask.dim() <= d or mask.shape[d] % pat.m:
            raise PrunekitError(f"check_pattern: {name!r} of shape {tuple(mask.shape)} has no input dimension {d} "
                                f"that is a multiple of {pat.m}")
        kept = to_groups(mask, d, pat.m).sum(1)
        bad = (kept != pat.n) if exact else (kept > pat.n)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise PrunekitError(f"{name!r} breaks pattern {pat}: {int(bad.sum())} of its {kept.numel()} groups keep "
                                f"{'a number other than' if exact else 'more than'} {pat.n} (group {i}, counted "
                                f"along dim {d}, keeps {int(kept[i])})")
        counts[name] = kept.numel()
    return counts
