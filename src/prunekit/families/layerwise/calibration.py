"""Calibration for the layer-wise methods: the layers as matrices, their inputs as matrices (im2col for
convolutions), and forward passes that capture those inputs through forward pre-hooks (no gradients).

- :class:`Layer`: one prunable weight as a (rows, cols) matrix per convolution group — Linear ``weight``, GPT-2's
  ``Conv1D`` ``weight.T``, a Conv1d/2d/3d ``weight.reshape(out, -1)`` (groups > 1: G matrices of out/G rows, each
  over its own in/G·∏k columns, ordered (channel, kernel position); :meth:`Layer.channels_fastest` reorders them
  (kernel position, channel), so that runs of M columns are M input channels at one kernel position, the N:M
  groups of :mod:`prunekit.patterns`).
- :meth:`Layer.inputs`: the layer input as X [tokens, G, cols], so that the layer computes W_g·X[:, g]ᵀ (+ bias):
  Linear / Conv1D inputs flattened over every leading dimension; convolutions unfolded (padding mode, stride,
  dilation and ``padding="same"`` as the module applies them).
- :class:`Calibration`: the calibration inputs (read once from the data, kept on the model's device, ``labels``
  dropped from dict batches), the forward order of the layers and their groups (one group per transformer block of
  a Hugging Face model, else one per layer), and :meth:`Calibration.capture`, one pass over the calibration inputs
  that feeds every call of the chosen layers to a callback and stops each forward as soon as the last of them has
  run (its remaining layers are not computed).
"""
from __future__ import annotations

import collections.abc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...batches import DictInputs, LABELS, call
from ...errors import PrunekitError
from ...modes import eval_mode, model_device
from ...params import PrunableParam, contains_hf_model, hf_conv1d


@dataclass
class Layer:
    """One prunable weight seen as G matrices of shape (rows, cols)."""

    param: PrunableParam
    kind: str  # "linear", "conv1d_hf" (GPT-2 Conv1D, weight stored (in, out)) or "conv"
    groups: int
    rows: int  # per group
    cols: int  # per group
    perm: torch.Tensor | None = None  # column order of the matrices (None: the weight's own); see channels_fastest

    def channels_fastest(self) -> "Layer":
        """This layer with its columns in (kernel position, input channel) order, for a convolution (column
        j' = t·C + c is the weight's column c·K + t, K kernel positions, C input channels per group); other layers
        unchanged. :meth:`matrices`, :meth:`to_weight`, :meth:`write` and :meth:`inputs` all use the order, so a
        solve needs nothing else."""
        if self.kind != "conv":
            return self
        k = math.prod(self.module.kernel_size)
        perm = torch.arange(self.cols).reshape(self.cols // k, k).t().reshape(-1)
        return Layer(self.param, self.kind, self.groups, self.rows, self.cols, perm)

    def _cols(self, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.perm is None:
            return t
        order = torch.argsort(self.perm) if inverse else self.perm
        return t.index_select(-1, order.to(t.device))

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def module(self) -> nn.Module:
        return self.param.module

    def matrices(self, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or ``weight``, a tensor of the parameter's shape) as [G, rows, cols] (a copy in ``dtype``)."""
        w = (self.param.tensor if weight is None else weight).detach()
        m = w.t() if self.kind == "conv1d_hf" else w.reshape(w.shape[0], -1)
        return self._cols(m.to(dtype).reshape(self.groups, self.rows, self.cols)).clone()

    def to_weight(self, mats: torch.Tensor) -> torch.Tensor:
        """[G, rows, cols] back to the parameter's shape (not its dtype)."""
        w = self.param.tensor
        m = self._cols(mats, inverse=True).reshape(self.groups * self.rows, self.cols)
        return m.t().contiguous() if self.kind == "conv1d_hf" else m.reshape(w.shape)

    def write(self, mats: torch.Tensor) -> None:
        """Write [G, rows, cols] into the live parameter."""
        with torch.no_grad():
            self.param.tensor.copy_(self.to_weight(mats).to(self.param.tensor.dtype))

    def inputs(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer input ``x`` (what its forward receives) as X [tokens, G, cols] in ``dtype``."""
        m = self.module
        if self.kind != "conv":
            return x.detach().reshape(-1, 1, self.cols).to(dtype)
        d = len(m.kernel_size)
        x = x.detach()
        if x.dim() == d + 1:  # an unbatched input
            x = x.unsqueeze(0)
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        for i in range(d):  # im2col for any number of spatial dims: windows of the dilated kernel, then its taps
            k, s, dil = m.kernel_size[i], m.stride[i], m.dilation[i]
            x = x.unfold(2 + i, (k - 1) * dil + 1, s)[..., ::dil]
        # x: [N, C, L1..Ld, k1..kd] -> [N, L1..Ld, C, k1..kd] -> [tokens, C·∏k]
        perm = [0] + list(range(2, 2 + d)) + [1] + list(range(2 + d, 2 + 2 * d))
        x = x.permute(*perm).reshape(-1, self.groups, self.cols)
        return self._cols(x).to(dtype)


def as_layer(p: PrunableParam) -> Layer:
    """The :class:`Layer` of a prunable tensor; a PrunekitError for tensors the layer-wise methods cannot solve."""
    m = p.module
    if p.attr != "weight":
        raise PrunekitError(f"{p.name!r}: the layer-wise methods prune layer weights only, not {p.attr!r} "
                            "(leave include_bias off)")
    conv1d = hf_conv1d()
    if isinstance(m, nn.Linear):
        return Layer(p, "linear", 1, m.out_features, m.in_features)
    if conv1d is not None and isinstance(m, conv1d):
        n_in, n_out = m.weight.shape
        return Layer(p, "conv1d_hf", 1, n_out, n_in)
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            raise PrunekitError(f"{p.name!r} belongs to a transposed convolution ({type(m).__name__}), which the "
                                "layer-wise methods do not solve: leave it out with ignore=[...]")
        g = m.groups
        cols = (m.in_channels // g) * math.prod(m.kernel_size)
        return Layer(p, "conv", g, m.out_channels // g, cols)
    raise PrunekitError(f"{p.name!r} belongs to a {type(m).__name__}: the layer-wise methods solve Linear, GPT-2 "
                        "Conv1D and Conv1d/2d/3d weights only; leave it out with ignore=[...]")


def _first(out):
    """A block's hidden-state output: the output itself or the first entry of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality: not the same
        return False


def _plain(v) -> bool:
    """Tensors, numbers, strings, None and tuples of them: arguments a block can be called with again. (A
    key/value cache object is not: a block appends to it, so calling the block twice would change it.)"""
    if v is None or isinstance(v, (torch.Tensor, bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(_plain(x) for x in v)


def _same_args(a, b) -> bool:
    """Two blocks' calls (tag, index, args, kwargs) agree on everything but the hidden states."""
    (_, _, a_args, a_kw), (_, _, b_args, b_kw) = a, b
    if len(a_args) != len(b_args) or set(a_kw) != set(b_kw):
        return False
    if not all(_plain(v) for v in list(a_args) + list(a_kw.values()) + list(b_args) + list(b_kw.values())):
        return False
    rest_a = list(a_args[1:]) + [v for k, v in sorted(a_kw.items()) if not (not a_args and k == "hidden_states")]
    rest_b = list(b_args[1:]) + [v for k, v in sorted(b_kw.items()) if not (not b_args and k == "hidden_states")]
    return all(_same(x, y) for x, y in zip(rest_a, rest_b))


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradient, and no key/value cache (``config.use_cache = False`` on every Hugging Face config
    inside the model: calibration never generates, and a cache would make blocks stateful); all restored on
    exit."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and isinstance(getattr(c, "use_cache", None), bool)}
    saved = [(c, c.use_cache) for c in configs.values()]
    try:
        for c, _ in saved:
            c.use_cache = False
        with eval_mode(model), torch.no_grad():
            yield
    finally:
        for c, flag in saved:
            c.use_cache = flag


class _Stop(Exception):
    """Ends a calibration forward once the captured layers have all run."""


def batch_inputs(batch):
    """The model inputs of one batch: a tensor, the first entry of an (inputs, targets) pair, or the tensors of a
    dict batch without ``labels`` (a :class:`~prunekit.batches.DictInputs`)."""
    if isinstance(batch, collections.abc.Mapping):
        return DictInputs({k: v for k, v in batch.items() if k != LABELS})
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, DictInputs)):
        return batch[0]
    raise PrunekitError(f"each calibration batch must be an (inputs, targets) pair, an inputs tensor or a dict "
                        f"batch; got {type(batch).__name__}")


def _group_key(name: str, blocks: Sequence[str]) -> str:
    for b in blocks:  # the outermost ModuleList item that holds the layer
        pre = f"{b}." if b else ""
        if name.startswith(pre):
            head = name[len(pre):].split(".")[0]
            if head.isdigit():
                return pre + head
    return name


def group_keys(model: nn.Module, layers: list[Layer]) -> list[str]:
    """The group of each layer in the sequential pass: its transformer block (the ModuleList item holding it) in a
    Hugging Face model, else the layer itself."""
    if not contains_hf_model(model):
        return [L.name for L in layers]
    blocks = sorted((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)), key=len)
    return [_group_key(L.param.module_name, blocks) for L in layers]


class Calibration:
    """The calibration inputs of one prune call and the forward order / groups of its layers."""

    def __init__(self, model: nn.Module, layers: list[Layer], data: Iterable):
        self.model, self.layers = model, layers
        dev = model_device(model)
        fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
        self.inputs = []
        for batch in data:
            x = batch_inputs(batch)
            if x.shape[0] == 0:
                continue
            if isinstance(x, DictInputs):
                x = x.to(dev, fdtype)
            else:
                x = x.to(dev)
                if fdtype is not None and x.is_floating_point() and x.dtype != fdtype:
                    x = x.to(fdtype)
            self.inputs.append(x)
        if not self.inputs:
            raise PrunekitError("the calibration data holds no example: pass at least one batch")
        self.samples = sum(int(x.shape[0]) for x in self.inputs)
        self.blocks = None  # the transformer blocks while the sequential pass runs them on cached inputs
        self.order: list[int] = []  # layer indices in the order of their first call
        self.calls: dict[int, int] = {}  # calls per forward

    def record_order(self, first_calls: list[int]) -> None:
        seen = []
        for i in first_calls:
            if i not in seen:
                seen.append(i)
        missing = [self.layers[i].name for i in range(len(self.layers)) if i not in seen]
        if missing:
            raise PrunekitError(f"{missing[0]!r} is never called by the model's forward on the calibration data, so "
                                "it has no inputs to calibrate on: leave it out with ignore=[...]")
        self.order = seen
        self.calls = collections.Counter(first_calls)

    def groups(self) -> list[list[int]]:
        """Layer indices grouped for the sequential pass, in forward order: one group per transformer block of a
        Hugging Face model (its layers are calibrated together, on the outputs of the blocks pruned before it, as
        the SparseGPT and Wanda reference codes do), one group per layer otherwise."""
        keys = group_keys(self.model, self.layers)
        out: dict[str, list[int]] = {}
        for i in self.order:
            out.setdefault(keys[i], []).append(i)
        return list(out.values())

    # ------------------------------------------------------------------------------------- block-input cache
    #: Hugging Face models: the sequential pass runs each transformer block alone on its cached inputs (one block
    #: per group instead of the model up to it), when :meth:`prepare_blocks` verifies that this is the same
    #: computation. False: always re-run the model (tests compare the two).
    block_cache = True

    def prepare_blocks(self, groups: list[list[int]]) -> bool:
        """Switch the sequential pass to cached block inputs when every group is one transformer block, the blocks
        run once each in group order, each block's output is the next one's input, and they all get the same other
        arguments (checked on the first calibration batch). Then one pass stopped at the first block caches its
        inputs for every batch. Returns whether the cache is in use."""
        self.blocks = None
        if not self.block_cache or not contains_hf_model(self.model) or len(groups) < 2:
            return False
        keys = group_keys(self.model, self.layers)
        names = [keys[g[0]] for g in groups]
        if any(keys[i] != names[k] for k, g in enumerate(groups) for i in g) or any(
                n == self.layers[g[0]].name for n, g in zip(names, groups)):
            return False  # a layer outside the blocks
        try:
            blocks = [self.model.get_submodule(n) for n in names]
        except AttributeError:
            return False
        seen: list = []

        def pre(k):
            def hook(mod, args, kwargs):
                seen.append(("in", k, args, kwargs))
            return hook

        def post(k):
            def hook(mod, args, kwargs, out):
                seen.append(("out", k, out))
            return hook

        handles = [b.register_forward_pre_hook(pre(k), with_kwargs=True) for k, b in enumerate(blocks)]
        handles += [b.register_forward_hook(post(k), with_kwargs=True) for k, b in enumerate(blocks)]
        try:
            with calibrating(self.model):
                call(self.model, self.inputs[0])
        finally:
            for h in handles:
                h.remove()
        expect = [(t, k) for k in range(len(blocks)) for t in ("in", "out")]
        if [(e[0], e[1]) for e in seen] != expect:
            return False
        ins = [e for e in seen if e[0] == "in"]
        outs = [e[2] for e in seen if e[0] == "out"]
        for k in range(len(blocks) - 1):
            hidden = _hidden(ins[k + 1][2], ins[k + 1][3])
            if hidden is None or not _same(_first(outs[k]), hidden) or not _same_args(ins[k], ins[k + 1]):
                return False
        cache = []

        def grab(mod, args, kwargs):
            cache.append((args, kwargs))
            raise _Stop

        h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with calibrating(self.model):
                for x in distributed.mine(self.inputs):  # DDP: the blocks run on this rank's batches only
                    try:
                        call(self.model, x)
                    except _Stop:
                        pass
        finally:
            h.remove()
        self.blocks, self.block_inputs, self.block_index = blocks, cache, 0
        return True

    def _run_block(self):
        block = self.blocks[self.block_index]
        with calibrating(self.model):
            return [block(*a, **kw) for a, kw in self.block_inputs]

    def advance(self) -> None:
        """After the current block's layers are pruned: its outputs become the next block's cached inputs."""
        if self.blocks is None:
            return
        outs = self._run_block()
        nxt = []
        for (a, kw), out in zip(self.block_inputs, outs):
            h = _first(out)
            if a:
                nxt.append(((h,) + tuple(a[1:]), kw))
            else:
                nxt.append((a, {**kw, "hidden_states": h}))
        self.block_inputs, self.block_index = nxt, self.block_index + 1

    def capture(self, which: Sequence[int], fn: Callable[[int, torch.Tensor], None], *, record: bool = False,
                stop: bool = True, batches: int | None = None) -> None:
        """One pass over the calibration inputs (eval mode, no gradient) calling ``fn(layer index, input)`` for
        every call of the layers ``which``. ``stop``: each forward ends (by an exception caught here) once every
        one of them has run as often as in a whole forward. ``record``: also record the forward order (the first
        forward runs to its end). ``batches``: only the first that many calibration batches (all by default)."""
        targets = set(which)
        count: collections.Counter = collections.Counter()
        first: list[int] = []
        recording = [record]
        mine = [True]  # DDP: this rank's share of the batches (the statistics are summed over the ranks after)

        def hook(i):
            def pre(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if recording[0]:
                    first.append(i)
                if i in targets:
                    if mine[0]:
                        fn(i, x)
                    count[i] += 1
                    if stop and not recording[0] and all(count[j] >= self.calls[j] for j in targets):
                        raise _Stop
            return pre

        idx = range(len(self.layers)) if record else sorted(targets)
        handles = [self.layers[i].module.register_forward_pre_hook(hook(i), with_kwargs=True) for i in idx]
        if self.blocks is not None and not record:  # the current block alone, on its cached inputs (this rank's)
            block = self.blocks[self.block_index]
            runs = [(True, lambda a=a, kw=kw: block(*a, **kw)) for a, kw in self.block_inputs]
        else:
            runs = [(distributed.owns(b), lambda x=x: call(self.model, x))
                    for b, x in enumerate(self.inputs[:batches])]
        try:
            with calibrating(self.model):
                for own, run in runs:
                    if not own and not recording[0]:
                        continue
                    mine[0] = own
                    count.clear()
                    try:
                        run()
                    except _Stop:
                        pass
                    if recording[0]:
                        self.record_order(first)
                        recording[0] = False
        finally:
            for h in handles:
                h.remove()
