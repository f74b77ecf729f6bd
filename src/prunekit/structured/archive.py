"""Save and reload shrunk models without the code of their original class.

A shrunk model has non-standard widths, so its class's constructor can no longer rebuild it. :func:`save_shrunk`
stores instead what is needed to rebuild it from ``torch`` alone:

- the ``torch.fx`` graph of its forward pass as a list of nodes (op, target, arguments referencing earlier nodes
  by name); function targets are stored by qualified name and must come from ``torch``, ``torch.nn.functional``,
  ``operator`` or ``math``; method targets must be public ``torch.Tensor`` methods;
- for every module the graph calls, its type (from an allow-list of ``torch.nn`` types) and the constructor
  arguments read back from its attributes;
- tensors the graph reads directly (``get_attr``), the ``state_dict``, the training flag and ``input_shape``.

Everything is written with ``torch.save`` as plain containers (dicts, lists, tuples, strings, numbers, tensors),
atomically, and read with ``torch.load(weights_only=True)``: loading never unpickles arbitrary objects and never
imports the original model's code. :func:`load_shrunk` returns a :class:`torch.fx.GraphModule`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..checkpoint import load_plain
from ..errors import PrunekitError
from ..io import atomic_torch_save
from .archive_rules import (MODULE_TYPES, SCALARS, allowed_function, resolve_function,
                            validate_archive)
from .fx_trace import inputs_tuple, trace

__all__ = ["save_shrunk", "load_shrunk", "export_onnx", "FORMAT", "MODULE_TYPES"]

FORMAT = "prunekit.shrunk"
VERSION = 1


# ----------------------------------------------------------------------------------------------- encoding
def _encode(value: Any, where: str) -> Any:
    """Plain-container form of an fx argument (nodes by name; slices, dtypes, devices tagged)."""
    if isinstance(value, torch.fx.Node):
        return {"__node__": value.name}
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, torch.Size):
        return {"__tuple__": [int(v) for v in value]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise PrunekitError(f"cannot archive {where}: a dict argument with non-string keys")
        return {"__dict__": [[k, _encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"__slice__": [_encode(value.start, where), _encode(value.stop, where), _encode(value.step, where)]}
    if value is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, torch.memory_format):
        return {"__memory_format__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"__layout__": str(value).removeprefix("torch.")}
    raise PrunekitError(f"cannot archive {where}: argument of type {type(value).__name__} ({value!r})")


def _decode(value: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "__node__" in value:
        return nodes[value["__node__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, nodes) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, nodes) for k, v in value["__dict__"]}
    if "__slice__" in value:
        return slice(*(_decode(v, nodes) for v in value["__slice__"]))
    if "__ellipsis__" in value:
        return Ellipsis
    for tag, kind in (("__dtype__", torch.dtype), ("__memory_format__", torch.memory_format),
                      ("__layout__", torch.layout)):
        if tag in value:
            obj = getattr(torch, value[tag], None)
            if not isinstance(obj, kind):
                raise PrunekitError(f"archive names an unknown torch {kind.__name__} {value[tag]!r}")
            return obj
    if "__device__" in value:
        return torch.device(value["__device__"])
    raise PrunekitError(f"archive holds an unknown argument encoding {sorted(value)}")


def _function_name(fn: Any) -> str:
    """``module:name`` of an allowed function target (checked to resolve back to the same object)."""
    name = getattr(fn, "__name__", None)
    candidates = []
    mod = getattr(fn, "__module__", None)
    if mod == "torch._C._VariableFunctions" or (mod is None and name):
        mod = "torch"
    if mod and name:
        candidates.append((mod, name))
    candidates += [("torch", name), ("torch.nn.functional", name), ("operator", name)]
    for mod, name in candidates:
        if name and allowed_function(mod, name) and resolve_function(mod, name) is fn:
            return f"{mod}:{name}"
    raise PrunekitError(f"cannot archive a call to {fn!r}: only functions of torch, torch.nn.functional, operator "
                        "and math can be stored")


def _module_spec(name: str, mod: nn.Module) -> dict[str, Any]:
    tname = type(mod).__name__
    if tname not in MODULE_TYPES or getattr(nn, tname, None) is not type(mod):
        raise PrunekitError(f"cannot archive module {name!r} of type {type(mod).__module__}.{tname}: only torch.nn "
                            f"types in prunekit.structured.archive.MODULE_TYPES are supported")
    args: dict[str, Any] = {}
    for pname, p in inspect.signature(type(mod).__init__).parameters.items():
        if pname in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(mod, pname):
            if p.default is inspect.Parameter.empty:
                raise PrunekitError(f"cannot archive module {name!r} ({tname}): no attribute for argument {pname!r}")
            continue
        value = getattr(mod, pname)
        if pname == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        elif isinstance(value, torch.Tensor):
            continue  # restored from the state_dict
        args[pname] = _encode(value, f"module {name!r} ({tname}) argument {pname!r}")
    return {"name": name, "type": tname, "args": args}


def _set_path(root: nn.Module, path: str, value: Any, kind: str = "module", requires_grad: bool = True) -> None:
    *parents, last = path.split(".")
    obj = root
    for part in parents:
        child = getattr(obj, part, None) if part in obj._modules else None
        if child is None:
            child = nn.Module()
            obj.add_module(part, child)
        obj = child
    if kind == "module":
        obj.add_module(last, value)
    elif hasattr(obj, last):
        return  # a parameter / buffer of a rebuilt module: the state_dict fills it
    elif kind == "parameter":
        obj.register_parameter(last, nn.Parameter(value, requires_grad=requires_grad))
    elif kind == "buffer":
        obj.register_buffer(last, value)
    else:
        setattr(obj, last, value)


# ----------------------------------------------------------------------------------------------- save / load
def _graph_module(model: nn.Module) -> torch.fx.GraphModule:
    return model if isinstance(model, torch.fx.GraphModule) else trace(model)


def save_shrunk(path: str | os.PathLike, model: nn.Module) -> Path:
    """Write ``model`` (any ``torch.fx``-traceable model of allow-listed torch.nn leaf modules) to ``path``.

    Guarantees: the file is written atomically (a temporary file renamed into place), holds only plain
    containers and tensors, and :func:`load_shrunk` rebuilds from it, without the model's class, a GraphModule
    whose outputs are bit-identical to ``model``'s (same parameters, buffers, dtypes and operations). Raises
    :class:`PrunekitError` naming the module or call that cannot be stored.
    """
    gm = _graph_module(model)
    named = dict(gm.named_modules())
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    order = [n for n, _ in model.named_modules() if n in called] + called
    specs, seen = [], set()
    for name in order:
        if name not in seen:
            seen.add(name)
            specs.append(_module_spec(name, named[name]))
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    attrs, nodes = [], []
    for node in gm.graph.nodes:
        where = f"node {node.name!r} ({node.op} {node.target})"
        target: Any = node.target
        if node.op == "call_function":
            target = _function_name(node.target)
        elif node.op == "call_method":
            if node.target.startswith("_") or not hasattr(torch.Tensor, node.target):
                raise PrunekitError(f"cannot archive {where}: not a public torch.Tensor method")
        elif node.op == "get_attr":
            if node.target in params:
                kind, value = "parameter", params[node.target]
            elif node.target in buffers:
                kind, value = "buffer", buffers[node.target]
            else:
                kind, value = "constant", gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                if not isinstance(value, torch.Tensor):
                    raise PrunekitError(f"cannot archive {where}: attribute of type {type(value).__name__}")
            attrs.append({"target": node.target, "kind": kind, "tensor": value.detach().clone(),
                          "requires_grad": bool(value.requires_grad)})
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args, where), "kwargs": _encode(node.kwargs, where)})
    shape = getattr(model, "input_shape", None)
    blob = {
        "format": FORMAT, "version": VERSION, "torch": str(torch.__version__), "class": type(model).__name__,
        "modules": specs, "nodes": nodes, "attrs": attrs, "training": bool(model.training),
        "input_shape": tuple(int(s) for s in shape) if shape is not None else None,
        "state_dict": {k: v.detach().clone() for k, v in gm.state_dict().items()},
    }
    validate_archive(blob, f"cannot archive {type(model).__name__}")  # what load_shrunk would refuse, refused now
    return atomic_torch_save(blob, path)


def load_shrunk(path: str | os.PathLike, map_location: Any = "cpu") -> torch.fx.GraphModule:
    """Rebuild a model written by :func:`save_shrunk` (``weights_only`` loading; no model code needed).

    Returns a :class:`torch.fx.GraphModule` with the saved modules (same names), parameters, buffers, training
    flag and ``input_shape`` attribute. Raises :class:`PrunekitError` for files that are not shrunk-model archives
    or that name modules or functions outside the allow-lists.
    """
    if not Path(path).exists():
        raise PrunekitError(f"{path} does not exist")
    blob = load_plain(path, path, map_location=map_location)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PrunekitError(f"{path} is not a shrunk-model archive (expected one written by save_shrunk)")
    if not isinstance(blob.get("version", 0), int) or blob.get("version", 0) > VERSION:
        raise PrunekitError(f"{path} was written by a newer prunekit (archive version {blob['version']})")
    validate_archive(blob, str(path))
    try:
        return _rebuild(blob, path)
    except PrunekitError:
        raise
    except Exception as e:  # noqa: BLE001 - a validated archive that still does not build is damaged
        raise PrunekitError(f"{path}: cannot rebuild the model ({type(e).__name__}: {e}); the archive is "
                            "damaged") from None


def _rebuild(blob: dict, path) -> torch.fx.GraphModule:
    root = nn.Module()
    for spec in blob["modules"]:
        tname = spec["type"]
        if tname not in MODULE_TYPES:
            raise PrunekitError(f"{path} names module type {tname!r}, which is not allowed")
        cls = getattr(nn, tname)
        kwargs = {k: _decode(v, {}) for k, v in spec["args"].items()}
        try:
            mod = cls(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise PrunekitError(f"{path}: cannot rebuild module {spec['name']!r} ({tname}): {e}") from None
        _set_path(root, spec["name"], mod)
    for a in blob["attrs"]:
        _set_path(root, a["target"], a["tensor"], a["kind"], bool(a.get("requires_grad", True)))
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for n in blob["nodes"]:
        op, target = n["op"], n["target"]
        if op == "call_function":
            mod, _, fname = target.partition(":")
            target = resolve_function(mod, fname)
        elif op == "call_method" and (target.startswith("_") or not hasattr(torch.Tensor, target)):
            raise PrunekitError(f"{path} calls Tensor.{target}, which is not a public tensor method")
        elif op not in ("placeholder", "get_attr", "call_module", "call_method", "output"):
            raise PrunekitError(f"{path} holds a graph node of unknown kind {op!r}")
        args, kwargs = _decode(n["args"], env), _decode(n["kwargs"], env)
        if op == "output":
            env[n["name"]] = graph.output(args[0] if len(args) == 1 else args)
        else:
            env[n["name"]] = graph.create_node(op, target, tuple(args), dict(kwargs), name=n["name"])
    gm = torch.fx.GraphModule(root, graph, "ShrunkModel")
    try:
        gm.load_state_dict(blob["state_dict"], strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PrunekitError(f"{path}: saved weights do not fit the saved architecture: {first}") from None
    gm.train(bool(blob.get("training", False)))
    if blob.get("input_shape") is not None:
        gm.input_shape = tuple(blob["input_shape"])
    return gm


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input, **kwargs: Any) -> Path:
    """Export ``model`` (in eval mode; its training flag is restored) to ONNX at ``path`` with ``torch.onnx.export``.

    Needs the ``onnx`` package (raises :class:`PrunekitError` saying ``pip install onnx`` otherwise); uses the
    dynamo exporter when ``onnxscript`` is installed, else the TorchScript one. The file is written to a temporary
    name and renamed into place. ``kwargs`` go to ``torch.onnx.export``.
    """
    if importlib.util.find_spec("onnx") is None:
        raise PrunekitError("ONNX export needs the onnx package: pip install onnx")
    kwargs.setdefault("dynamo", importlib.util.find_spec("onnxscript") is not None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    was = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose when onnxscript is absent
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(model, inputs_tuple(example_input), tmp, **kwargs)
        os.replace(tmp, path)
    except PrunekitError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PrunekitError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
