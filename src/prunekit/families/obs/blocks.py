"""Block layouts of the OBS family (second_order.md §4).

A layout cuts the columns of the gradient matrix G into contiguous blocks; the Fisher is approximated as
block-diagonal over them. Columns are the prunable weights in flat order (each tensor flattened row-major,
tensors in registration order), or, for the dynamic layout, only the ACTIVE weights in that order
(``BlockLayout.columns`` maps each column to its flat index).

- ``layer`` (``woodfisherblock``): blocks never cross tensors; each tensor is cut into chunks of ``block_size``
  (the last may be shorter); ``block_size=None`` = the whole tensor.
- ``global`` (``woodfisherblockgroup``): chunks of ``block_size`` over the concatenated vector, so a block may
  straddle two tensors; ``block_size=None`` = one block of all d weights (= ``full``).
- ``full`` (``woodfisher``): one block of all d weights.
- ``dynamic`` (``woodfisherblockdynamic``): the layer (or global) rule over the active weights only, with the block
  size grown by :func:`dynamic_block_size`.

Blocks of equal size are processed together (:meth:`BlockLayout.batches`): a batch gathers them into one
[nb, N, c] tensor (a view when they are evenly spaced, e.g. the full chunks of one tensor) for batched kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ...errors import PrunekitError, is_count

LAYOUTS = ("layer", "global", "full", "dynamic")


@dataclass(frozen=True)
class Block:
    start: int  # first column (of G) of the block
    size: int
    tensor: int | None  # index of the prunable tensor holding it (None when it straddles tensors)


@dataclass
class BlockBatch:
    """Equal-size blocks processed together. ``starts``: their first columns, ascending."""

    size: int
    starts: list[int]

    @property
    def count(self) -> int:
        return len(self.starts)

    def _even(self) -> bool:
        s = self.starts
        return all(s[i + 1] - s[i] == self.size for i in range(len(s) - 1))

    def is_view(self) -> bool:
        return self._even()

    def index(self, device=None) -> torch.Tensor:
        """Column indices [nb, c]."""
        st = torch.tensor(self.starts, dtype=torch.long, device=device)
        return st[:, None] + torch.arange(self.size, device=device)[None, :]

    def gather(self, G: torch.Tensor, device=None) -> torch.Tensor:
        """The blocks of G [N, d] as [nb, N, c] (a view for evenly spaced blocks, else a copy), on ``device``."""
        N = G.shape[0]
        nb, c = self.count, self.size
        if self._even():
            s0 = self.starts[0]
            out = G[:, s0: s0 + nb * c].reshape(N, nb, c).transpose(0, 1)
        else:
            out = torch.stack([G[:, s: s + c] for s in self.starts])
        return out if device is None else out.to(device)

    def gather_vec(self, v: torch.Tensor) -> torch.Tensor:
        """A column vector v [d] (or [d, r]) as [nb, c] (or [nb, c, r])."""
        nb, c = self.count, self.size
        if self._even():
            s0 = self.starts[0]
            return v[s0: s0 + nb * c].reshape(nb, c, *v.shape[1:])
        return torch.stack([v[s: s + c] for s in self.starts])

    def scatter_vec(self, dst: torch.Tensor, vals: torch.Tensor, add: bool = False) -> None:
        """Writes (or adds) vals [nb, c] into the columns of dst [d]."""
        nb, c = self.count, self.size
        if self._even():
            s0 = self.starts[0]
            view = dst[s0: s0 + nb * c].view(nb, c)
            if add:
                view += vals.to(dst.dtype)
            else:
                view.copy_(vals)
            return
        for i, s in enumerate(self.starts):
            if add:
                dst[s: s + c] += vals[i].to(dst.dtype)
            else:
                dst[s: s + c] = vals[i]

    def split(self, max_blocks: int) -> list["BlockBatch"]:
        m = max(1, int(max_blocks))
        return [BlockBatch(self.size, self.starts[i: i + m]) for i in range(0, self.count, m)]


@dataclass
class BlockLayout:
    """Contiguous blocks covering the columns [0, n_columns) of G."""

    kind: str
    blocks: list[Block]
    n_columns: int
    d_total: int
    block_size: int | None
    tensor_sizes: list[int]
    columns: torch.Tensor | None = None  # flat index of each column (None: column j = flat index j)
    skipped: list[int] = field(default_factory=list)  # tensors without active weights (dynamic layout)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def sizes(self) -> dict[int, int]:
        """{block size: number of blocks}."""
        out: dict[int, int] = {}
        for b in self.blocks:
            out[b.size] = out.get(b.size, 0) + 1
        return out

    def batches(self, max_blocks: int | Mapping[int, int] | None = None,
                active: torch.Tensor | None = None) -> list[BlockBatch]:
        """Equal-size blocks grouped into batches of at most ``max_blocks`` (an int or {size: int}; None = all of a
        size in one batch), in order of first appearance. ``active`` (bool [n_columns]): drop the blocks without an
        active column."""
        groups: dict[int, list[int]] = {}
        for b in self.blocks:
            if active is not None and not bool(active[b.start: b.start + b.size].any()):
                continue
            groups.setdefault(b.size, []).append(b.start)
        out: list[BlockBatch] = []
        for size, starts in groups.items():
            m = (max_blocks.get(size, len(starts)) if isinstance(max_blocks, Mapping)
                 else (len(starts) if max_blocks is None else max_blocks))
            out.extend(BlockBatch(size, starts).split(m))
        return out

    def describe(self) -> str:
        sizes = ", ".join(f"{n}×{c}" for c, n in sorted(self.sizes().items(), reverse=True))
        return f"{self.kind} layout: {self.n_blocks} block(s) over {self.n_columns} columns ({sizes})"


def _check_size(block_size: int | None) -> None:
    if block_size is not None and not is_count(block_size):
        raise PrunekitError(f"block_size must be a positive integer or null (whole tensor), got {block_size!r}")


def _chunk(start: int, n: int, c: int | None, tensor: int | None) -> list[Block]:
    if n <= 0:
        return []
    c = n if c is None else c
    return [Block(start + a, min(c, n - a), tensor) for a in range(0, n, c)]


def layer_layout(tensor_sizes: Sequence[int], block_size: int | None) -> BlockLayout:
    """Each tensor cut into contiguous chunks of ``block_size`` (None: one block per tensor)."""
    _check_size(block_size)
    blocks, off = [], 0
    for i, n in enumerate(tensor_sizes):
        blocks += _chunk(off, n, block_size, i)
        off += n
    return BlockLayout("layer", blocks, off, off, block_size, list(tensor_sizes))


def _owner(tensor_sizes: Sequence[int], start: int, size: int) -> int | None:
    off = 0
    for i, n in enumerate(tensor_sizes):
        if off <= start and start + size <= off + n:
            return i
        off += n
    return None


def global_layout(tensor_sizes: Sequence[int], block_size: int | None) -> BlockLayout:
    """Chunks of ``block_size`` over the concatenated vector (blocks may straddle tensors)."""
    _check_size(block_size)
    d = sum(tensor_sizes)
    blocks = [Block(b.start, b.size, _owner(tensor_sizes, b.start, b.size)) for b in _chunk(0, d, block_size, None)]
    return BlockLayout("global", blocks, d, d, block_size, list(tensor_sizes))


def full_layout(tensor_sizes: Sequence[int]) -> BlockLayout:
    """One block holding all d weights."""
    d = sum(tensor_sizes)
    lay = global_layout(tensor_sizes, None)
    lay.kind = "full"
    lay.block_size = d
    return lay


def dynamic_block_size(c0: int, d_total: int, d_active: int) -> int:
    """c_t = min(⌊c₀·d_total / d_active⌋, d_active): block memory (about c·d_active) stays about c₀·d_total.

    Counted model-wide. At least 1 (and c₀ when nothing is active)."""
    if d_active <= 0:
        return max(1, c0)
    return max(1, min(c0 * d_total // d_active, d_active))


def dynamic_layout(masks: Sequence[torch.Tensor], block_size: int | None, within: str = "layer") -> BlockLayout:
    """Blocks over the active weights only: in each tensor (``within='layer'``) or over the concatenation
    (``'global'``), the active indices in flat order cut into chunks of c_t = dynamic_block_size(block_size, …).

    ``masks``: one bool mask per prunable tensor, in order. ``block_size=None``: whole tensors (or one block)."""
    _check_size(block_size)
    if within not in ("layer", "global"):
        raise PrunekitError(f"blocks must be 'layer' or 'global', got {within!r}")
    sizes = [m.numel() for m in masks]
    flat = [m.reshape(-1).bool() for m in masks]
    d_total = sum(sizes)
    active_counts = [int(f.sum()) for f in flat]
    d_active = sum(active_counts)
    c = None if block_size is None else dynamic_block_size(block_size, d_total, d_active)
    cols, off = [], 0
    for f in flat:
        cols.append(torch.nonzero(f, as_tuple=True)[0].cpu() + off)
        off += f.numel()
    columns = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
    blocks, start = [], 0
    skipped = [i for i, n in enumerate(active_counts) if n == 0]
    if within == "layer":
        for i, n in enumerate(active_counts):
            blocks += _chunk(start, n, c, i)
            start += n
    else:
        blocks = [Block(b.start, b.size, _owner(active_counts, b.start, b.size))
                  for b in _chunk(0, d_active, c, None)]
    return BlockLayout("dynamic", blocks, d_active, d_total, c, sizes, columns, skipped)


def make_layout(masks: Sequence[torch.Tensor], *, blocks: str = "layer", block_size: int | None = None,
                dynamic: bool = False) -> BlockLayout:
    """The layout of an OBS code: ``dynamic`` -> :func:`dynamic_layout`; ``blocks='layer'`` ->
    :func:`layer_layout`; ``blocks='global'`` -> :func:`global_layout` (``block_size=None``: :func:`full_layout`)."""
    if dynamic:
        return dynamic_layout(masks, block_size, blocks)
    sizes = [m.numel() for m in masks]
    if blocks == "layer":
        return layer_layout(sizes, block_size)
    if blocks == "global":
        return full_layout(sizes) if block_size is None else global_layout(sizes, block_size)
    if blocks == "full":
        return full_layout(sizes)
    raise PrunekitError(f"blocks must be 'layer' or 'global', got {blocks!r}")


__all__ = ["Block", "BlockBatch", "BlockLayout", "layer_layout", "global_layout", "full_layout", "dynamic_layout",
           "dynamic_block_size", "make_layout", "LAYOUTS"]
