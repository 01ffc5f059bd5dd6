"""Chaos: a Ray worker killed with SIGKILL in the middle of a long stage is retried by Ray, and the stage
finishes with the same bytes as an undisturbed run. Here the neighbors stage (actors, which Ray does not
restart unless asked); benchmarks/chaos.py kills a worker in every stage of the job and removes a node of
a two-node cluster. The worker is found by its process title (Ray names an actor's process
``ray::<class>``) among this process's descendants, and killed by PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import open_location
from pipelines.stages.build import STAGES
from pipelines.stages.build_config import BuildConfig

pytestmark = pytest.mark.usefixtures("ray_local")


class Killer(threading.Thread):
    """SIGKILLs the first descendant of this process whose title starts with ``ray::<name>``."""

    def __init__(self, name: str, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.title, self.timeout = f"ray::{name}", timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process(os.getpid())
        deadline = time.time() + self.timeout
        while not self.stop.is_set() and time.time() < deadline:
            for p in me.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith(self.title):
                        os.kill(p.pid, signal.SIGKILL)
                        self.killed = p.pid
                        return
                except (psutil.Error, OSError):
                    continue
            time.sleep(0.01)


def config(corpus: Path, out: Path) -> BuildConfig:
    return BuildConfig(corpus=[str(corpus)], out=str(out), seq_len=256, index_key="Flat", k=2, concurrency=2,
                       embed_batch_size=64, unit_mb=0.005)  # a part per file


def run_stages(cfg: BuildConfig, names: tuple[str, ...]) -> None:
    loc = open_location(cfg.out)
    for name in names:
        STAGES[name](cfg, loc, cfg.corpus, 2)


def part_bytes(out: Path, folder: str) -> dict[str, bytes]:
    m = read_manifest(open_location(str(out)), folder)
    return {e["path"]: (out / folder / e["path"]).read_bytes() for e in m["parts"]}


def test_a_neighbors_worker_killed_mid_stage_is_restarted_and_the_parts_are_identical(tmp_path, plays):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in plays[:4]:
        (corpus / p.name).write_text(p.read_text()[:6_000])
    ref, chaos = tmp_path / "ref", tmp_path / "chaos"
    run_stages(config(corpus, ref), ("tokenize", "embed", "index", "neighbors"))
    shutil.copytree(ref, chaos, ignore=shutil.ignore_patterns("neighbors", "LATEST"))
    expected = part_bytes(ref, "neighbors/v0001")
    assert len(expected) >= 3  # several parts: the worker is killed with work still queued

    killer = Killer("NeighborsWorker")
    killer.start()
    try:
        run_stages(config(corpus, chaos), ("neighbors",))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no neighbors worker was seen"
    assert not psutil.pid_exists(killer.killed) or psutil.Process(killer.killed).status() == psutil.STATUS_ZOMBIE
    assert part_bytes(chaos, "neighbors/v0001") == expected
    published = [{k: v for k, v in json.loads((d / "LATEST").read_text()).items() if k != "published_at"}
                 for d in (chaos, ref)]
    assert published[0] == published[1]
