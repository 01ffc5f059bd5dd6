"""Every GPU figure of issues 17, 18 and 19 in one run, for a short lease on a GPU machine.

    python benchmarks/gpu_speed.py [--small] [--device cuda] [--json $OUT/gpu_speed.json]

Runs the kernel (gpu_kernels_speed), neighbor-search (gpu_neighbors_speed) and RETRO (gpu_retro_speed)
benchmarks one after the other on the same device; a section that fails is recorded with its error so
the others still report. Imports only torch, numpy and the project (no Ray, no faiss).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_kernels_speed, gpu_neighbors_speed, gpu_retro_speed  # noqa: E402
from benchmarks.gpu_timing import device_main  # noqa: E402

SECTIONS = {"kernels": gpu_kernels_speed.run, "neighbors": gpu_neighbors_speed.run, "retro": gpu_retro_speed.run}


def run(device: str, small: bool) -> dict:
    result: dict = {}
    for name, section in SECTIONS.items():
        t = time.perf_counter()
        try:
            result[name] = section(device, small)
        except Exception:  # noqa: BLE001 - one broken section must not cost the lease's other figures
            result[name] = {"error": traceback.format_exc(limit=5)}
        result[name + "_seconds"] = round(time.perf_counter() - t, 1)
        print(f"gpu_speed: {name} done in {result[name + '_seconds']} s", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    device_main(run, __doc__.splitlines()[0], "benchmarks/results/gpu_speed.json")
