"""Process peak-memory helpers shared by the benchmarks (Linux /proc; callers fall back where it is missing)."""
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
    """A byte count from /proc/self/status (e.g. ``VmHWM``, ``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)
