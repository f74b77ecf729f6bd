"""The gradient matrix G of the OBS family (second_order.md §1).

Row n of G is g_n = m ⊙ ∇_w[(1/b)·Σ_{x in mini-batch n} loss(x)]: the gradient of the MEAN loss over the n-th
mini-batch of b examples (a per-example gradient when b = 1), restricted to the prunable tensors and multiplied by
the current mask. Columns follow the flat order of the prunable tensors (each flattened row-major, concatenated in
registration order); with ``active_only`` only the active (mask = 1) columns are kept, in the same order.

Data: the first N·b examples of ``data`` (an iterable of ``(inputs, targets)`` batches of any size) are re-batched
into N consecutive mini-batches of b. With fewer examples, N = available // b and a warning is issued.

Engines (all in eval mode, pure: prunekit.modes.scoring_mode restores modes, buffers, flags and the RNG):

- ``hooks`` (default for the stock ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with the built-in cross-entropy):
  one batched forward and ONE backward per chunk of examples. Forward hooks capture each prunable layer's input and
  the gradient edge of its output; ``autograd.grad`` of the SUM of the per-example losses w.r.t. those edges gives
  δ_n = ∂ℓ_n/∂out_n, and the per-example weight gradient is δ_n x_nᵀ summed over output positions (conv: on the
  unfolded input). With b > 1 the per-example gradients of a mini-batch are contracted together (one einsum, never
  materialized) and divided by b. Never N separate backward passes.
- ``vmap``: ``torch.func.vmap`` of ``grad`` of the mini-batch mean loss through ``functional_call``, in chunks;
  used for user losses, custom modules, tensors used more than once per forward, and as a fallback.
- ``loop`` (dict batches, Hugging Face style ``model(**batch)``): one forward and one ``autograd.grad`` per
  mini-batch of b examples; row n is the gradient of the loss of mini-batch n (the output's own ``.loss`` under the
  default loss: for a causal LM the mean over its predicted tokens). Slower (no batching across mini-batches) but
  any model works; ``true_fisher`` is refused there (the sampled labels would have to follow the model's own loss).

A mini-batch larger than the micro-batch limit is computed in pieces: the sum-reduced gradients of its sub-batches
are added and divided by b (the same result).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...batches import BatchStream, DictInputs, call
from ...errors import PrunekitError, is_count
from ...gradstats.capture import Unsupported, batch_coupled, capture_io, gradient_edge, hook_kind, unfolder
from ...gradstats.losses import is_default_ce
from ...modes import eval_mode, model_device, scoring_mode
from ...params import PrunableParam
from ...registry import default_loss as model_loss

ENGINES = ("auto", "hooks", "vmap")
#: Default budget for the per-chunk temporaries (per-example gradients of one layer plus activations).
DEFAULT_CHUNK_BYTES = 256 * 2**20
MAX_CHUNK = 256


def per_example_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module for ONE example (a forward of x[:1] without grad), times 3 for the
    autograd graph and the backward buffers, plus the largest unfolded conv input (the hooks engine forms it per
    layer): a rough size of one example's working memory while its gradient is formed."""
    total = 0
    unfold = 0

    def hook(mod, inp, out):
        nonlocal total, unfold
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                k = 1
                for s in mod.kernel_size:
                    k *= s
                unfold = max(unfold, mod.in_channels * k * out[0, 0].numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with eval_mode(model), torch.no_grad():
            call(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    return 3 * total + unfold


def _per_example_loss(out: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-example cross-entropy (averaged over output positions for outputs [n, C, d...])."""
    ls = F.cross_entropy(out, y, reduction="none", label_smoothing=smoothing)
    return ls.reshape(out.shape[0], -1).mean(1)


def sample_labels(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """y_n ~ Categorical(softmax(out_n)) by inverse CDF with one uniform per example from ``generator`` (CPU), so the
    draw of an example does not depend on how the examples are chunked."""
    if out.dim() != 2:
        raise PrunekitError(f"true_fisher needs outputs of shape [n, classes], got {tuple(out.shape)}")
    probs = torch.softmax(out.detach().double(), dim=1).cpu()
    u = torch.rand(out.shape[0], generator=generator, dtype=torch.float64)
    cdf = probs.cumsum(1)
    y = (cdf < u[:, None] * cdf[:, -1:]).sum(1).clamp_(max=out.shape[1] - 1)
    return y.to(out.device)


class _Columns:
    """Where each prunable tensor's gradient goes in G: a column offset and, with active_only, the kept indices."""

    def __init__(self, params: Sequence[PrunableParam], masks: Mapping[str, torch.Tensor] | None, active_only: bool,
                 device):
        self.offsets, self.sel, self.mult = {}, {}, {}
        off = 0
        for p in params:
            n = p.tensor.numel()
            m = None if masks is None else masks[p.name].reshape(-1).to(device)
            if active_only:
                if m is None:
                    raise PrunekitError("active_only needs masks")
                idx = torch.nonzero(m, as_tuple=True)[0]
                self.sel[p.name] = idx
                self.mult[p.name] = None
                width = idx.numel()
            else:
                self.sel[p.name] = None
                self.mult[p.name] = None if m is None or bool(m.all()) else m
                width = n
            self.offsets[p.name] = (off, width)
            off += width
        self.d = off

    def put(self, G: torch.Tensor, rows: slice, name: str, g: torch.Tensor, accumulate: bool = False) -> None:
        """Writes gradients g [k, numel] of tensor ``name`` into rows of G (masked / restricted)."""
        off, width = self.offsets[name]
        if width == 0:
            return
        sel, mult = self.sel[name], self.mult[name]
        if sel is not None:
            g = g.index_select(1, sel)
        elif mult is not None:
            g = g * mult
        dst = G[rows, off: off + width]
        if accumulate:
            dst += g.to(G.device, G.dtype)
        else:
            dst.copy_(g)


def check_finite_inputs(x: torch.Tensor, first_sample: int) -> None:
    """NaN or infinite inputs make every gradient of their mini-batch NaN and the Fisher singular: say so, naming the
    data, instead of letting the inverse fail later (where raising the damping would look like the fix)."""
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        raise PrunekitError(
            f"the data batches contain NaN or infinite inputs ({n_bad} of scoring samples {first_sample}.."
            f"{first_sample + x.shape[0] - 1}): the OBS Fisher would be NaN; clean the data (e.g. check the "
            "normalization: a zero std gives NaN). Raising fisher_damp does not help")


def check_finite_gradients(G: torch.Tensor, what: str = "the OBS gradient matrix") -> None:
    """Non-finite gradients from finite inputs: the model or the loss produced NaN/inf (checked in row chunks)."""
    if G.numel() == 0:
        return
    rows = max(1, (1 << 24) // max(1, G[0].numel()))
    bad = torch.zeros((), dtype=torch.bool, device=G.device)
    for a in range(0, G.shape[0], rows):
        bad |= ~torch.isfinite(G[a:a + rows]).all()
    if bool(bad):
        raise PrunekitError(
            f"{what} has NaN or infinite gradients although the data inputs are finite: the model or the loss "
            "produced NaN/inf (check the weights with torch.isfinite, the model's outputs and the loss on these "
            "batches). Raising fisher_damp does not help")


def gradient_matrix(
    model: nn.Module,
    params: Sequence[PrunableParam],
    data: Iterable,
    *,
    n_grads: int,
    grad_batch: int = 1,
    true_fisher: bool = False,
    generator: torch.Generator | None = None,
    loss: Callable | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    active_only: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    label_smoothing: float = 0.0,
    max_micro_batch: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    engine: str = "auto",
) -> torch.Tensor:
    """G [N, d] (module docs): N = ``n_grads`` rows of mini-batch gradients of ``grad_batch`` examples each.

    - ``masks``: ``{param name: bool mask}``; every gradient is multiplied by it (pruned columns are exactly 0).
      ``active_only``: keep only the active columns (the dynamic block layout).
    - ``true_fisher``: labels drawn from softmax(outputs) with ``generator`` instead of the data's labels.
    - ``loss``: a MEAN loss ``loss(outputs, targets)``; None (or prunekit's default) = cross-entropy, computed in
      per-example form; ``label_smoothing`` smooths this cross-entropy only (``hess_label_smoothing``).
    - ``device``: where G lives (``grad_device``; default the model's device); ``dtype``: its precision (default
      float32, float64 for a float64 model).
    - ``max_micro_batch``: examples per batched forward (default: sized to ``chunk_bytes``).
    - ``engine``: 'auto' (hooks where supported, else vmap), 'hooks' or 'vmap'.
    """
    params = list(params)
    default_loss = _check_arguments(params, n_grads, grad_batch, engine, loss, label_smoothing)
    mdev = model_device(model)
    gdev = torch.device(device) if device is not None else mdev
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    if dtype is None:
        dtype = torch.float64 if fdtype == torch.float64 else torch.float32
    b = grad_batch
    cols = _Columns(params, masks, active_only, mdev)
    G = torch.zeros(n_grads, cols.d, dtype=dtype, device=gdev)
    stream = BatchStream(data, mdev, fdtype, who="the OBS family")
    use = _choose_engine(model, params, engine, default_loss)
    m = _micro_batch_size(model, params, stream, b, max_micro_batch, chunk_bytes)
    if isinstance(stream.peek(), DictInputs):  # dict batches: one forward and backward per mini-batch
        if true_fisher:
            raise PrunekitError("true_fisher is not supported with dict batches (model(**batch)): the labels drawn "
                                "from the model's outputs would have to match its own loss; use the empirical "
                                "Fisher (true_fisher=False) or tensor (inputs, targets) batches")
        if label_smoothing:
            raise PrunekitError("hess_label_smoothing is not supported with dict batches: the loss is the model's "
                                "own .loss; set hess_label_smoothing=0")
        use, m = "loop", b

    def vmap_engine() -> _Vmap:
        return _Vmap(model, params, cols, loss, label_smoothing)

    if use == "loop":
        run = _Loop(model, params, cols, loss)
    else:
        run = _Hooks(model, params, cols, label_smoothing) if use == "hooks" else vmap_engine()
    with scoring_mode(model, "eval", [p.tensor for p in params]):
        got = _fill_rows(G, run, vmap_engine, stream, model, want=n_grads * b, b=b, m=m, true_fisher=true_fisher,
                         generator=generator)
    distributed.all_sum(G)
    check_finite_gradients(G)
    return _rows_filled(G, got, n_grads, b)


def _check_arguments(params: list[PrunableParam], n_grads, grad_batch, engine: str, loss, label_smoothing) -> bool:
    """Validates the arguments of :func:`gradient_matrix`; returns whether the loss is the built-in cross-entropy."""
    if not params:
        raise PrunekitError("gradient_matrix needs at least one prunable parameter")
    if not is_count(n_grads):
        raise PrunekitError(f"the number of gradients must be a positive integer, got {n_grads!r}")
    if not is_count(grad_batch):
        raise PrunekitError(f"fisher_batch must be a positive integer, got {grad_batch!r}")
    if engine not in ENGINES:
        raise PrunekitError(f"unknown gradient engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if len({id(p.tensor) for p in params}) != len(params):
        raise PrunekitError("the OBS gradient matrix does not support tied prunable tensors (the same tensor under two "
                            "names); name the modules explicitly with modules=[...] so that each tensor counts once")
    default_loss = is_default_ce(loss)
    if label_smoothing and not default_loss:
        raise PrunekitError("hess_label_smoothing applies to the built-in cross-entropy only; a custom loss must "
                            "smooth its labels itself")
    return default_loss


def _choose_engine(model: nn.Module, params: list[PrunableParam], engine: str, default_loss: bool) -> str:
    """'hooks' or 'vmap': for 'auto', hooks when the loss is the built-in cross-entropy, every tensor is a weight or
    bias of a stock Linear/Conv1d/Conv2d and no BatchNorm normalizes with batch statistics in eval mode."""
    if engine == "auto":
        ok = default_loss and gradient_edge is not None and all(
            hook_kind(p.module) is not None and p.attr in ("weight", "bias") for p in params)
        return "hooks" if ok and not batch_coupled(model) else "vmap"
    if engine == "hooks" and not default_loss:
        raise PrunekitError("the hooks gradient engine needs the built-in cross-entropy loss; use engine='vmap'")
    return engine


def _micro_batch_size(model: nn.Module, params: list[PrunableParam], stream: BatchStream, b: int,
                      max_micro_batch: int | None, chunk_bytes: int) -> int:
    """Examples per batched forward: ``max_micro_batch``, or as many as fit ``chunk_bytes`` (one example's gradient
    temporaries and activations, measured on the first batch); whole mini-batches of b when b fits."""
    widest = max(p.tensor.numel() for p in params)
    first = stream.peek()
    if first is None:
        raise PrunekitError("the OBS gradient matrix got no samples: data yielded no (inputs, targets) batch")
    act = per_example_activation_bytes(model, first)
    if max_micro_batch is None:
        per_ex = 4 * widest * 3 + act
        max_micro_batch = int(max(1, min(MAX_CHUNK, chunk_bytes // max(1, per_ex))))
    m = max(1, int(max_micro_batch))
    if b <= m:
        m = (m // b) * b
    return m


def _fill_rows(G: torch.Tensor, run, fallback: Callable[[], _Vmap], stream: BatchStream, model: nn.Module, *,
               want: int, b: int, m: int, true_fisher: bool, generator: torch.Generator | None) -> int:
    """Reads up to ``want`` examples in pieces of at most m and writes their mini-batch gradients into the rows of G:
    one row per whole mini-batch when b <= m, else the sub-batch sums of one mini-batch added into its row. ``run``
    switches to ``fallback()`` when the hooks engine meets a module it cannot handle. Returns the examples used.

    DDP: every rank reads the same data, fills the rows of the pieces it owns (prunekit.distributed) and leaves the
    others zero; the sum over the ranks is then exactly the one-process matrix."""
    got = index = 0
    while got < want:
        take = min(m, want - got) if b <= m else min(m, b - got % b, want - got)
        piece = stream.take(take)
        if piece is None:
            break
        x, y = piece
        n = x.shape[0]
        check_finite_inputs(x, got)
        if true_fisher:
            with torch.no_grad():
                y = sample_labels(model(x), generator)
        row0 = got // b
        ours = distributed.owns(index)
        index += 1
        if b <= m:  # whole mini-batches, one row each
            k = n // b
            if k == 0:
                break  # a short last mini-batch: dropped
            rows, used, args, kw = slice(row0, row0 + k), k * b, (x[: k * b], y[: k * b], b, b), {}
        else:  # one mini-batch in pieces: add the sub-batch sums into its row
            rows, used, args, kw = slice(row0, row0 + 1), n, (x, y, n, b), {"accumulate": True}
        if ours:
            try:
                run.groups(G, rows, *args, **kw)
            except Unsupported:
                run = fallback()
                run.groups(G, rows, *args, **kw)
        got += used
        if n < take:
            break
    return got


def _rows_filled(G: torch.Tensor, got: int, n_grads: int, b: int) -> torch.Tensor:
    """G cut to the N = got // b rows the data filled (a warning when N < n_grads; an error when N = 0)."""
    N = got // b
    if N == 0:
        raise PrunekitError(f"the OBS Fisher needs at least one mini-batch of fisher_batch={b} examples, but data "
                            f"holds only {got}")
    if N < n_grads:
        # stacklevel 4: past this helper, gradient_matrix and its caller
        warnings.warn(f"data holds {got} examples, fewer than fisher_samples × fisher_batch = {n_grads} × {b}: "
                      f"using N = {N} gradients", stacklevel=4)
        G = G[:N]
    return G


class _Hooks:
    """Per-example (or per-mini-batch) gradients from one batched forward and one backward per chunk."""

    def __init__(self, model, params, cols: _Columns, smoothing: float):
        self.model, self.params, self.cols, self.smoothing = model, params, cols, smoothing
        self.by_module: dict[nn.Module, list[PrunableParam]] = {}
        for p in params:
            self.by_module.setdefault(p.module, []).append(p)

    def groups(self, G, rows: slice, x, y, size: int, b: int, accumulate: bool = False) -> None:
        """x holds k = len(x) // size consecutive groups of ``size`` examples; row j of ``rows`` gets (1/b)·Σ of the
        per-example gradients of group j (added to the row with ``accumulate``)."""
        dout, inputs = capture_io(self.model, list(self.by_module), x,
                                  lambda out: _per_example_loss(out, y, self.smoothing).sum())
        n = x.shape[0]
        k = n // size
        for mod, ps in self.by_module.items():
            d = dout.get(mod)
            if d is None:  # module not called or not reaching the loss: zero gradient (G is zero-initialized)
                if accumulate:
                    continue
                for p in ps:
                    self.cols.put(G, rows, p.name, torch.zeros(k, p.tensor.numel(), device=x.device))
                continue
            self._module(G, rows, mod, inputs[mod], d.detach(), ps, k, size, b, accumulate)

    def _module(self, G, rows, mod, xin, d, ps, k, size, b, accumulate):
        kind = hook_kind(mod)
        n = xin.shape[0]
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        if kind == "linear":
            gr = 1
            D = d.to(acc).reshape(n, -1, d.shape[-1]).transpose(1, 2).unsqueeze(1)  # [n, 1, out, P]
            Xl = xin.to(acc).reshape(n, -1, xin.shape[-1]).transpose(1, 2).unsqueeze(1)  # [n, 1, in, P]
            X = Xl
        else:
            gr = mod.groups
            D = d.to(acc).reshape(n, gr, mod.out_channels // gr, -1)  # [n, gr, og, P]
            X = unfolder(mod, xin.to(acc), kind, gr)(0, n)  # [n, gr, ig, P]
        og, ig, P = D.shape[2], X.shape[2], D.shape[3]
        for p in ps:
            if p.attr == "bias":
                g = D.sum(-1).reshape(k, size, -1).sum(1) / b
            elif size == 1:
                if P == 1:
                    g = (D.reshape(n, gr, og, 1) * X.reshape(n, gr, 1, ig)).reshape(n, -1)
                else:
                    g = torch.matmul(D, X.transpose(-1, -2)).reshape(n, -1)
                g = g / b if b != 1 else g
            else:
                Dk = D.reshape(k, size, gr, og, P)
                Xk = X.reshape(k, size, gr, ig, P)
                g = torch.einsum("ksgop,ksgip->kgoi", Dk, Xk).reshape(k, -1) / b
            self.cols.put(G, rows, p.name, g, accumulate)


class _Loop:
    """One forward and one ``autograd.grad`` of the mean loss per group (dict batches: ``model(**batch)``)."""

    def __init__(self, model, params, cols: _Columns, loss):
        self.model, self.params, self.cols = model, params, cols
        self.loss = model_loss if loss is None else loss
        uniq: dict[int, torch.Tensor] = {}
        for p in params:
            uniq.setdefault(id(p.tensor), p.tensor)
        self.tensors = list(uniq.values())

    def groups(self, G, rows: slice, x, y, size: int, b: int, accumulate: bool = False) -> None:
        k = x.shape[0] // size
        for j in range(k):
            xs, ys = x[j * size:(j + 1) * size], y[j * size:(j + 1) * size]
            lsum = self.loss(call(self.model, xs), ys) * (size / b)  # the mini-batch mean (a share of it)
            gs = torch.autograd.grad(lsum, self.tensors, allow_unused=True)
            by_id = {id(t): g for t, g in zip(self.tensors, gs)}
            row = slice(rows.start + j, rows.start + j + 1)
            for p in self.params:
                g = by_id[id(p.tensor)]
                g = torch.zeros_like(p.tensor) if g is None else g.detach()
                self.cols.put(G, row, p.name, g.reshape(1, -1), accumulate)


class _Vmap:
    """vmap over groups of grad(group loss) through functional_call: any module, any mean loss."""

    def __init__(self, model, params, cols: _Columns, loss, smoothing: float):
        self.model, self.params, self.cols = model, params, cols
        if is_default_ce(loss):
            self.mean_loss = lambda out, y: _per_example_loss(out, y, smoothing).mean()
        else:
            self.mean_loss = loss
        name_of = {id(t): n for n, t in model.named_parameters()}
        self.keys = []
        for p in params:
            key = name_of.get(id(p.tensor))
            if key is None:
                raise PrunekitError(f"prunable tensor {p.name!r} is not a parameter of the model")
            self.keys.append(key)

    def groups(self, G, rows: slice, x, y, size: int, b: int, accumulate: bool = False) -> None:
        from torch.func import functional_call, grad, vmap

        model, mean_loss = self.model, self.mean_loss
        ps = {k: p.tensor.detach() for k, p in zip(self.keys, self.params)}

        def f(params, xb, yb):
            return mean_loss(functional_call(model, params, (xb,)), yb)

        k = x.shape[0] // size
        xs = x.reshape(k, size, *x.shape[1:])
        ys = y.reshape(k, size, *y.shape[1:])
        gs = vmap(grad(f), in_dims=(None, 0, 0))(ps, xs, ys)
        scale = size / b  # grad of the mean over the group -> (1/b)·sum
        for key, p in zip(self.keys, self.params):
            g = gs[key].detach().reshape(k, -1)
            if scale != 1.0:
                g = g * scale
            self.cols.put(G, rows, p.name, g, accumulate)


def mean_gradient(model: nn.Module, params: Sequence[PrunableParam], data: Iterable, *, n_examples: int,
                  loss: Callable | None = None, masks: Mapping[str, torch.Tensor] | None = None,
                  label_smoothing: float = 0.0, chunk: int = 256) -> torch.Tensor:
    """∇L over the first ``n_examples`` examples of ``data`` (gradient of the mean loss), masked, flat order,
    float64: WoodTaylor's ``grad_samples`` estimate. One backward per chunk of ``chunk`` examples."""
    mdev = model_device(model)
    fdtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    stream = BatchStream(data, mdev, fdtype, who="the OBS family")
    tensors = [p.tensor for p in params]
    total = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float64, device=mdev)
    default = is_default_ce(loss)
    got = index = 0
    with scoring_mode(model, "eval", tensors):
        while got < n_examples and (piece := stream.take(min(chunk, n_examples - got))) is not None:
            x, y = piece
            check_finite_inputs(x, got)
            index += 1
            if not distributed.owns(index - 1):  # DDP: this rank's chunks, summed over the ranks below
                got += x.shape[0]
                continue
            out = call(model, x)
            if isinstance(x, DictInputs):  # the model's own loss (or CE on .logits), a mean over the chunk
                lsum = (loss or model_loss)(out, y) * x.shape[0]
            else:
                lsum = _per_example_loss(out, y, label_smoothing).sum() if default else loss(out, y) * x.shape[0]
            gs = torch.autograd.grad(lsum, tensors, allow_unused=True)
            total += torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1).double()
                                for t, g in zip(tensors, gs)])
            got += x.shape[0]
    distributed.all_sum(total)
    if got == 0:
        raise PrunekitError("grad_samples: data yielded no samples")
    check_finite_gradients(total.unsqueeze(0), "the WoodTaylor mean gradient (grad_samples)")
    if got < n_examples:
        warnings.warn(f"grad_samples={n_examples} but data holds only {got} examples; using them all", stacklevel=3)
    total /= got
    if masks is not None:
        total *= torch.cat([masks[p.name].reshape(-1).to(mdev, torch.float64) for p in params])
    return total


__all__ = ["gradient_matrix", "mean_gradient", "sample_labels", "per_example_activation_bytes"]
