"""Process statistics that workers report back, so scale runs can size their machines."""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process' peak resident memory so far, in MiB (Ray reuses worker processes, so for a
    task this is the peak of its worker, which bounds the task's own peak)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
