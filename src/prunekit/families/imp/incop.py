"""InCoP / SAP building blocks (methods/imp.md sections 2.2 and 4).

* :func:`pq_index`, :func:`pq_prune_fraction`, :func:`pq_prune_count`, :func:`pq_level_masks` -- the PQ-index
  adaptive prune fraction of ``sap``/``ciap``/``giap`` (section 2.2).
* :func:`monitored_layers`, :func:`layer_activations`, :func:`information_flow` -- the information-flow (IF)
  statistic of ``ciap``; :func:`gradient_flow` (fresh gradients, section 4.2) and :func:`gradient_flow_original`
  (seed 001's stale ``.grad`` statistic, section 4.1) for ``giap``; :func:`flow_distance`.
* :class:`StopRule` -- the per-level stopping rule of section 4.1 (``mode='original'``) and 4.2 (``'fixed'``).

Decisions where the spec is silent (each is tested in tests/test_incop.py):

* PQ: ``m`` is ``ceil`` of a float64 value rounded to 9 decimals first (as ``lottery.prune_count``), so float noise
  on an exactly integral support size (a flat vector) does not add one. :func:`pq_index` raises on input with no
  entries at all or no alive entries, and returns 0 for an all-zero alive vector (``||w||_q = 0``);
  :func:`pq_prune_fraction` returns 0 ("prune nothing") for no alive entries or ``||w||_q = 0``, but still raises
  when given no entries at all (that is a caller error, not a collapsed layer).
* IF: the statistic is computed from ONE pass over ``batches`` (activations kept, float64), which equals the seed's
  two passes when the data are deterministic. The model runs in eval mode under ``no_grad``; its training flag is
  restored. Outputs with more than 2 dims are averaged over every dim after the channel dim (H x W for conv).
  ``mode='original'`` forces ``stat='mean'`` and skips only names containing "downsample"; ``'fixed'`` also skips
  "shortcut". A NaN anywhere in R_l makes rho_l NaN; :func:`flow_distance` is then NaN and a check fails.
* GF fixed: gradients are taken with :func:`torch.autograd.grad`, so ``.grad`` of every parameter is left exactly
  as it was (stronger than "cleared afterwards") and parameters/buffers are untouched (eval mode).
* GF original: the stored ``.grad`` is multiplied by the mask (idempotent if already masked); ``B`` must be >= 2.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...errors import PrunekitError
from .lottery import level_masks
from ...masks import Masks

STOP_MODES = ("original", "fixed")
IF_STATS = ("mean", "mean_abs", "fro")
GF_STATS = ("mean_abs", "mean_abs_alive", "fro")
DEFAULT_EPSILON = {"original": {"if": 1.0, "gf": 1.0}, "fixed": {"if": 0.1, "gf": 0.5}}


# ----------------------------------------------------------------------------------------------------------------
# 2.2 PQ index


def _check_pq(p: float, q: float) -> tuple[float, float]:
    try:
        p, q = float(p), float(q)
    except (TypeError, ValueError):
        raise PrunekitError(f"p and q must be numbers with 0 < p < q, got p={p!r}, q={q!r}") from None
    if not (math.isfinite(p) and math.isfinite(q)) or p <= 0 or p >= q:
        raise PrunekitError(f"PQ index needs 0 < p < q, got p={p}, q={q}: use e.g. p=0.5, q=1 or p=1, q=2")
    return p, q


def _alive_vector(weights, masks=None) -> torch.Tensor:
    """Concatenated float64 alive entries of a tensor, a sequence of tensors or a name->tensor mapping."""
    if isinstance(weights, torch.Tensor):
        ws, ms = [weights], [masks] if masks is not None else [None]
    elif isinstance(weights, Mapping):
        names = list(weights)
        ws = [weights[n] for n in names]
        if masks is None:
            ms = [None] * len(ws)
        else:
            md = masks.as_dict() if isinstance(masks, Masks) else masks
            missing = [n for n in names if n not in md]
            if missing:
                raise PrunekitError(f"no mask for weight {missing[0]!r}: pass one mask per weight tensor")
            ms = [md[n] for n in names]
    else:
        ws = list(weights)
        ms = [None] * len(ws) if masks is None else list(masks)
        if len(ms) != len(ws):
            raise PrunekitError(f"{len(ws)} weight tensors but {len(ms)} masks: pass one mask per weight tensor")
    if sum(int(w.numel()) for w in ws) == 0:
        raise PrunekitError("PQ index of empty weights: pass at least one tensor with entries")
    parts = []
    for w, m in zip(ws, ms):
        v = w.detach().reshape(-1).to(torch.float64).cpu()
        if m is not None:
            m = m.reshape(-1).to(torch.bool).cpu()
            if m.numel() != v.numel():
                raise PrunekitError(f"mask has {m.numel()} entries, the weight has {v.numel()}: shapes must match")
            v = v[m]
        parts.append(v)
    return torch.cat(parts)


def _norm(v: torch.Tensor, r: float) -> float:
    return float(v.abs().pow(r).sum().pow(1.0 / r))


def pq_index(weights, p: float = 0.5, q: float = 1.0, masks=None) -> float:
    """I_{p,q}(w) = 1 - n_a^(1/q - 1/p) * ||w||_p / ||w||_q on the alive entries (float64).

    ``weights``: one tensor (layer scope) or several (a sequence or name->tensor mapping, concatenated: global
    scope); ``masks``: matching boolean masks (None = all alive). Values in (-1e-5, 0) are clipped to 0.
    Raises on p >= q, p <= 0, no entries, or no alive entries; returns 0 for an all-zero alive vector.
    """
    p, q = _check_pq(p, q)
    w = _alive_vector(weights, masks)
    n = w.numel()
    if n == 0:
        raise PrunekitError("PQ index of zero alive weights is undefined: every entry is masked out")
    nq = _norm(w, q)
    if nq == 0.0:
        return 0.0
    i = 1.0 - n ** (1.0 / q - 1.0 / p) * _norm(w, p) / nq
    if -1e-5 < i < 0.0:
        i = 0.0
    return i


def _pq(weights, p, q, eta, gamma, beta, masks) -> tuple[int, float]:
    p, q = _check_pq(p, q)
    eta, gamma, beta = float(eta), float(gamma), float(beta)
    if eta <= -1.0:
        raise PrunekitError(f"eta must be > -1 (seed value 0), got {eta}")
    if not 0.0 <= beta <= 1.0:
        raise PrunekitError(f"beta is the largest prune fraction and must be in [0, 1] (seed value 0.9), got {beta}")
    w = _alive_vector(weights, masks)
    n = w.numel()
    if n == 0 or _norm(w, q) == 0.0:
        return n, 0.0
    i = pq_index(w, p, q)
    m = math.ceil(round(n * (1.0 + eta) ** (-q / (q - p)) * (1.0 - i) ** (q * p / (q - p)), 9))
    frac = min(max(gamma * (1.0 - m / n), 0.0), beta)
    return n, frac


def pq_prune_fraction(weights, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                      beta: float = 0.9, masks=None) -> float:
    """clamp(gamma * (1 - m/n_a), 0, beta), m = ceil(n_a (1+eta)^(-q/(q-p)) (1-I)^(qp/(q-p))) (section 2.2).

    The fraction of the remaining (alive) weights to remove at this level. 0 when nothing is alive or the alive
    weights are all zero.
    """
    return _pq(weights, p, q, eta, gamma, beta, masks)[1]


def pq_prune_count(weights, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                   beta: float = 0.9, masks=None) -> int:
    """n_prune = floor(n_a * prune_frac): the number of alive weights removed at this level."""
    n, frac = _pq(weights, p, q, eta, gamma, beta, masks)
    return int(math.floor(round(n * frac, 9)))


def pq_level_masks(masks, model: nn.Module, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                   beta: float = 0.9, scope: str = "global") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The next level's masks with the PQ rule: (new masks, {group: n_prune}).

    Global scope ranks all masked tensors together (group name ``"global"``); layer scope applies the rule to each
    tensor on its own. Removal by ``lottery.level_masks`` (smallest abs, ties as pai.md 3.2), nested in ``masks``.
    """
    current = masks.as_dict() if isinstance(masks, Masks) else dict(masks)
    if not current:
        raise PrunekitError("no masks given: the model has nothing prunable")
    params = dict(model.named_parameters())
    missing = [n for n in current if n not in params]
    if missing:
        raise PrunekitError(f"mask {missing[0]!r} names no parameter of {type(model).__name__}")
    if scope == "global":
        groups = {"global": list(current)}
    elif scope == "layer":
        groups = {n: [n] for n in current}
    else:
        raise PrunekitError(f"unknown scope {scope!r}: use 'global' or 'layer'")
    new = {n: current[n].to(torch.bool).clone() for n in current}
    counts = {}
    for g, names in groups.items():
        sub = {n: current[n] for n in names}
        k = pq_prune_count({n: params[n] for n in names}, p, q, eta, gamma, beta, masks=sub)
        counts[g] = k
        alive = sum(int(current[n].to(torch.bool).sum()) for n in names)
        if k > 0:
            new.update(level_masks(sub, model, k / alive, scope="global"))
    return new, counts


# ----------------------------------------------------------------------------------------------------------------
# 4 Flow statistics


def _check_mode(mode: str) -> str:
    if mode not in STOP_MODES:
        raise PrunekitError(f"unknown stop_mode {mode!r}: use 'fixed' (default) or 'original' (seed 001)")
    return mode


def monitored_layers(model: nn.Module, mode: str = "fixed", exclude: Sequence[str] | None = None) -> list[str]:
    """Names of the Conv2d/Linear modules monitored by IF, in registration order, minus shortcut projections.

    ``original``: skip names containing "downsample"; ``fixed``: "downsample" or "shortcut" (or ``exclude``).
    """
    _check_mode(mode)
    if exclude is None:
        exclude = ("downsample",) if mode == "original" else ("downsample", "shortcut")
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(e in n for e in exclude)]


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def layer_activations(model: nn.Module, layers: Sequence[str], batches: Iterable) -> list[torch.Tensor]:
    """a_l(x) for every sample: one float64 [N, C_l] tensor per layer (outputs before BN/ReLU, spatial mean).

    Eval mode, no_grad; the model's training flag is restored.
    """
    mods = dict(model.named_modules())
    unknown = [n for n in layers if n not in mods]
    if unknown:
        raise PrunekitError(f"layer {unknown[0]!r} is not a module of {type(model).__name__}")
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name):
        def f(_m, _i, out):
            a = out.detach().to(torch.float64)
            if a.dim() > 2:
                a = a.mean(dim=tuple(range(2, a.dim())))
            store[name].append(a.cpu())
        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    seen = None
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if seen is None:
                    seen = _inputs(b)
                if distributed.owns(i):  # DDP: this rank's batches; the activations are gathered below
                    model(_inputs(b))
            if seen is not None and layers and not store[layers[0]]:
                model(seen[:0])  # a rank without a batch of its own still reports the layer widths
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not layers or seen is None:
        raise PrunekitError("no batches given: the flow statistic needs at least one batch")
    return [distributed.all_cat(torch.cat(store[n])) for n in layers]


def information_flow(model: nn.Module, batches: Iterable, layers: Sequence[str] | None = None,
                     stat: str = "mean", mode: str = "fixed") -> torch.Tensor:
    """rho = (rho_1, ..., rho_{L-1}): the IF statistic of each adjacent monitored pair (section 4.1 formulas).

    mu_l, sigma_l = population mean/std over all N samples (sigma clamped at 1e-6); z = (a - mu)/sigma;
    R_l = (1/N) sum_n z_l z_{l+1}^T; rho_l = mean(R_l) (``stat='mean'``), mean(abs(R_l)) (``'mean_abs'``) or
    ||R_l||_F / sqrt(C_l C_{l+1}) (``'fro'``). ``mode='original'`` allows only ``'mean'``. float64, NaN if R_l has one.
    ``batches``: tensors or (x, y) tuples (original: the training set; fixed: the flow batches of the validation split).
    """
    _check_mode(mode)
    if stat not in IF_STATS:
        raise PrunekitError(f"unknown if_stat {stat!r}: use one of {', '.join(IF_STATS)}")
    if mode == "original" and stat != "mean":
        raise PrunekitError("stop_mode 'original' uses the signed mean only: set if_stat: mean or stop_mode: fixed")
    layers = list(layers) if layers is not None else monitored_layers(model, mode)
    if len(layers) < 2:
        raise PrunekitError(f"information flow needs at least 2 monitored layers, got {len(layers)}")
    zs = []
    for a in layer_activations(model, layers, batches):
        mu = a.mean(0)
        sd = (a.pow(2).mean(0) - mu.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        zs.append((a - mu) / sd)
    n = zs[0].shape[0]
    out = []
    for z0, z1 in zip(zs[:-1], zs[1:]):
        r = z0.T @ z1 / n
        if torch.isnan(r).any():
            out.append(float("nan"))
        elif stat == "mean":
            out.append(float(r.mean()))
        elif stat == "mean_abs":
            out.append(float(r.abs().mean()))
        else:
            out.append(float(torch.linalg.norm(r) / math.sqrt(r.numel())))
    return torch.tensor(out, dtype=torch.float64)


def _mask_dict(masks) -> dict[str, torch.Tensor]:
    d = masks.as_dict() if isinstance(masks, Masks) else dict(masks)
    if not d:
        raise PrunekitError("no masks given: gradient flow needs the prunable tensors and their masks")
    return d


def gradient_flow(model: nn.Module, masks, batches: Iterable, stat: str = "mean_abs", loss_fn=None) -> torch.Tensor:
    """s_l = mean over batches of gf_stat(mask_l * dL/dW_l), one float64 entry per masked tensor (section 4.2).

    Per batch: eval-mode forward, ``loss_fn(output, y)`` (default mean cross-entropy), fresh gradients, masked.
    ``stat``: ``mean_abs`` (pruned entries count 0), ``mean_abs_alive`` (over alive entries; 0 if none) or ``fro``.
    Parameters, buffers and every ``.grad`` are left unchanged.
    """
    if stat not in GF_STATS:
        raise PrunekitError(f"unknown gf_stat {stat!r}: use one of {', '.join(GF_STATS)}")
    md = _mask_dict(masks)
    params = dict(model.named_parameters())
    missing = [n for n in md if n not in params]
    if missing:
        raise PrunekitError(f"mask {missing[0]!r} names no parameter of {type(model).__name__}")
    names = list(md)
    loss_fn = loss_fn or F.cross_entropy
    total = torch.zeros(len(names), dtype=torch.float64)
    nb = 0
    was_training = model.training
    model.eval()
    try:
        for i, b in enumerate(batches):
            if not isinstance(b, (tuple, list)) or len(b) < 2:
                raise PrunekitError("gradient flow needs labelled batches: pass (inputs, targets) pairs")
            nb += 1
            if not distributed.owns(i):  # DDP: this rank's batches; the sums are added below
                continue
            loss = loss_fn(model(b[0]), b[1])
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for j, (n, g) in enumerate(zip(names, grads)):
                m = md[n].to(device=params[n].device, dtype=torch.bool)
                g = torch.zeros_like(params[n]) if g is None else g
                total[j] += _gf_stat(g.detach().to(torch.float64) * m, m, stat)
    finally:
        model.train(was_training)
    distributed.all_sum(total)
    if nb == 0:
        raise PrunekitError("no batches given: the flow statistic needs at least one batch")
    return total / nb


def _gf_stat(g: torch.Tensor, m: torch.Tensor, stat: str) -> float:
    if stat == "mean_abs":
        return float(g.abs().mean())
    if stat == "fro":
        return float(torch.linalg.norm(g.reshape(-1)))
    k = int(m.sum())
    return float(g.abs().sum()) / k if k else 0.0


def gradient_flow_original(model: nn.Module, masks, num_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 001's GF statistic (section 4.1, defects kept): (g, n) from the STALE ``.grad`` of each masked tensor.

    g_l = B/(B-1) * mean(abs(grad_l)), n_l = B/(B-1) * ||grad_l||_F, B = ``num_batches`` (training batches per
    epoch). No backward pass. The seed's reference g* is ``g`` of the last warm-up mini-batch and each check uses
    ``n`` -- compare ``flow_distance(n_current, g_star)`` to reproduce its norm-vs-mean-abs mismatch.
    """
    md = _mask_dict(masks)
    params = dict(model.named_parameters())
    b = int(num_batches)
    if b < 2:
        raise PrunekitError(f"num_batches must be >= 2 (the seed scales by B/(B-1)), got {num_batches}")
    scale = b / (b - 1)
    g, nrm = [], []
    for n, m in md.items():
        if n not in params:
            raise PrunekitError(f"mask {n!r} names no parameter of {type(model).__name__}")
        gr = params[n].grad
        if gr is None:
            raise PrunekitError(f"{n!r} has no .grad: the original GF statistic reads the last training "
                                "mini-batch's gradient, so call it right after a training step")
        gr = gr.detach().to(torch.float64) * m.to(device=gr.device, dtype=torch.bool)
        g.append(scale * float(gr.abs().mean()))
        nrm.append(scale * float(torch.linalg.norm(gr.reshape(-1))))
    return torch.tensor(g, dtype=torch.float64), torch.tensor(nrm, dtype=torch.float64)


def flow_distance(current, reference) -> float:
    """||current - reference||_2 in float64; NaN if either has a NaN (the check then fails)."""
    c = torch.as_tensor(current, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
    if c.shape != r.shape:
        raise PrunekitError(f"flow statistic has {c.numel()} entries, the reference {r.numel()}: "
                            "use the same monitored layers/tensors for both")
    if torch.isnan(c).any() or torch.isnan(r).any():
        return float("nan")
    return float(torch.linalg.norm(c - r))


# ----------------------------------------------------------------------------------------------------------------
# 4.1 / 4.2 stopping rule


class StopRule:
    """Per-level stop rule, one :meth:`update` per chunk (sections 4.1 and 4.2).

    ``flow``: ``'if'``, ``'gf'`` or None (``stop: acc``: accuracy guard and cap only). ``epsilon`` defaults to
    0.1 (IF) / 0.5 (GF) in ``fixed`` mode and 1.0 in ``original`` mode. ``acc_ref`` is acc* (fixed: best validation
    accuracy of the dense level 0; original: max_acc, the best warm-up test accuracy).

    fixed: stop when (a) acc >= acc_ref - acc_tol (``acc_guard``), (b) D < epsilon at ``patience`` consecutive
    checks (a failed or NaN check resets the count), or (c) ``max_chunks`` chunks have run; never before
    ``min_chunks`` chunks (checks before that still count towards the patience window).
    original: the seed's loop -- stop when D < epsilon at one check (patience 1, no NaN), acc >= acc_ref
    (no tolerance), or ``max_chunks``; at least one chunk. When several rules fire at once the reason is the
    first of "accuracy", "flow", "max_chunks". After firing, :attr:`stopped_epoch`, :attr:`stopped_chunk`,
    :attr:`reason` are set and further updates return True without recording.
    """

    def __init__(self, mode: str = "fixed", flow: str | None = "if", epsilon: float | None = None,
                 patience: int = 2, min_chunks: int = 1, max_chunks: int = 20, acc_guard: bool = True,
                 acc_tol: float = 0.0, acc_ref: float | None = None):
        self.mode = _check_mode(mode)
        if flow not in ("if", "gf", None):
            raise PrunekitError(f"unknown flow {flow!r}: use 'if', 'gf' or None (accuracy stop only)")
        self.flow = flow
        if epsilon is None:
            epsilon = DEFAULT_EPSILON[mode][flow] if flow else float("nan")
        self.epsilon = float(epsilon)
        if flow and not self.epsilon > 0:
            raise PrunekitError(f"epsilon must be > 0, got {epsilon}")
        if mode == "original":
            patience, min_chunks, acc_tol = 1, 1, 0.0
        if int(patience) < 1 or int(min_chunks) < 1 or int(max_chunks) < int(min_chunks):
            raise PrunekitError(f"need patience >= 1 and 1 <= min_chunks <= max_chunks, got patience={patience}, "
                                f"min_chunks={min_chunks}, max_chunks={max_chunks}")
        self.patience, self.min_chunks, self.max_chunks = int(patience), int(min_chunks), int(max_chunks)
        self.acc_guard, self.acc_tol, self.acc_ref = bool(acc_guard), float(acc_tol), acc_ref
        self.chunks = 0
        self.streak = 0
        self.history: list[dict] = []
        self.stopped_epoch: float | None = None
        self.stopped_chunk: int | None = None
        self.reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def update(self, epoch, value_pruned=None, value_dense=None, acc: float | None = None) -> bool:
        """Record one check after a chunk ending at ``epoch``; True if the level should stop now.

        ``value_pruned``/``value_dense``: the current and reference flow statistics (vectors; D is their L2
        distance). ``acc``: the check's accuracy (validation in fixed mode).
        """
        if self.stopped:
            return True
        self.chunks += 1
        d = float("nan")
        if self.flow is not None:
            if value_pruned is None or value_dense is None:
                raise PrunekitError(f"StopRule(flow={self.flow!r}) needs value_pruned and value_dense")
            d = flow_distance(value_pruned, value_dense)
        passed = self.flow is not None and not math.isnan(d) and d < self.epsilon
        self.streak = self.streak + 1 if passed else 0
        acc_ok = (self.acc_guard and acc is not None and self.acc_ref is not None
                  and float(acc) >= float(self.acc_ref) - self.acc_tol)
        self.history.append({"epoch": epoch, "chunk": self.chunks, "distance": d, "acc": acc, "passed": passed})
        reason = None
        if self.chunks >= self.min_chunks:
            if acc_ok:
                reason = "accuracy"
            elif self.streak >= self.patience:
                reason = "flow"
        if reason is None and self.chunks >= self.max_chunks:
            reason = "max_chunks"
        if reason is not None:
            self.reason, self.stopped_epoch, self.stopped_chunk = reason, epoch, self.chunks
            return True
        return False
