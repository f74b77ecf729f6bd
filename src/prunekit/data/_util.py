"""Small internals shared by the data modules: seed mixing and a restricted unpickler."""
from __future__ import annotations

import io
import pickle
from typing import IO

import torch

from ..errors import PrunekitError

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finalizer), so that e.g. (seed, epoch) pairs give
    unrelated streams rather than overlapping ones like ``seed + epoch`` would."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def generator(*values: int) -> torch.Generator:
    """A local CPU generator seeded from ``values`` (never touches the global RNG)."""
    return torch.Generator().manual_seed(mix_seed(*values))


def check_seed(seed, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunekitError(f"{what} must be an integer, got {seed!r}: pass e.g. {what}=0")
    return seed


def _numpy_globals() -> dict[tuple[str, str], object]:
    import numpy as np

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes with pickle protocol < 3 as _codecs.encode(str, 'latin1').
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    allowed[("builtins", "bytes")] = bytes
    allowed[("__builtin__", "bytes")] = bytes
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a pickle of numpy arrays, lists, dicts and bytes needs, so that a
    tampered dataset file cannot run code."""

    def __init__(self, file: IO[bytes], *, encoding: str, source: str):
        super().__init__(file, encoding=encoding)
        self._allowed = _numpy_globals()
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PrunekitError(f"refusing to unpickle {module}.{name} from {self._source}: the file is not a "
                                f"standard dataset archive; replace it with the original one") from None


def safe_unpickle(data: bytes | IO[bytes], *, encoding: str, source: str):
    """Load a pickle of numpy arrays / builtins; any other global raises :class:`PrunekitError`."""
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return _ArrayUnpickler(fh, encoding=encoding, source=source).load()
