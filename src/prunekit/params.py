"""Which tensors are prunable.

By default the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear``, in module registration order. The choice
is made by module type, never by a substring of the parameter name (seed 000 skips names containing "bias",
"linear" or "bn" and so prunes ResNet shortcut-BN scales by accident; prunekit does not reproduce that).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import PrunekitError, closest

#: Module types whose weights are prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PrunableParam:
    """One prunable tensor: ``name`` is the parameter's full name (``"features.0.weight"``)."""

    name: str
    module_name: str
    attr: str
    module: nn.Module = field(repr=False, compare=False)

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass(frozen=True)
class ParamSpec:
    """Options that decide which tensors are prunable.

    - ``exclude``: module names never pruned.
    - ``exclude_first`` / ``exclude_output``: skip the first / last prunable layer (registration order, which for
      every built-in model equals forward order).
    - ``include_bias``: biases of prunable layers are prunable too.
    - ``modules``: explicit module names; when given, only these are pruned (any module with a ``weight``).
    """

    exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_output: bool = False
    include_bias: bool = False
    modules: tuple[str, ...] | None = None


def _layers(model: nn.Module, spec: ParamSpec) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if spec.modules is not None:
        missing = [m for m in spec.modules if m not in named]
        if missing:
            near = closest(missing[0], [n for n in named if n])
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
            raise PrunekitError(f"module {missing[0]!r} named in 'modules' is not in the model{hint}")
        layers = [(m, named[m]) for m in spec.modules]
        bad = [m for m, mod in layers if not isinstance(getattr(mod, "weight", None), nn.Parameter)]
        if bad:
            raise PrunekitError(f"module {bad[0]!r} named in 'modules' has no weight parameter to prune")
        return layers
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    unknown = [e for e in spec.exclude if e not in named]
    if unknown:
        near = closest(unknown[0], [n for n, _ in layers])
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise PrunekitError(f"module {unknown[0]!r} named in 'exclude' is not in the model{hint}")
    if spec.exclude_first and layers:
        layers = layers[1:]
    if spec.exclude_output and layers:
        layers = layers[:-1]
    return [(n, m) for n, m in layers if n not in spec.exclude]


def prunable_params(model: nn.Module, spec: ParamSpec | None = None, **options) -> list[PrunableParam]:
    """The prunable tensors of ``model`` in registration order.

    ``options`` are the fields of :class:`ParamSpec` (``exclude``, ``exclude_first``, ``exclude_output``,
    ``include_bias``, ``modules``). Raises :class:`PrunekitError` when nothing is prunable.
    """
    spec = spec_from(spec, **options)
    out: list[PrunableParam] = []
    for mname, module in _layers(model, spec):
        attrs = ["weight"] + (["bias"] if spec.include_bias else [])
        for attr in attrs:
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter):
                full = f"{mname}.{attr}" if mname else attr
                out.append(PrunableParam(full, mname, attr, module))
    if not out:
        raise PrunekitError(
            f"{type(model).__name__} has nothing prunable: no Conv1d/2d/3d or Linear weights remain after the "
            "exclusions; name modules explicitly with modules=[...] or relax exclude/exclude_first/exclude_output"
        )
    return out


def spec_from(spec: ParamSpec | None = None, **options) -> ParamSpec:
    """A :class:`ParamSpec` from an existing one and/or keyword options (unknown keys are an error)."""
    valid = set(ParamSpec.__dataclass_fields__)
    bad = [k for k in options if k not in valid]
    if bad:
        raise PrunekitError(f"unknown prunable-parameter option {bad[0]!r}; valid options: {', '.join(sorted(valid))}")
    base = spec or ParamSpec()
    kw = {k: getattr(base, k) for k in valid}
    for k, v in options.items():
        if k in ("exclude", "modules") and v is not None:
            v = (v,) if isinstance(v, str) else tuple(v)
        kw[k] = v
    return ParamSpec(**kw)


def names(params: Iterable[PrunableParam]) -> list[str]:
    return [p.name for p in params]


def count(params: Sequence[PrunableParam]) -> int:
    """Total number of prunable entries."""
    return sum(p.tensor.numel() for p in params)
