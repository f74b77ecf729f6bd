"""The one place where prunekit talks to ``torch.distributed``: who am I, which share of the work is mine, and the
reductions that make every rank hold the same statistic.

Every data-dependent criterion sees the WHOLE scoring set on every rank (it is small and identical everywhere: the
scoring set is drawn from a seed), splits its own units of work (mini-batches, chunks of examples, blocks) with
:func:`mine`, computes its partial sums on its share, and combines them with :func:`all_sum` / :func:`all_max` /
:func:`all_cat`. Because the split follows the criterion's own units, the statistic equals the one-process
statistic over the same data (to floating-point summation order), and the criterion's semantics ("the first n
examples", "mini-batches of B") are unchanged. Scores are then made bit-identical on all ranks with
:func:`same_on_all` (rank 0's copy is broadcast), so every rank derives the identical mask.

Without an initialized process group (the usual single-process case) every helper is a no-op: ``mine`` keeps every
unit, the reductions return their inputs.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Was this process started by ``torchrun`` (or another launcher) as one of several ranks?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as ``torchrun`` announces it in the environment (0 outside torchrun), known before the
    process group is joined."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU training, nccl for CUDA (each rank on GPU
    ``LOCAL_RANK``). Returns whether a multi-rank group is active; a no-op without a launcher or when a group
    exists already."""
    if dist.is_initialized() or not launched():
        return active()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return active()


def active() -> bool:
    """Is there a process group with more than one rank?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the rank that writes checkpoints, run folders and the results store."""
    return rank() == 0


def owns(index: int) -> bool:
    """Does this rank handle unit ``index`` of a sequence of units (round robin)?"""
    return index % world_size() == rank()


def mine(units: Sequence[T]) -> list[T]:
    """This rank's units of ``units`` (round robin, as :func:`owns`)."""
    return [u for i, u in enumerate(units) if owns(i)]


def _device_for(t: torch.Tensor) -> torch.Tensor:
    """gloo reduces CPU tensors, nccl CUDA tensors: move there and back when needed."""
    backend = dist.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        return t.cuda()
    if backend == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def _in_place(tensors, collective) -> None:
    """``collective(buffer)`` on each tensor (None skipped), through a contiguous buffer on the backend's device
    whose result is copied back when it is not the tensor itself."""
    for t in tensors:
        if t is None:
            continue
        buf = _device_for(t.contiguous())
        collective(buf)
        if buf is not t:
            t.copy_(buf)


def all_sum(*tensors: torch.Tensor | None) -> None:
    """In place: every tensor becomes the sum of its copies over the ranks (None entries are skipped)."""
    if active():
        _in_place(tensors, lambda buf: dist.all_reduce(buf, op=dist.ReduceOp.SUM))


def all_max(*tensors: torch.Tensor | None) -> None:
    """In place: every tensor becomes the elementwise maximum of its copies over the ranks."""
    if active():
        _in_place(tensors, lambda buf: dist.all_reduce(buf, op=dist.ReduceOp.MAX))


def all_sum_optional(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Sums over the ranks of accumulators that a rank may not have started (None: it saw no data for them);
    a rank missing one contributes zeros of the shape another rank reports. Returns the summed list."""
    if not active():
        return tensors
    meta = [None if t is None else (tuple(t.shape), t.dtype, str(t.device)) for t in tensors]
    every = [None] * world_size()
    dist.all_gather_object(every, meta)
    out = []
    for i, t in enumerate(tensors):
        ref = next((m[i] for m in every if m[i] is not None), None)
        if ref is None:
            out.append(None)
            continue
        if t is None:
            t = torch.zeros(ref[0], dtype=ref[1], device=ref[2])
        all_sum(t)
        out.append(t)
    return out


def sum_int(value: int | float) -> int | float:
    """A Python number summed over the ranks (counts of samples, of mini-batches, of passes)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    all_sum(t)
    return int(t.item()) if isinstance(value, int) else float(t.item())


def all_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may differ by rank)."""
    if not active():
        return t
    n = torch.tensor([t.shape[dim]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, _device_for(n))
    sizes = [int(s.item()) for s in sizes]
    big = max(sizes)
    pad = list(t.shape)
    pad[dim] = big - t.shape[dim]
    local = _device_for(torch.cat([t, t.new_zeros(pad)], dim) if pad[dim] else t.contiguous())
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim).to(t.device)


def same_on_all(*tensors: torch.Tensor | None) -> None:
    """In place: rank 0's values everywhere, so that ranks whose reductions rounded differently still agree bit for
    bit (masks derived from these tensors are then identical on every rank)."""
    if active():
        _in_place(tensors, lambda buf: dist.broadcast(buf, src=0))


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
