"""User-facing errors.

Every mistake a user can make (unknown method, bad sparsity, malformed config, missing dataset, ...) raises a
:class:`PrunekitError` whose message is one line that names the problem and the fix. The CLI prints that line and
exits with status 2 instead of showing a traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class PrunekitError(ValueError):
    """A user error with a one-line message that says what is wrong and how to fix it."""


class ConfigError(PrunekitError):
    """A malformed or invalid experiment configuration."""


class DatasetMissingError(PrunekitError):
    """A dataset that is not in the data directory; the message names the command that fetches it."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The up-to-``n`` entries of ``choices`` closest to ``name`` (case-insensitive)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    key = name.lower()
    # prefixes and substrings first (short names such as "wood" or "lenet"), then fuzzy matches for typos
    hits = [c for c in lowered if c.startswith(key)] + [c for c in lowered if key in c and not c.startswith(key)]
    for h in difflib.get_close_matches(key, list(lowered), n=n, cutoff=0.5):
        if h not in hits:
            hits.append(h)
    return [lowered[h] for h in hits[:n]]


def unknown(kind: str, name: str, choices: Iterable[str]) -> PrunekitError:
    """Error for an unknown ``kind`` (method, model, dataset, ...) that suggests close names."""
    choices = sorted(choices)
    near = closest(name, choices)
    hint = f"did you mean {', '.join(repr(h) for h in near)}?" if near else f"choose one of: {', '.join(choices)}"
    return PrunekitError(f"unknown {kind} {name!r}: {hint}")


def is_count(value, minimum: int = 1) -> bool:
    """True for an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
