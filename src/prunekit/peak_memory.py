"""The process's peak resident memory on Linux (``/proc``): reset its high-water mark, read a byte count. Shared by
the run records (:mod:`prunekit.experiments.measure`) and the benchmarks; callers fall back where ``/proc`` is
missing."""
from __future__ import annotations


def reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (e.g. ``VmHWM``, ``VmRSS``); KeyError when the line is missing, OSError
    without /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)
