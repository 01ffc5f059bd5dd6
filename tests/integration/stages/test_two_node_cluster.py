"""A two-node Ray cluster on loopback (head on 127.0.0.2, worker on 127.0.0.3, one CPU each), and a
build submitted to it the way cluster.yaml's users submit it: `ray job submit --working-dir . --
python -m jobs.build_index ...`. The Ray state API then shows the build's stages ran on both nodes.

Token auth is off for this loopback-only test cluster (RAY_AUTH_MODE=disabled); cluster.yaml keeps
it on. Both nodes are started with `ray start --block` in their own sessions and stopped by PID
(the `ray start` process, its descendants and its session), never with `ray stop`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # starts its own two-node cluster

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))


def _bindable(ip: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _ports(n: int) -> list[int]:
    """n distinct free ports (bound together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0"})
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the `ray start --block` process, every descendant and every process of its session."""
    victims = {}
    try:
        root = psutil.Process(proc.pid)
        victims[root.pid] = root
        for c in root.children(recursive=True):
            victims[c.pid] = c
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                victims[p.pid] = p
        except (OSError, psutil.Error):
            continue
    for p in victims.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=30)
    if proc.poll() is None:
        proc.wait(10)


def _wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last!r})")


def _state(dashboard: str, kind: str) -> list[dict]:
    r = subprocess.run([RAY, "list", kind, "--address", dashboard, "--detail", "--format", "json", "--limit", "10000"],
                       env=_env(), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def cluster():
    if not (_bindable(HEAD) and _bindable(WORKER)):
        pytest.skip(f"cannot bind the loopback addresses {HEAD} and {WORKER} on this machine")
    tmp = tempfile.mkdtemp(prefix="rf2n-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    gcs, dash, client, h_nm, h_om, h_me, h_ag, h_agg, h_rt, w_nm, w_om, w_me, w_ag, w_agg, w_rt = _ports(15)
    base_worker_port = 20000 + (os.getpid() % 200) * 100
    head_cmd = [RAY, "start", "--head", "--block", "--node-ip-address", HEAD, "--port", str(gcs), "--num-cpus", "1",
                "--include-dashboard", "true", "--dashboard-host", HEAD, "--dashboard-port", str(dash),
                "--ray-client-server-port", str(client), "--node-manager-port", str(h_nm),
                "--object-manager-port", str(h_om), "--metrics-export-port", str(h_me),
                "--dashboard-agent-listen-port", str(h_ag), "--dashboard-agent-grpc-port", str(h_agg),
                "--runtime-env-agent-port", str(h_rt), "--min-worker-port", str(base_worker_port),
                "--max-worker-port", str(base_worker_port + 49), "--temp-dir", os.path.join(tmp, "ray"),
                "--disable-usage-stats"]
    worker_cmd = [RAY, "start", "--block", "--address", f"{HEAD}:{gcs}", "--node-ip-address", WORKER, "--num-cpus", "1",
                  "--node-manager-port", str(w_nm), "--object-manager-port", str(w_om),
                  "--metrics-export-port", str(w_me), "--dashboard-agent-listen-port", str(w_ag),
                  "--dashboard-agent-grpc-port", str(w_agg), "--runtime-env-agent-port", str(w_rt),
                  "--min-worker-port", str(base_worker_port + 50), "--max-worker-port", str(base_worker_port + 99),
                  # its own session folder: one shared by two nodes on one machine lets the worker's runtime-env
                  # agent delete the job's working_dir under the head's driver when it cleans up its copy
                  "--temp-dir", os.path.join(tmp, "ray-w"), "--disable-usage-stats"]
    logs = Path(tmp)
    procs = []
    dashboard = f"http://{HEAD}:{dash}"
    try:
        procs.append(subprocess.Popen(head_cmd, env=_env(), start_new_session=True, stdout=open(logs / "head.log", "wb"),
                                      stderr=subprocess.STDOUT))
        _wait_for(lambda: urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).status == 200, 120, "the head")
        procs.append(subprocess.Popen(worker_cmd, env=_env(), start_new_session=True,
                                      stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT))
        nodes = _wait_for(lambda: (n := [x for x in _state(dashboard, "nodes") if x["state"] == "ALIVE"]) and
                          len(n) == 2 and n, 300, "the worker node")
        yield {"dashboard": dashboard, "nodes": {n["node_id"]: n["node_ip"] for n in nodes}, "tmp": tmp}
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_build_submitted_with_ray_job_submit_runs_on_both_nodes(cluster, plays, tmp_path):
    assert sorted(cluster["nodes"].values()) == [HEAD, WORKER]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in plays[:4]:  # 4 work units (--unit-mb 0.01): tokenize tasks for both nodes
        (corpus / p.name).write_text(p.read_text()[:12_000])
    out = tmp_path / "out"
    r = subprocess.run([RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
                        "python", "-m", "jobs.build_index", "--corpus", str(corpus), "--out", str(out),
                        "--seq-len", "256", "--unit-mb", "0.01", "--embed-batch-size", "64"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=540)
    if r.returncode != 0 or "succeeded" not in r.stdout:
        pytest.fail(f"the job failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}", pytrace=False)
    assert "neighbors: v0001 from index v0001" in r.stdout and (out / "LATEST").exists()

    stages = [line for line in r.stdout.splitlines() if line.startswith(("tokenize:", "embed:", "index:", "neighbors:"))]
    ip_of = cluster["nodes"]
    tasks = _state(cluster["dashboard"], "tasks")
    actors = _state(cluster["dashboard"], "actors")

    def ips(rows, match) -> set[str]:
        return {ip_of.get(row.get("node_id"), "?") for row in rows if match(row)}

    tokenize = ips(tasks, lambda t: t["name"].endswith("tokenize_task") or t["name"].endswith("finalize_task"))
    embed = ips(tasks, lambda t: t["name"].endswith("embed_part_task"))
    everything = ips(tasks, lambda t: t.get("node_id")) | ips(actors, lambda a: a.get("node_id"))
    print(f"tokenize tasks ran on {sorted(tokenize)}; embed tasks on {sorted(embed)}; all tasks and actors of the "
          f"build on {sorted(everything)}")
    assert tokenize == {HEAD, WORKER}, sorted({t["name"] for t in tasks})  # the tokenize stage used both nodes
    assert embed == {HEAD, WORKER}, stages  # its first wave is pinned one part per node, so both embed
    assert everything == {HEAD, WORKER}
