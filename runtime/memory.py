"""Process memory figures (torch-free): current and peak resident set, and a peak reset so one
phase of a long process (a training stage, a benchmark case) can be measured on its own."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (since start or the last ``reset_peak_rss``). VmHWM belongs
    to the process's own address space; ru_maxrss is only the fallback (not Linux) because it
    carries the parent's RSS across fork + exec and cannot be reset."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return round(kb / 1024, 1)


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else peak_rss_mb()


def reset_peak_rss() -> bool:
    """Set the peak to the current RSS (Linux: ``5`` into /proc/self/clear_refs). False where the
    platform cannot, in which case ``peak_rss_mb`` stays the whole-process peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
