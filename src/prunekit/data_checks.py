"""Checks of the data given to a data-dependent method, made before any scoring (first batch only, one small
forward): batches of (inputs, targets) tensors, finite inputs, a model whose forward takes one input that fits them,
class-index labels in range for the default loss, and a re-iterable when the method reads the data more than once.
Each problem is a :class:`~prunekit.errors.PrunekitError` that names it and the fix."""
from __future__ import annotations

import collections.abc
import inspect
import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batches import DictInputs, call, labelled_pair
from .errors import PrunekitError
from .modes import model_device, scoring_mode
from .registry import MethodInfo, default_loss


def dict_batch_methods() -> list[str]:
    """The registered data-dependent methods that read dict batches (``model(**batch)``,
    :attr:`~prunekit.registry.MethodInfo.dict_batches`). Every other built-in data-dependent method refuses them
    (see :func:`check_data`); a method registered outside prunekit receives them as they are."""
    from .registry import methods

    return [m.name for m in methods() if m.dict_batches and m.needs_data != "none"]


def _refuse_dicts(who: str, name: str) -> None:
    raise PrunekitError(
        f"{who} cannot read dict batches (model(**batch), Hugging Face style) yet: it unpacks (inputs, targets) "
        f"tensor pairs itself (its own batching, hooks or input-shape tracing); methods that take dict batches: "
        f"{', '.join(sorted(dict_batch_methods()))} and the data-free ones (magnitude, random, magni, globalmagni)")


def _describe(x) -> str:
    if isinstance(x, DictInputs):
        return "dict batch " + ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in x.tensors.items())
    return f"inputs of shape {_shape(x)}, {x.dtype}"


def _batch_inputs(batch) -> torch.Tensor | DictInputs | None:
    if isinstance(batch, collections.abc.Mapping) and all(isinstance(v, torch.Tensor) for v in batch.values()):
        return DictInputs(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    return None


class CheckedData:
    """The data after :func:`check_data`. The first pass (the first ``iter()``, i.e. when the method starts reading
    its data) reads the first batch, validates it with ``validate(batch)``, then replays it and continues the same
    iterator: no extra pass, no extra draw of a shuffling loader, nothing read when a method refuses earlier (e.g.
    a memory planner). Later passes iterate the original data again; for a one-shot iterator (a generator,
    ``iter(loader)``) a second pass is an error."""

    def __init__(self, data, one_shot: bool, who: str, validate: Callable[[object], None]):
        self.data, self.one_shot, self.who, self._validate = data, one_shot, who, validate
        self._started = False

    def __iter__(self):
        if self._started:
            if self.one_shot:
                raise PrunekitError(_one_shot_message(self.who, "reads the data more than once"))
            return iter(self.data)
        self._started = True
        try:
            it = iter(self.data)
        except TypeError:
            raise PrunekitError(f"data must be an iterable of (inputs, targets) batches (a DataLoader works), got "
                                f"{type(self.data).__name__}") from None
        try:
            first = next(it)
        except StopIteration:
            if self.one_shot:
                raise PrunekitError("data is an exhausted iterator (a generator or iter(loader) that was already "
                                    "read to its end): pass a re-iterable instead, e.g. the DataLoader itself or a "
                                    "list of (inputs, targets) batches") from None
            raise PrunekitError(f"data yielded no batch, so there is no example to score: {self.who} needs at "
                                "least one (inputs, targets) batch") from None
        self._validate(first)
        return itertools.chain([first], it)


def _one_shot_message(who: str, why: str) -> str:
    return (f"data is a one-shot iterator (a generator or iter(loader)) but {who} {why}: pass a re-iterable "
            "instead, e.g. the DataLoader itself or a list of (inputs, targets) batches")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _first_layer_check(model: nn.Module, x: torch.Tensor):
    """Forward pre-hooks that check the input of the first Conv/Linear the forward reaches against the data."""
    names = {m: n for n, m in model.named_modules()}
    seen = []

    def pre(mod, args):
        if seen:
            return
        seen.append(mod)
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if inp is None or any(isinstance(p, nn.parameter.UninitializedParameter) for p in mod.parameters()):
            return
        name = names.get(mod, type(mod).__name__)
        if isinstance(mod, nn.modules.conv._ConvNd):
            d = len(mod.kernel_size)
            if inp.dim() in (d + 1, d + 2) and inp.shape[-d - 1] != mod.in_channels:
                c = inp.shape[-d - 1]
                raise PrunekitError(
                    f"the model expects {mod.in_channels} input channels (its first layer {name!r} is {mod}) but "
                    f"the data has {c} channels (inputs of shape {_shape(x)}): feed {mod.in_channels}-channel inputs "
                    f"or build the model for {c} channels (e.g. prunekit.models.get_model(name, input_shape=("
                    f"{c}, ...)))")
        elif isinstance(mod, nn.Linear) and inp.dim() >= 1 and inp.shape[-1] != mod.in_features:
            raise PrunekitError(
                f"the model's first layer {name!r} ({mod}) expects {mod.in_features} input features but receives "
                f"{inp.shape[-1]} from inputs of shape {_shape(x)}: the data does not fit this model (another "
                "dataset or input size?)")

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return hooks


def _check_arity(model: nn.Module) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in ps):
        return
    required = [p.name for p in ps if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise PrunekitError(
            f"{type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}) but data batches "
            "give one (inputs, targets pairs): wrap the model in a module whose forward(x) takes a single input "
            "(packing the other inputs into x or holding them as attributes)")


def _check_labels(out: torch.Tensor, x: torch.Tensor, y) -> None:
    """Labels that the default cross-entropy accepts for outputs ``out``: class indices (int64 or uint8) of shape
    [n, *positions] in 0..C-1 (or -100, its ignore_index), or class probabilities of the outputs' shape."""
    if not isinstance(y, torch.Tensor):
        raise PrunekitError(f"labels (targets) must be a tensor, got {type(y).__name__}")
    n = x.shape[0]
    if out.dim() < 2:
        return  # not a [n, classes] output: the loss decides
    classes = out.shape[1]
    want = (n,) + tuple(out.shape[2:])
    fix_loss = " (or pass loss= for other targets)"
    if y.is_floating_point():
        if tuple(y.shape) == (n,) + tuple(out.shape[1:]):
            if not bool(torch.isfinite(y).all()):
                raise PrunekitError("the first data batch has NaN or infinite label probabilities: the targets must "
                                    "be finite")
            return  # class probabilities
        raise PrunekitError(
            f"labels are floating point ({y.dtype}, shape {_shape(y)}) but the default cross-entropy needs integer "
            f"class indices of shape {want}: pass y.long(){fix_loss}")
    if y.dtype == torch.bool or y.is_complex():
        raise PrunekitError(f"labels have dtype {y.dtype}: the default cross-entropy needs int64 class indices "
                            f"of shape {want}: pass y.long(){fix_loss}")
    if tuple(y.shape) != want:
        hint = ""
        if y.dim() == len(want) + 1 and y.shape[1] == 1:
            hint = "; use y.squeeze(1)"
        elif tuple(y.shape) == (n,) + tuple(out.shape[1:]):
            hint = "; they look one-hot: use y.argmax(1)"
        raise PrunekitError(
            f"labels have shape {_shape(y)} but the model's outputs {(n,) + tuple(out.shape[1:])} need class "
            f"indices of shape "
            f"{want}{hint}{fix_loss}")
    if y.dtype not in (torch.int64, torch.uint8):
        raise PrunekitError(f"labels have dtype {y.dtype} but the default cross-entropy needs int64 class indices: "
                            "pass y.long()")
    if y.numel():
        valid = y[y != -100] if y.dtype == torch.int64 else y
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= classes:
                raise PrunekitError(
                    f"labels range from {lo} to {hi} but the model has {classes} outputs: labels must be class "
                    f"indices in 0..{classes - 1} (a model built for more classes, e.g. "
                    f"prunekit.models.get_model(name, num_classes={hi + 1}), or labels for this one)")


def check_data(model: nn.Module, data, info: MethodInfo, rounds: int = 1, loss: Callable | None = None):
    """Validate the scoring data of a data-dependent method, and return what to score on (a :class:`CheckedData`).

    At once, without reading the data: ``data`` must be an iterable of batches (not a tensor, not one
    ``(inputs, targets)`` pair), a one-shot iterator (a generator, ``iter(loader)``) is refused when the method
    scores in several rounds, and the model's forward must take a single input. When the method first reads the
    data, before any batch is scored: the first batch only, and one forward of its first few samples (eval mode,
    no gradient; modes, buffers and the RNG restored): batches of tensors, finite inputs, a first layer whose
    channels / features fit the inputs, and for the default cross-entropy class-index labels in range. An
    exhausted iterator and a second pass over a one-shot iterator are errors too.
    """
    who = f"method {info.name!r}"
    if data is None or info.needs_data not in ("inputs", "labels") or isinstance(data, CheckedData):
        return data
    if isinstance(data, torch.Tensor):
        raise PrunekitError("data is a single tensor: pass an iterable of (inputs, targets) batches, e.g. "
                            "[(x, y)] or a DataLoader")
    if (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
            and data[0].dim() > 1 and data[1].dim() > 0 and data[0].shape[0] == data[1].shape[0]):
        raise PrunekitError("data looks like one (inputs, targets) batch, not an iterable of batches: pass [(x, y)] "
                            "(a list with one batch) or a DataLoader")
    if isinstance(data, collections.abc.Mapping):
        raise PrunekitError("data is a dict: it looks like one dict batch, not an iterable of batches: pass [batch] "
                            "(a list with one batch) or a DataLoader")
    if not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise PrunekitError(f"data must be an iterable of (inputs, targets) batches (a DataLoader works), got "
                            f"{type(data).__name__}")
    one_shot = isinstance(data, collections.abc.Iterator)
    if one_shot and rounds > 1:
        raise PrunekitError(_one_shot_message(who, f"scores in {rounds} rounds, each of which reads the data"))
    _check_arity(model)
    labels = info.needs_data == "labels"
    builtin = (info.score is not None and getattr(info.score, "__module__", "").startswith("prunekit.")
               and not info.dict_batches)

    def validate(batch) -> None:
        if builtin and isinstance(batch, collections.abc.Mapping):
            _refuse_dicts(who, info.name)
        _check_batch(model, batch, labels, loss)

    return CheckedData(data, one_shot, who, validate)


def _check_batch(model: nn.Module, first, labels: bool, loss: Callable | None) -> None:
    """The checks of :func:`check_data` on the first batch."""
    x = y = None
    if labels:
        x, y = labelled_pair(first)
    else:
        x = _batch_inputs(first)
        if x is None:
            raise PrunekitError(f"each data batch must be an (inputs, targets) pair or an inputs tensor; got "
                                f"{type(first).__name__}")
        if x.dim() == 0:
            raise PrunekitError(f"inputs must have a batch dimension, got a tensor of shape {_shape(x)}")
    for t in (x.tensors.values() if isinstance(x, DictInputs) else [x]):
        _check_finite(t)
    if x.shape[0] > 0:
        _check_forward(model, x, y if labels and _is_default_loss(loss) else None)


def _check_finite(x: torch.Tensor) -> None:
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_nan = int(torch.isnan(x).sum())
            raise PrunekitError(
                f"the data batches contain non-finite inputs: the first batch (shape {_shape(x)}) has {n_nan} NaN "
                f"and {int(bad.sum()) - n_nan} infinite values; clean the data (e.g. check the normalization: a zero "
                "std gives NaN) before scoring")


def _is_default_loss(loss) -> bool:
    return loss is None or loss is default_loss or loss is F.cross_entropy


def _check_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, samples: int = 4) -> None:
    """One forward of the first ``samples`` inputs in eval mode without gradients; the model is left unchanged."""
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    if isinstance(x, DictInputs):
        xs = x[:samples].to(model_device(model), fdtype)
    else:
        xs = x[:samples].to(model_device(model))
        if fdtype is not None and xs.is_floating_point() and xs.dtype != fdtype:
            xs = xs.to(fdtype)
    hooks = _first_layer_check(model, x)
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            out = call(model, xs)
    except PrunekitError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except TypeError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "positional argument" in msg or "required" in msg:
            raise PrunekitError(f"{type(model).__name__}.forward cannot be called with one input, as data batches "
                                f"give it ({msg}): wrap the model in a module whose forward(x) takes a single "
                                "input") from e
        raise PrunekitError(f"the model's forward fails on the first data batch ({_describe(x)}): {msg}") from e
    except Exception as e:  # noqa: BLE001 - reported as a user error naming the data, with the cause chained
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunekitError(f"the model's forward fails on the first data batch ({_describe(x)}): {msg}") from e
    finally:
        for h in hooks:
            h.remove()
    if y is not None and not isinstance(out, torch.Tensor) and getattr(out, "loss", None) is None:
        out = getattr(out, "logits", None)  # a transformers output: the default loss takes its logits
    if y is not None and isinstance(out, torch.Tensor):
        _check_labels(out, x, y)
