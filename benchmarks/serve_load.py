"""Load on `jobs.serve`: requests/s and p50/p99 latency with 8 and 64 concurrent clients, and the requests that fail
while the build is re-published under load.

    .venv/bin/python benchmarks/serve_load.py --data artifacts/demo                   # after `make demo`
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --data artifacts/demo --no-republish

By default the script copies the build (a local folder) to a temporary folder, starts the service on the copy
(a local Ray instance on loopback, one replica), and then:

1. for each --clients level, runs that many clients for --seconds, each sending `POST /search` with a real text
   (the opening of a chunk of the build, chosen at random) and k=--k as soon as its previous answer came;
2. re-publishes the copy under load (--republish-clients clients): a new index version with the same key and
   one more --extra-neighbors, then a new neighbors version, which moves LATEST; it waits for `GET /version` to
   name the new versions, keeps the load on for --after-seconds, and counts the requests that failed.

With --url it measures a service already running (the levels only: it does not touch a build it does not own;
--data then only supplies the query texts). Clients are asyncio tasks over aiohttp (one connection each), in
this process, so on a small machine they share the CPUs with the service: the figures are for the whole loop.
Writes benchmarks/results/serve_load.json (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "artifacts" / "demo"


def query_texts(data: str, n: int, seed: int = 0) -> list[str]:
    """The openings of ``n`` random live chunks of the build: real text, as a user would quote it."""
    from pipelines.artifacts.build_reader import BuildReader
    from pipelines.text.tokenizer import load_tokenizer

    reader = BuildReader(data)
    tokenizer = load_tokenizer(reader.tokenizer.get("name", "packaged:all-MiniLM-L6-v2")).tokenizer
    rng = np.random.default_rng(seed)
    ids = rng.choice(reader.n_chunks, min(n, reader.n_chunks), replace=False)
    ids = ids[~reader.dead(ids)]
    tokens, _ = reader.gather(np.sort(ids))
    texts = [tokenizer.decode([int(t) for t in row[:reader.chunk_size] if t], skip_special_tokens=True) for row in tokens]
    return [t for t in texts if t.strip()]


async def client(session, url: str, texts: list[str], k: int, until: list[float], seed: int, log: list) -> None:
    """Send searches back to back until ``until[0]`` (a shared deadline that may move); log (latency s, ok,
    index version) per request."""
    import aiohttp

    rng = np.random.default_rng(seed)
    while time.monotonic() < until[0]:
        body = {"text": texts[int(rng.integers(len(texts)))], "k": k}
        start = time.perf_counter()
        try:
            async with session.post(f"{url}/search", json=body) as r:
                answer = await r.json()
                ok = r.status == 200 and len(answer["results"]) > 0
                version = answer.get("versions", {}).get("index") if ok else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            ok, version = False, None
        log.append((time.perf_counter() - start, ok, version))


async def run_clients(url: str, texts: list[str], k: int, clients: int, seconds: float, stop: threading.Event | None = None
                      ) -> list[tuple[float, bool, str | None]]:
    """``clients`` concurrent clients for ``seconds``, or until ``stop`` is set; a request in flight then is
    finished and counted."""
    import aiohttp

    log: list = []
    until = [time.monotonic() + seconds]
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session, url, texts, k, until, i, log)) for i in range(clients)]
        if stop is not None:
            while not stop.is_set() and time.monotonic() < until[0]:
                await asyncio.sleep(0.1)
            until[0] = time.monotonic()
        await asyncio.gather(*tasks)
    return log


def summarize(log: list, clients: int, seconds: float) -> dict:
    ms = np.asarray([lat for lat, ok, _ in log if ok]) * 1000
    failed = sum(1 for _, ok, _ in log if not ok)
    return {"clients": clients, "seconds": round(seconds, 1), "requests": len(log), "failed": failed,
            "requests_per_s": round(len(ms) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def measure_level(url: str, texts: list[str], k: int, clients: int, seconds: float) -> dict:
    asyncio.run(run_clients(url, texts, k, clients, min(2.0, seconds)))  # warm-up: connections, first batches
    start = time.monotonic()
    log = asyncio.run(run_clients(url, texts, k, clients, seconds))
    return summarize(log, clients, time.monotonic() - start)


def version_of(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/version", timeout=30) as r:
        return json.loads(r.read())


def republish(data: str) -> dict:
    """A new index version (same key, one more extra neighbor) and a new neighbors version on it: LATEST moves."""
    from pipelines.artifacts.manifest import read_manifest
    from pipelines.artifacts.storage import open_location
    from pipelines.artifacts.versions import resolve_latest
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors

    out = open_location(data)
    latest = resolve_latest(out)
    m = read_manifest(out, f"index/{latest['index']}")
    extra = int(m.get("extra_neighbors", 10)) + 1
    s = run_index(out=out, index_key=m["index_key"], metric=m["metric"], k=int(latest["k"]), extra_neighbors=extra)
    run_neighbors(out=out, index_version=s.version, k=int(latest["k"]), extra_neighbors=extra)
    return resolve_latest(out)


def measure_republish(url: str, data: str, texts: list[str], k: int, clients: int, after_s: float) -> dict:
    """Load while ``data`` is re-published; ends ``after_s`` after the service names the new versions."""
    before = version_of(url)
    stop = threading.Event()
    result: dict = {}

    def publisher() -> None:
        try:
            start = time.monotonic()
            new = republish(data)
            result["publish_seconds"] = round(time.monotonic() - start, 1)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and version_of(url)["index"] != new["index"]:
                time.sleep(0.1)
            result["switch_seconds"] = round(time.monotonic() - start - result["publish_seconds"], 1)
            result["to"] = {"index": new["index"], "neighbors": new["neighbors"]}
            time.sleep(after_s)
        finally:
            stop.set()

    thread = threading.Thread(target=publisher)
    start = time.monotonic()
    thread.start()
    log = asyncio.run(run_clients(url, texts, k, clients, 3600, stop))
    thread.join()
    by_version: dict[str, int] = {}
    for _, ok, version in log:
        if ok:
            by_version[version] = by_version.get(version, 0) + 1
    return {**summarize(log, clients, time.monotonic() - start), "from": {"index": before["index"],
            "neighbors": before["neighbors"]}, **result, "answered_by_index_version": by_version}


def start_local_service(data: str, replicas: int, cpus_per_replica: float, max_batch_size: int) -> str:
    from pipelines.inference.serve import check_build, start_service
    from pipelines.inference.serve_config import ServeConfig
    from pipelines.runtime.ray_session import init_ray

    init_ray()
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig(data=data, port=port, replicas=replicas, cpus_per_replica=cpus_per_replica,
                      max_batch_size=max_batch_size, follow_seconds=1.0)
    return start_service(cfg, check_build(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO) if DEMO.exists() else None, required=not DEMO.exists(),
                    help="a published build (default ./artifacts/demo when it exists)")
    ap.add_argument("--url", default="", help="measure this running service instead of starting one (no re-publish)")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--seconds", type=float, default=20.0, help="per level")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--cpus-per-replica", type=float, default=0.0,
                    help="CPUs a replica reserves; 0 here because the re-publish's neighbors stage sizes its actors "
                         "from all the node's CPUs and would wait for the replica's forever on one machine")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--republish", action=argparse.BooleanOptionalAction, default=True,
                    help="re-publish a copy of the build under load and count failed requests")
    ap.add_argument("--republish-clients", type=int, default=8)
    ap.add_argument("--after-seconds", type=float, default=3.0, help="load kept on after the switch")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    texts = query_texts(args.data, 256)
    work = None
    data = args.data
    if not args.url and args.republish:
        work = tempfile.mkdtemp(prefix="serve_load-")
        data = os.path.join(work, "build")
        shutil.copytree(args.data, data)
    url = args.url.rstrip("/") or start_local_service(data, args.replicas, args.cpus_per_replica, args.max_batch_size)
    result = {"benchmark": "serve_load", "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "build": args.data, "service": "given --url" if args.url else "started here",
              "replicas": args.replicas, "max_batch_size": args.max_batch_size, "k": args.k,
              "cpus": os.cpu_count(), "versions": version_of(url)}
    try:
        result["levels"] = [measure_level(url, texts, args.k, c, args.seconds) for c in args.clients]
        if work:
            result["republish"] = measure_republish(url, data, texts, args.k, args.republish_clients, args.after_seconds)
    finally:
        if not args.url:
            from pipelines.inference.serve import stop_service

            stop_service()
        if work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
