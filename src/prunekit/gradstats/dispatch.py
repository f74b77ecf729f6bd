"""How :func:`prunekit.gradstats.grad_stats` routes the data: which engine handles which tensor
(:func:`_assign_engines`), the streams of mini-batches or micro-batches through the run (also across DDP ranks),
and the fallbacks of one piece from 'hooks' to 'vmap' to 'loop' (:func:`_piece`)."""
from __future__ import annotations

from torch import nn

from .. import distributed
from ..batches import BatchStream, DictInputs
from ..errors import PrunekitError
from ..params import PrunableParam
from .capture import Unsupported, _has_batchnorm, batch_coupled, gradient_edge, hook_kind
from .engines import _Run, _unique


def _assign_engines(model: nn.Module, params: list[PrunableParam], engine: str, mode: str,
                    has_sum_loss: bool) -> dict[str, str]:
    """Which engine ('hooks', 'vmap' or 'loop') handles which tensor, by name, before any fallback."""
    if mode == "train" or engine == "loop":
        return {p.name: "loop" for p in params}
    if engine == "vmap":
        return {p.name: "vmap" for p in params}
    assign: dict[str, str] = {}
    tied = {id(t) for t, names in _unique(params) if len(names) > 1}
    hookable = (gradient_edge is not None and not batch_coupled(model) and (has_sum_loss or engine == "hooks"))
    unsupported = []
    for p in params:
        ok = hookable and hook_kind(p.module) is not None and p.attr in ("weight", "bias") \
            and id(p.tensor) not in tied
        if not ok:
            unsupported.append(p.name)
        assign[p.name] = "hooks" if ok else "vmap"
    if engine == "hooks" and unsupported:
        raise PrunekitError(f"the hooks engine does not support {unsupported[0]!r} (only weights and biases of "
                            "nn.Linear, nn.Conv1d and nn.Conv2d, each used once per forward); use engine='auto' "
                            "or 'vmap'")
    return assign


# DDP, both streams below: every rank reads the same data and handles every world-size-th mini-batch (or piece of
# whole mini-batches); the sums and counts are then added over the ranks (prunekit.distributed)


def _accumulate_micro_batches(run: _Run, stream: BatchStream, max_chunk: int) -> tuple[int, int]:
    """Eval mode with B > max_chunk: each mini-batch as micro-batches of at most ``max_chunk`` samples whose
    summed-loss gradients are added and divided by |b|. Returns (samples, mini-batches) read."""
    B = run.B
    n_samples = n_batches = 0
    index = 0
    while True:
        carry, got, ours = None, 0, distributed.owns(index)
        while got < B:
            piece = stream.take(min(max_chunk, B - got))
            if piece is None:
                break
            if ours:
                s = run.summed(*piece)
                carry = s if carry is None else {k: carry[k] + s[k] for k in carry}
            got += piece[0].shape[0]
        if got == 0:
            break
        if ours:
            for name, v in carry.items():
                run._add(name, (v / got).unsqueeze(0))
        n_samples += got
        n_batches += 1
        index += 1
        if got < B:
            break
    run.used = ["batched"]
    return n_samples, n_batches


def _accumulate_pieces(run: _Run, stream: BatchStream, assign: dict[str, str], engine: str, mode: str,
                       max_chunk: int) -> tuple[int, int]:
    """Pieces of whole mini-batches (one mini-batch in train mode, up to ``max_chunk`` samples in eval mode), each
    through the assigned engines. Returns (samples, mini-batches) read."""
    B = run.B
    size = B if mode == "train" else B * max(1, max_chunk // B)
    n_samples = n_batches = 0
    index = 0
    while (piece := stream.take(size)) is not None:
        x, y = piece
        n = x.shape[0]
        if mode == "train" and n % B == 1 and _has_batchnorm(run.model):
            raise PrunekitError(f"mode='train': the last mini-batch holds a single sample ({n_samples + n} "
                                f"samples, batch_size={B}) and BatchNorm would see one value per channel; "
                                "use a sample count that leaves no mini-batch of one, or mode='eval'")
        if distributed.owns(index):
            _piece(run, x, y, run.params, assign, engine)
        index += 1
        n_samples += n
        n_batches += -(-n // B)
    return n_samples, n_batches


def _piece(run: _Run, x, y, params, assign: dict[str, str], engine: str) -> None:
    """Processes one piece of whole mini-batches with the assigned engines, moving tensors to a fallback on need.
    Dict batches (transformers models called as ``model(**batch)``) always take the loop engine."""
    if isinstance(x, DictInputs):
        run.loop(x, y, params)
        return
    hooks = [p for p in params if assign[p.name] == "hooks"]
    if hooks:
        try:
            run.hooks(x, y, hooks)
        except Unsupported as e:
            mods = e.args[0]
            if engine == "hooks":
                raise PrunekitError(f"the hooks engine cannot handle module {type(mods[0]).__name__} in this model "
                                    "(called more than once per forward, an input modified in place, or samples not "
                                    "along dimension 0); use engine='auto' or 'vmap'") from None
            for p in hooks:
                if p.module in mods:
                    assign[p.name] = "vmap"
            hooks = [p for p in params if assign[p.name] == "hooks"]
            if hooks:
                run.hooks(x, y, hooks)
    vm = [p for p in params if assign[p.name] == "vmap"]
    if vm:
        try:
            run.vmap(x, y, vm)
        except Exception:
            if engine != "auto":
                raise
            for p in vm:
                assign[p.name] = "loop"
    lp = [p for p in params if assign[p.name] == "loop"]
    if lp:
        run.loop(x, y, lp)
