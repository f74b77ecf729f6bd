"""Masks: one object owns the boolean masks of a model's prunable tensors.

It applies them, keeps pruned weights exactly zero through training, reports per-layer and global sparsity, and
saves/loads with the model.

Keeping pruned weights at zero is done with optimizer hooks (see :meth:`Masks.attach`):

- before each step the gradients of pruned entries are zeroed. On :meth:`Masks.attach` and on every mask change the
  optimizer's state tensors (momentum buffers, Adam moments) are zeroed at pruned entries too. From then on, for
  the optimizers in :data:`ZERO_PRESERVING`, a pruned entry sees gradient 0, weight-decay term ``wd * 0 = 0`` and
  state 0, so its update is exactly 0 (Adam: ``0 / (sqrt(0) + eps) = 0``; AdamW: ``0 * (1 - lr * wd) = 0``);
- after each step the weights are multiplied by the mask, for every other optimizer (custom rules, optimizers that
  move weights without a gradient). ``post_step="always"`` forces it for the built-in ones too.

Hooks use ``torch._foreach_mul_`` over the tensors that actually have pruned entries: one fused elementwise pass per
step for the built-in optimizers (see ``bench/bench_masked_step.py`` for the measured overhead).
"""
from __future__ import annotations

import os
import pickle
import weakref
import zipfile
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from .errors import PrunekitError
from .io import atomic_torch_save
from .params import ParamSpec, PrunableParam, prunable_params


@dataclass(frozen=True)
class LayerStat:
    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


class ExistingZerosWarning(UserWarning):
    """``pk.prune`` / ``pk.score`` without ``masks=`` found exact zeros in the prunable tensors and treats them as
    pruned (:func:`prunekit.prune.starting_masks`); passing ``masks=`` chooses the starting masks instead."""


#: Optimizers (exact types) whose update of an entry with zero weight, zero gradient and zero state is exactly 0.
ZERO_PRESERVING: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
)


class Masks:
    """Boolean masks (``True`` = kept) for the prunable tensors of ``model``.

    ``Masks(model)`` starts all-ones over the default prunable tensors; pass ``params`` (from
    :func:`prunekit.params.prunable_params`) or ``spec`` to choose other tensors, and ``masks`` to start from given
    masks. Masks live on the device of their tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[PrunableParam] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        spec: ParamSpec | None = None,
    ):
        self.model = model
        self.params = list(params) if params is not None else prunable_params(model, spec)
        self._by_name = {p.name: p for p in self.params}
        self._masks: dict[str, torch.Tensor] = {
            p.name: torch.ones_like(p.tensor, dtype=torch.bool) for p in self.params
        }
        self._float: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._optimizers: list[weakref.ref] = []
        if masks is not None:
            self.set(masks)

    # ----------------------------------------------------------------------------------------------------- access
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def items(self):
        return self._masks.items()

    def names(self) -> list[str]:
        return list(self._masks)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """A shallow copy ``{param name: bool mask}``."""
        return dict(self._masks)

    # ----------------------------------------------------------------------------------------------------- update
    def set(self, masks: Mapping[str, torch.Tensor], nested: bool = False) -> "Masks":
        """Replace masks (a subset of names is fine) and apply them to the model.

        With ``nested=True`` it is an error for a new mask to revive an entry the current mask prunes.
        """
        for name, m in masks.items():
            if name not in self._masks:
                raise PrunekitError(f"mask for {name!r} does not match a prunable tensor; known: {', '.join(self._masks)}")
            cur = self._masks[name]
            if tuple(m.shape) != tuple(cur.shape):
                raise PrunekitError(f"mask for {name!r} has shape {tuple(m.shape)}, the tensor has {tuple(cur.shape)}")
            given = m
            m = m.to(device=cur.device, dtype=torch.bool)
            if nested and bool((m & ~cur).any()):
                raise PrunekitError(f"mask for {name!r} revives pruned entries, but masks must be nested")
            self._masks[name] = m.clone() if m is given else m  # never the caller's tensor itself
        self._float = None
        self.apply()
        for opt in self.optimizers():
            self.zero_optimizer_state(opt)
        return self

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned entries of every prunable tensor."""
        for p in self.params:
            t = p.tensor
            m = self._masks[p.name]
            if m.device != t.device:  # the model moved (e.g. .to(cuda)) after the masks were made
                self._masks[p.name] = m = m.to(t.device)
                self._float = None
            t.mul_(m)

    def _active(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(tensors, float masks) for the prunable tensors that have at least one pruned entry (cached)."""
        if self._float is not None and self._float[0] and self._float[0][0].device != self._float[1][0].device:
            self.apply()  # the model moved to another device since the masks were cached
        if self._float is None:
            act = [(self._by_name[n].tensor, m.to(self._by_name[n].tensor.dtype))
                   for n, m in self._masks.items() if not bool(m.all())]
            self._float = ([t for t, _ in act], [m for _, m in act])
        return self._float

    # -------------------------------------------------------------------------------------------------- optimizer
    def attach(self, optimizer: torch.optim.Optimizer, post_step: str = "auto") -> "MaskHandle":
        """Keep pruned weights exactly zero through ``optimizer.step()``; returns a handle with ``remove()``.

        The masks are applied once on attach (weights that moved since the masks were made, e.g. by training
        without them, are zeroed again) and the optimizer's state is zeroed at pruned entries. An optimizer that
        holds none of the masked tensors (one built over another model) is an error.

        ``post_step``: ``"auto"`` re-masks the weights after each step unless the optimizer's type is in
        :data:`ZERO_PRESERVING` (where masked gradients and zeroed state already give a zero update);
        ``"always"`` or ``"never"`` force the choice.
        """
        if post_step not in ("auto", "always", "never"):
            raise PrunekitError(f"post_step must be 'auto', 'always' or 'never', got {post_step!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PrunekitError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(t) for g in optimizer.param_groups for t in g["params"]}
        if self.params and not any(id(p.tensor) in held for p in self.params):
            raise PrunekitError(
                f"the optimizer holds none of the {len(self.params)} masked tensors (e.g. {self.params[0].name!r} of "
                f"{type(self.model).__name__}): build it over the pruned model's parameters, e.g. "
                "torch.optim.SGD(model.parameters(), ...), then attach")
        self.apply()
        self.zero_optimizer_state(optimizer)
        hooks = [optimizer.register_step_pre_hook(lambda *_: self.mask_grads())]
        if post_step == "always" or (post_step == "auto" and type(optimizer) not in ZERO_PRESERVING):
            hooks.append(optimizer.register_step_post_hook(lambda *_: self.enforce()))
        self._optimizers.append(weakref.ref(optimizer))
        return MaskHandle(self, optimizer, tuple(hooks))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        alive = [r() for r in self._optimizers]
        return [o for o in alive if o is not None]

    @torch.no_grad()
    def mask_grads(self) -> None:
        tensors, fmasks = self._active()
        grads = [t.grad for t in tensors]
        if any(g is None for g in grads):
            pairs = [(g, m) for g, m in zip(grads, fmasks) if g is not None]
            grads, fmasks = [g for g, _ in pairs], [m for _, m in pairs]
        if grads:
            torch._foreach_mul_(grads, fmasks)

    @torch.no_grad()
    def enforce(self) -> None:
        """θ ← m ⊙ θ for every tensor with pruned entries (called after each optimizer step)."""
        tensors, fmasks = self._active()
        if tensors:
            torch._foreach_mul_(tensors, fmasks)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero pruned entries of every state tensor (momentum, Adam moments) the optimizer keeps for our tensors."""
        for p in self.params:
            t = p.tensor
            state = optimizer.state.get(t)
            if not state:
                continue
            m = self._masks[p.name]
            for value in state.values():
                if torch.is_tensor(value) and value.shape == t.shape:
                    value.mul_(m.to(value.dtype))

    # ------------------------------------------------------------------------------------------------------ stats
    def layer_stats(self) -> list[LayerStat]:
        return [
            LayerStat(n, tuple(m.shape), int(torch.count_nonzero(m)), m.numel()) for n, m in self._masks.items()
        ]

    def kept(self) -> int:
        return sum(int(torch.count_nonzero(m)) for m in self._masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def density(self) -> float:
        return self.kept() / self.total()

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def collapsed(self) -> list[str]:
        """Prunable tensors left with no kept entry (layer collapse)."""
        return [n for n, m in self._masks.items() if not bool(m.any())]

    def summary(self) -> str:
        """Per-layer table: kept / total / density, with a global row."""
        rows = [(s.name, "x".join(map(str, s.shape)), s.kept, s.total, s.density) for s in self.layer_stats()]
        rows.append(("(global)", "", self.kept(), self.total(), self.density()))
        w = max(len(r[0]) for r in rows)
        ws = max(5, max(len(r[1]) for r in rows))
        lines = [f"{'layer':<{w}}  {'shape':<{ws}}  {'kept':>10}  {'total':>10}  {'density':>8}"]
        lines.append("-" * len(lines[0]))
        for i, (n, sh, k, t, d) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            flag = "  collapsed" if k == 0 and n != "(global)" else ""
            lines.append(f"{n:<{w}}  {sh:<{ws}}  {k:>10,}  {t:>10,}  {d:>8.4f}{flag}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, density={self.density():.4f})"

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{param name: bool mask}`` on the CPU."""
        return {n: m.detach().cpu().clone() for n, m in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> "Masks":
        missing = [n for n in self._masks if n not in state]
        if missing:
            raise PrunekitError(f"saved masks lack {missing[0]!r}: they were made for another model or other options")
        return self.set(state)

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, torch.Tensor]) -> "Masks":
        """Masks for exactly the tensors named in ``state`` (which may differ from the default prunable set)."""
        named = dict(model.named_modules())
        params = []
        for full in state:
            mname, _, attr = full.rpartition(".")
            if mname not in named or not isinstance(getattr(named[mname], attr, None), nn.Parameter):
                raise PrunekitError(f"saved mask {full!r} names no parameter of {type(model).__name__}")
            params.append(PrunableParam(full, mname, attr, named[mname]))
        return cls(model, params=params, masks=state)

    @classmethod
    def from_zeros(cls, model: nn.Module, spec: ParamSpec | None = None) -> "Masks":
        """Masks that keep exactly the nonzero entries of the prunable tensors."""
        params = prunable_params(model, spec)
        return cls(model, params=params, masks={p.name: p.tensor.detach() != 0 for p in params})


class MaskHandle:
    """Returned by :meth:`Masks.attach`; ``remove()`` detaches the optimizer hooks."""

    def __init__(self, masks: Masks, optimizer: torch.optim.Optimizer, hooks):
        self._masks, self._opt, self._hooks = masks, weakref.ref(optimizer), hooks

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        opt = self._opt()
        self._masks._optimizers = [r for r in self._masks._optimizers if r() is not None and r() is not opt]


def save(path, model: nn.Module, masks: Masks | None = None, **meta) -> None:
    """Save a (pruned) model: its state_dict, its masks and any metadata, written atomically."""
    atomic_torch_save(
        {"model": model.state_dict(), "masks": masks.state_dict() if masks is not None else None, "meta": meta}, path
    )


def load(path, model: nn.Module) -> Masks | None:
    """Load a model saved by :func:`save` into ``model`` (a freshly built one); returns its masks (or None)."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"pk.load needs the model to load into (a freshly built nn.Module, e.g. from "
                            f"prunekit.models.get_model), got {type(model).__name__}")
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise PrunekitError(f"{path} does not exist: pass the path of a file written by prunekit.save")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, KeyError,
            AttributeError, UnicodeDecodeError, IndexError, TypeError) as e:
        # torch's own message suggests turning weights-only loading off (running code from the file): never that
        raise PrunekitError(f"{path} is not a prunekit model file or is damaged ({type(e).__name__} while reading "
                            "it): load only files written by prunekit.save, and save the model again if it was "
                            "truncated") from None
    if not isinstance(blob, dict) or "model" not in blob:
        raise PrunekitError(f"{path} is not a prunekit model file (expected one written by prunekit.save)")
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PrunekitError(f"{path} does not fit {type(model).__name__}: {first}") from None
    if blob.get("masks") is None:
        return None
    return Masks.from_state_dict(model, blob["masks"])
