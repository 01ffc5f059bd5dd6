"""A local Ray instance is quiet by default: no token-auth warning at start (auth stays on), no warnings from the loggers Ray repeats
on a local instance (Ray Train's placement-group cleaner), while their errors still reach the driver; and
RETROFORGE_RAY_LOGS=1 brings the warnings back. Each case runs in its own process (its own Ray instance)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = """
import logging, time, ray
from pipelines.runtime.ray_session import QUIET_LOGGERS, init_ray
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def speak():
    quiet = logging.getLogger(QUIET_LOGGERS[0])
    quiet.warning("QUIET-WARNING from the cleaner")
    quiet.error("QUIET-ERROR from the cleaner")
    logging.getLogger("retroforge.test").warning("OTHER-WARNING")
    return 1

ray.get(speak.remote())
time.sleep(2)  # log lines reach the driver asynchronously
ray.shutdown()
"""


def run(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RETROFORGE_RAY_LOGS")}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env | extra_env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_local_ray_is_quiet_but_shows_errors(verbose):
    out = run({"RETROFORGE_RAY_LOGS": "1"} if verbose else {})
    assert ("Token authentication is enabled" in out) == verbose  # auth stays on; only its warning is hidden
    assert "QUIET-ERROR from the cleaner" in out and "OTHER-WARNING" in out
    assert ("QUIET-WARNING from the cleaner" in out) == verbose, out[-3000:]
