"""Which tensors are prunable.

By default the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and of GPT-2's
``transformers.pytorch_utils.Conv1D``), in module registration order; for a ``transformers.PreTrainedModel`` (or a model holding
one) only those inside its encoder/decoder blocks (see :func:`hf_block_layers`). The choice
is made by module type, never by a substring of the parameter name (seed 000 skips names containing "bias",
"linear" or "bn" and so prunes ResNet shortcut-BN scales by accident; prunekit does not reproduce that).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import PrunekitError, closest

#: Module types whose weights are prunable by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def hf_conv1d() -> type | None:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (a Linear whose weight is stored (in, out)) when transformers
    is already imported (a model that has one imported it), else None; never imports transformers itself."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_prunable_type(module: nn.Module) -> bool:
    """A module whose ``weight`` is prunable by default: Conv1d/2d/3d, Linear, transformers' Conv1D."""
    conv1d = hf_conv1d()
    return isinstance(module, PRUNABLE_TYPES) or (conv1d is not None and isinstance(module, conv1d))


def require_transformers():
    """The ``transformers`` module, imported on first use; a :class:`PrunekitError` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise PrunekitError("this needs the Hugging Face transformers package: pip install 'prunekit[hf]'") from e
    return transformers


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    mod = sys.modules.get("transformers")
    cls = getattr(mod, "PreTrainedModel", None) if mod is not None else None
    return cls is not None and isinstance(model, cls)


def contains_hf_model(model: nn.Module) -> bool:
    """True when ``model`` is or holds a ``transformers.PreTrainedModel`` (e.g. :class:`prunekit.hf.TextClassifier`
    around an encoder): its default prunable tensors are then the block layers (:func:`hf_block_layers`)."""
    return any(is_hf_model(m) for m in model.modules())


def hf_block_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The default prunable layers of a transformers model: every Linear / Conv1D inside an item of an
    ``nn.ModuleList`` (the encoder/decoder blocks: ``bert.encoder.layer.*``, ``transformer.h.*``,
    ``vit.encoder.layer.*``). Embeddings, LayerNorm, the pooler and the task head (``classifier``, ``lm_head``,
    ``score``) lie outside the blocks and are not pruned."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    inside = tuple(f"{b}." if b else "" for b in blocks)
    return [(n, m) for n, m in model.named_modules()
            if is_prunable_type(m) and any(n.startswith(b) and n[len(b):].split(".")[0].isdigit() for b in inside)]


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """The llm-compressor convention: ``"re:<regex>"`` matches module names with ``re.match``; a plain string is an
    exact module name or a module class name (``"Linear"``, ``"LayerNorm"``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


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
    - ``targets``: module-name patterns (``"re:.*attention.*"`` a regular expression matched at the start of the
      name, a plain string an exact module name or class name such as ``"Linear"``); when given, the modules with
      a ``weight`` parameter that match one are pruned instead of the default ones.
    - ``ignore``: patterns of the same form; matching modules are never pruned (``ignore=["re:.*classifier",
      "LayerNorm"]``).
    """

    exclude: tuple[str, ...] = ()
    exclude_first: bool = False
    exclude_output: bool = False
    include_bias: bool = False
    modules: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None


def _check_patterns(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    """Every regex compiles; every plain string is a module name or class name of the model."""
    named = dict(model.named_modules())
    classes = {type(m).__name__ for m in named.values()}
    for pat in patterns:
        if not isinstance(pat, str):
            raise PrunekitError(f"'{what}' holds module-name patterns (strings), got {pat!r}")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise PrunekitError(f"{what} pattern {pat!r} is not a valid regular expression: {e}") from None
        elif pat not in named and pat not in classes:
            near = closest(pat, [n for n in named if n] + sorted(classes))
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
            raise PrunekitError(f"{what} entry {pat!r} is neither a module name nor a module class name of the "
                                f"model{hint}; prefix a regular expression with 're:'")


def _targeted(model: nn.Module, spec: ParamSpec) -> list[tuple[str, nn.Module]]:
    _check_patterns(model, spec.targets, "targets")
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(getattr(m, "weight", None), nn.Parameter)
              and any(matches(t, n, m) for t in spec.targets)]
    if not layers:
        raise PrunekitError(f"targets {list(spec.targets)} match no module with a weight parameter")
    return layers


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
    if spec.targets is not None:
        layers = _targeted(model, spec)
    elif contains_hf_model(model):
        layers = hf_block_layers(model)
    else:
        layers = [(n, m) for n, m in model.named_modules() if is_prunable_type(m)]
    if spec.ignore:
        _check_patterns(model, spec.ignore, "ignore")
        layers = [(n, m) for n, m in layers if not any(matches(i, n, m) for i in spec.ignore)]
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
    ``include_bias``, ``modules``, ``targets``, ``ignore``). Raises :class:`PrunekitError` when nothing is prunable.
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
            "exclusions; name modules explicitly with modules=[...] or targets=[...], or relax "
            "exclude/exclude_first/exclude_output/ignore"
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
        if k in ("exclude", "modules", "targets", "ignore") and v is not None:
            v = (v,) if isinstance(v, str) else tuple(v)
        kw[k] = v
    return ParamSpec(**kw)


def names(params: Iterable[PrunableParam]) -> list[str]:
    return [p.name for p in params]


def count(params: Sequence[PrunableParam]) -> int:
    """Total number of prunable entries."""
    return sum(p.tensor.numel() for p in params)
