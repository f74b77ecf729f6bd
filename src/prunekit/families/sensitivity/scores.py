"""Empirical sensitivities of single weights (seed 002; methods/sensitivity.md §1–2), shared by SiPP and PFP: the
sample set size |S| (§1), the layers' input patches, the collection of the maxima over S in forward hooks (§2;
the kernels are :mod:`prunekit.families.sensitivity.kernels`, PFP's channel maxima
:mod:`prunekit.families.sensitivity.channel_bounds`), and the first |S| examples of the scoring data."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...batches import BatchStream, DictInputs, call
from ...errors import PrunekitError
from ...modes import model_device, scoring_mode
from ...params import PrunableParam, hf_conv1d, is_prunable_type
from ...registry import ScoreContext
from .channel_bounds import channel_contributions, channel_contributions_rows
from .kernels import relative_contributions


#: Examples per forward pass while collecting sensitivities.
EXAMPLES_PER_FORWARD = 32
#: A side draws at most DRAW_CAP·nnz_i samples (then E[unique] may fall short of m_i; the size search compensates).
DRAW_CAP = 32
#: Draws per row and block of uniforms (fixed, so that draw t of a side is the same at every evaluation).
DRAW_BLOCK = 128
#: Sides whose summed sensitivity is at most this are left out of the allocation (m_i = 0).
S_ZERO = 1e-12
#: Smallest internal keep ratio tried by the search (every active side then keeps about one weight).
KAPPA_MIN = 1e-12


@dataclass(frozen=True)
class SensitivityOptions:
    """Options shared by ``sipp`` and ``pfp`` (methods/sensitivity.md §0): ``delta_s`` δ_S and ``C`` (failure
    probability and constant of the bounds; they fix |S|), ``sample_size`` (|S|; None = ⌈C·ln(8·η*·η/δ_S)⌉, 152 for
    LeNet-300-100), ``size_tol`` (relative tolerance on the kept count) and ``search_iters`` (most evaluations of
    the size search)."""

    delta_s: float = 1e-16
    C: float = 3.0
    sample_size: int | None = None
    size_tol: float = 0.005
    search_iters: int = 20

    def validate(self, path, error) -> None:
        if not (0.0 < self.delta_s < 1.0):
            raise error(f"delta_s must be in (0, 1) (a failure probability), got {self.delta_s}")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise error(f"C must be a positive number, got {self.C}")
        if self.sample_size is not None and self.sample_size < 1:
            raise error(f"sample_size must be >= 1 (or null for the automatic |S|), got {self.sample_size}")
        if not (self.size_tol >= 0 and math.isfinite(self.size_tol)):
            raise error(f"size_tol must be >= 0, got {self.size_tol}")
        if self.search_iters < 1:
            raise error(f"search_iters must be >= 1, got {self.search_iters}")


# ------------------------------------------------------------------------------------------------- sample size (§1)


def activation_counts(model: nn.Module, input_shape: Sequence[int] | None,
                      modules: Iterable[nn.Module] | None = None, example=None) -> tuple[int, int]:
    """(η, η*): the sum and the maximum over layers of the per-example output count (channels·H·W for a conv,
    positions·features for a linear layer over a sequence) of ``modules`` (default: every Conv/Linear/GPT-2
    Conv1D of ``model``), from one forward in eval mode of a zero input of ``input_shape`` (without the batch
    dimension), or of ``example`` (one example with its batch dimension: a tensor, or the
    :class:`~prunekit.batches.DictInputs` of a dict batch, whose inputs cannot be zeros). A module called several
    times counts once per call."""
    mods = list(modules) if modules is not None else [m for m in model.modules() if is_prunable_type(m)]
    if not mods:
        raise PrunekitError(f"{type(model).__name__} has no Conv/Linear layer: SiPP has nothing to count")
    counts: list[int] = []

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] > 0:
            counts.append(out.numel() // out.shape[0])

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if example is not None:
        x = example[:1]
    else:
        x = torch.zeros((1, *tuple(int(s) for s in input_shape)), device=model_device(model), dtype=dtype)
    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in mods}.values()]
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            call(model, x)
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise PrunekitError("no prunable layer was called in the forward pass: SiPP cannot count activations")
    return sum(counts), max(counts)


def sample_size(model: nn.Module, input_shape: Sequence[int] | None, delta_s: float = 1e-16, C: float = 3.0,
                modules: Iterable[nn.Module] | None = None, example=None) -> int:
    """|S| = ⌈C·ln(8·η*/δ′)⌉ with δ′ = δ_S/η, i.e. ⌈C·ln(8·η*·η/δ_S)⌉ (methods/sensitivity.md §1).

    η and η* come from :func:`activation_counts` (``example``: one example instead of a zero input of
    ``input_shape``). LeNet-300-100 (η = 410, η* = 300) gives 152."""
    eta, eta_star = activation_counts(model, input_shape, modules, example)
    return int(math.ceil(C * math.log(8.0 * eta_star * eta / delta_s)))


# ---------------------------------------------------------------------------------------------- sensitivities (§2)


@dataclass
class Layer:
    """A prunable weight seen as a layer: ``out`` = n_ℓ neurons, ``k`` kernel entries, ``positions`` P."""

    param: PrunableParam
    kind: str
    out: int
    groups: int
    k: int
    positions: int = 0


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored (in, out)."""
    conv1d = hf_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def out_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` seen with the output neurons first: the transpose (a view) for a
    Conv1D, ``t`` itself otherwise. Its own inverse: ``out_first(m, out_first(m, t))`` is ``t``'s layout."""
    return t.transpose(0, 1) if is_conv1d(module) else t


def layer_view(p: PrunableParam) -> Layer:
    m, w = p.module, p.tensor
    if p.attr == "weight" and w is not None and w.dim() >= 2:
        if isinstance(m, nn.Linear):
            return Layer(p, "linear", w.shape[0], 1, 1)
        if is_conv1d(m) and w.dim() == 2:  # GPT-2 Conv1D: weight (in, out)
            return Layer(p, "linear", w.shape[1], 1, 1)
        for cls, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d"), (nn.Conv3d, "conv3d")):
            if isinstance(m, cls):
                return Layer(p, kind, w.shape[0], m.groups, math.prod(m.kernel_size))
    raise PrunekitError(
        f"sipp prunes the weights of Linear, Conv1d and Conv2d layers (and Conv3d, GPT-2's Conv1D); {p.name!r} "
        f"({type(m).__name__}.{p.attr}) is not one: leave it out with exclude=[...] (and do not pass include_bias)"
    )


def patches(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` as patches (n, J, P): J = in·kernel in weight.view(out, -1) order, P positions."""
    m = layer.param.module
    n = x.shape[0]
    if layer.kind == "linear":
        return x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * len(m.kernel_size)
    else:
        pad = tuple(m.padding)
    ks, st, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    if layer.kind == "conv3d":  # no 3-D unfold in torch: a strided window per spatial dim, then (C, k1, k2, k3) rows
        if any(pad):
            x = F.pad(x, [q for p in reversed(pad) for q in (p, p)])
        for i in range(3):
            x = x.unfold(2 + i, dil[i] * (ks[i] - 1) + 1, st[i])[..., ::dil[i]]
        return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, x.shape[1] * math.prod(ks), -1)
    if layer.kind == "conv1d":
        x = x.unsqueeze(-2)
        ks, st, dil, pad = (1, ks[0]), (1, st[0]), (1, dil[0]), (0, pad[-1])
    return F.unfold(x, ks, dilation=dil, padding=pad, stride=st)


def patch_rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The patches of :func:`patches` laid out (J, n·P): one row per input entry, the columns in (example,
    position) order, i.e. ``patches(layer, x).permute(1, 0, 2).reshape(J, -1)``. A Conv2d with zero padding copies
    its windows straight from the padded input into that layout (one copy instead of unfold's and the transpose's)."""
    m = layer.param.module
    if layer.kind != "conv2d" or m.padding_mode != "zeros" or isinstance(m.padding, str) or x.dim() != 4:
        a = patches(layer, x)
        return a.permute(1, 0, 2).reshape(a.shape[1], -1)
    (ph, pw), (kh, kw), (sh, sw), (dh, dw) = m.padding, m.kernel_size, m.stride, m.dilation
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    n, C, H, W = xp.shape
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = xp.stride()
    win = xp.as_strided((C, kh, kw, n, oh, ow), (sc, dh * sy, dw * sx, sn, sh * sy, sw * sx))
    return win.reshape(C * kh * kw, n * oh * ow)


def collect(model: nn.Module, params: Sequence[PrunableParam], inputs: torch.Tensor | DictInputs, aggregate: str,
            chunk: int = EXAMPLES_PER_FORWARD, channels: Mapping[str, tuple[int, torch.Tensor | None]] | None = None,
            ) -> tuple[dict[str, torch.Tensor], list[Layer]]:
    """Sensitivities (I, J) of every param over the examples ``inputs`` (a tensor, or the
    :class:`~prunekit.batches.DictInputs` of dict batches: ``model(**inputs)``), a running maximum over forward
    chunks. I is the output neurons (a Conv1D's weight is seen transposed, :func:`out_first`). A linear layer over
    a sequence counts each position as a position (padded ones included: the attention mask is not read).

    ``channels``: ``{param name: (k, alive or None)}`` for params (``groups == 1``, MAX aggregation) of which only
    the input-channel maxima are wanted: their entry is then the (C,) vector of max over neurons and the k entries
    of each channel of the sensitivities of the alive entries (:func:`channel_contributions`; bitwise the same
    values as reducing the full (I, J) matrix, at a fraction of the work)."""
    if aggregate not in ("mean", "max"):
        raise PrunekitError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    layers = [layer_view(p) for p in params]
    by_module: dict[int, list[Layer]] = {}
    for lay in layers:
        by_module.setdefault(id(lay.param.module), []).append(lay)
    channels = dict(channels or {})
    if channels and aggregate != "max":
        raise PrunekitError("channel maxima are computed for the MAX aggregation only")
    run = {}
    for lay in layers:
        w = lay.param.tensor
        dtype = torch.promote_types(w.dtype, torch.float32)
        if lay.param.name in channels:
            if lay.groups != 1:
                raise PrunekitError(f"channel maxima need groups == 1 ({lay.param.name!r} has {lay.groups})")
            k, alive = channels[lay.param.name]
            cols = w.numel() // lay.out
            run[lay.param.name] = torch.zeros(cols // k, device=w.device, dtype=dtype)
            if alive is not None:
                channels[lay.param.name] = (k, out_first(lay.param.module, alive).reshape(lay.out, -1)
                                            .to(device=w.device, dtype=dtype))
        else:
            run[lay.param.name] = torch.zeros((lay.out, w.numel() // lay.out), device=w.device, dtype=dtype)

    def hook(module, args, out):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        for lay in by_module[id(module)]:
            acc = run[lay.param.name]
            w = out_first(module, lay.param.tensor.detach()).reshape(lay.out, -1).to(acc.dtype)
            x = x.to(acc.dtype)
            negative = bool((x < 0).any())  # the patches hold x's values (and padding zeros)
            if lay.param.name in channels and x.device.type == "cpu":  # the (input, row) layout the bounds read
                at = patch_rows(lay, x)
                lay.positions = max(lay.positions, at.shape[1] // x.shape[0])
                if negative:  # every example becomes the two points max(a, 0) and max(-a, 0)
                    at = torch.cat([at.clamp(min=0), (-at).clamp(min=0)], dim=1)
                k, alive = channels[lay.param.name]
                channel_contributions_rows(w, at, k, acc, alive)
                continue
            a = patches(lay, x)
            if negative:  # every example becomes the two points max(a, 0) and max(-a, 0)
                a = torch.cat([a.clamp(min=0), (-a).clamp(min=0)])
            lay.positions = max(lay.positions, a.shape[2])
            if lay.param.name in channels:
                k, alive = channels[lay.param.name]
                channel_contributions(w, a, k, acc, alive)
                continue
            og, jg = lay.out // lay.groups, w.shape[1]
            for g in range(lay.groups):
                rows = slice(g * og, (g + 1) * og)
                s = relative_contributions(w[rows], a[:, g * jg:(g + 1) * jg], aggregate)
                torch.maximum(acc[rows], s, out=acc[rows])

    handles = [lays[0].param.module.register_forward_hook(hook) for lays in by_module.values()]
    try:
        with scoring_mode(model, "eval"), torch.no_grad():
            # DDP: each rank runs every world-size-th chunk; the maxima are taken over the ranks below (exact)
            for i in distributed.mine(range(0, inputs.shape[0], chunk)):
                call(model, inputs[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    if distributed.active():
        distributed.all_max(*run.values())
        pos = torch.tensor([lay.positions for lay in layers], dtype=torch.int64)
        distributed.all_max(pos)
        for lay, n in zip(layers, pos.tolist()):
            lay.positions = n
    missed = [lay.param.name for lay in layers if lay.positions == 0]
    if missed:
        warnings.warn(f"sipp: {', '.join(missed)} never ran in the forward pass; their sensitivities are 0",
                      stacklevel=3)
        for lay in layers:
            lay.positions = max(lay.positions, 1)
    return run, layers


def sensitivities(model: nn.Module, params: Sequence[PrunableParam], inputs: torch.Tensor,
                  aggregate: str = "max", chunk: int = EXAMPLES_PER_FORWARD) -> dict[str, torch.Tensor]:
    """Empirical sensitivities s (shaped like each weight) over the examples ``inputs``: the maximum over examples
    of g, aggregated over conv positions by ``mean`` (SiPP det) or ``max`` (rand, hybrid). Pure; eval mode."""
    run, _ = collect(model, params, inputs, aggregate, chunk)
    return {p.name: out_first(p.module, run[p.name]).reshape(p.tensor.shape) for p in params}


# ------------------------------------------------------------------------------------------------- the sample set


def float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def sample_inputs(ctx: ScoreContext, o: SensitivityOptions, who: str = "sipp") -> tuple[torch.Tensor, int]:
    """The first |S| examples of the scoring data, and |S| (auto from §1 unless ``sample_size`` is given); shared
    by ``sipp`` and ``pfp`` (``who`` names the method in messages)."""
    stream = BatchStream(ctx.data, model_device(ctx.model), float_dtype(ctx.model), who=who)
    first = stream.peek()
    if first is None:
        raise PrunekitError(f"{who} needs data: the scoring data hold no example (pass batches of inputs)")
    modules = list({id(p.module): p.module for p in ctx.params}.values())
    own = isinstance(first, DictInputs) or not first.is_floating_point()  # token ids: no zero input of a shape
    need = o.sample_size if o.sample_size is not None else sample_size(
        ctx.model, None if own else tuple(first.shape[1:]), o.delta_s, o.C, modules=modules,
        example=first if own else None)
    x = stream.take(need)[0]
    if x.shape[0] < need:
        warnings.warn(f"{who}: the scoring data hold only {x.shape[0]} examples, fewer than |S| = {need} "
                      f"(δ_S = {o.delta_s:g}, C = {o.C:g}); the sensitivities use all {x.shape[0]}", stacklevel=3)
    return x, need
