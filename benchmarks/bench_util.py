"""Shared by the stage benchmarks: run a stage in a fresh process with its own local Ray instance.

Ray's start-up (``ray.init``, one warm worker per CPU with the stage modules imported, and one trivial
Ray Data pass, since the first execution of a fresh cluster pays seconds of fixed set-up) is done before
the clock starts, so the figures are the stage's own, as the issues ask.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PREAMBLE = """
import json, sys, time, ray
sys.path.insert(0, {root!r})
from pipelines.runtime.ray_session import init_ray
from pipelines.artifacts.storage import open_location
init_ray(num_cpus={cpus})
@ray.remote(num_cpus=1)
def warm():
    import {imports}
    time.sleep(0.5)
ray.get([warm.remote() for _ in range({cpus})])
# Ray Data's first execution in a fresh cluster costs seconds of fixed set-up (executor, worker-side
# imports) whatever the stage: it is start-up too, so one trivial pass runs before the clock
import ray.data
ray.data.range({cpus} * 2, override_num_blocks={cpus} * 2).map_batches(
    lambda b: b, batch_size=1, compute=ray.data.TaskPoolStrategy(size={cpus})).take_all()
"""


def run_in_fresh_ray(body: str, cpus: int, imports: str) -> dict:
    """Run ``body`` after the preamble; it must print one line ``RESULT <json>``, which is returned."""
    code = _PREAMBLE.format(root=ROOT, cpus=cpus, imports=imports) + body
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(lines[0][len("RESULT "):])


def write_result(result: dict, path: str) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
