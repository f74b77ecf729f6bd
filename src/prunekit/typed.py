"""Typed options: dataclasses built from plain dicts with errors that name the bad field and the allowed values.

Used by method options (``pk.prune(model, "fts", damp=1e-4)``) and by experiment configs alike. Supported field
types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]``, ``Any`` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError, closest


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _where(path: str) -> str:
    return f"field {path!r}" if path else "value"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str, error=ConfigError) -> Any:
    """Check ``value`` against type ``tp`` and convert it (ints to floats, lists to tuples, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        near = closest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise error(f"{_where(path)}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        shaped = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(shaped) == 1:  # a mapping can only be that dataclass: say what is wrong
            return convert(shaped[0], value, path, error)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, path, error)
            except error as e:
                errors.append(e)
        raise error(f"{_where(path)}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise error(f"{_where(path)}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path, error)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise error(f"{_where(path)}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [convert(item, v, f"{path}[{i}]", error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{_where(path)}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): convert(vt, v, f"{path}.{k}", error) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{_where(path)}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise error(f"{_where(path)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise error(f"{_where(path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise error(f"{_where(path)}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise error(f"{_where(path)}: expected {_describe(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, path: str = "", error=ConfigError):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ``error`` naming the field."""
    if not isinstance(data, dict):
        raise error(f"{_where(path)}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    th = hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            near = closest(str(key), fields)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise error(f"unknown {_where(full)}{hint}; valid fields here: {', '.join(fields)}")
        kwargs[key] = convert(th[key], value, full, error)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            where = f"{path}.{missing[0]}" if path else missing[0]
            raise error(f"missing required {_where(where)}") from None
        raise error(f"{_where(path)}: {e}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path, error)
    return obj


def to_dict(obj) -> Any:
    """Plain data (dicts, lists, scalars) from a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
