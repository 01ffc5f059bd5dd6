"""Process statistics that workers report back, so scale runs can size their machines."""
from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: writing 5 to clear_refs resets the
    high-water mark to the current RSS). Ray reuses worker processes, so a task that calls this
    first reports its own peak, not the largest of every task its worker ran before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak stays the worker's lifetime peak


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last :func:`reset_peak_rss` (else since the process
    started): VmHWM on Linux, ru_maxrss elsewhere."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
