"""Argument checks shared by the model builders; every failure is a one-line :class:`PrunekitError`."""
from __future__ import annotations

import math
from typing import Sequence

from prunekit.errors import PrunekitError


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` as an int, which must be at least 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise PrunekitError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` (one sample, no batch dimension) as a tuple of positive ints."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise PrunekitError(f"input_shape must be a tuple of positive integers, got {shape!r}") from None
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise PrunekitError(f"input_shape must be a tuple of positive integers, got {shape!r}")
    return dims


def check_image_shape(model: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a (channels, height, width) tuple of positive ints."""
    dims = check_shape(shape)
    if len(dims) != 3:
        raise PrunekitError(f"{model} needs an input_shape (channels, height, width), got {shape!r}")
    return dims  # type: ignore[return-value]


def flat_size(shape: Sequence[int]) -> int:
    """Number of features once one sample of ``shape`` is flattened."""
    return math.prod(check_shape(shape))
