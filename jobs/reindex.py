"""Re-index: bring a published build (``python -m jobs.build_index``) up to date with its corpus.

    python -m jobs.reindex --corpus ./texts --out ./artifacts/mine
    python -m jobs.reindex --corpus ./texts --out ./artifacts/mine --every 6h      # a driver that keeps doing it

On a Ray cluster (credentials from the AWS_* environment, never flags), e.g. from cron:

    ray job submit --working-dir . -- python -m jobs.reindex \\
        --corpus s3://my-bucket/corpus/ --out s3://my-bucket/builds/main

New, changed and removed documents are found by content hash against docs/. Only new and changed
documents are tokenized and embedded; they get fresh ids in new parts, and the documents they
replace (and removed ones) are tombstoned (tombstones/). The new vectors go into a copy of the
published index (its trained quantizers reused) as a new version, tombstoned ids removed; a drift
check (recall on a fresh sample below --min-recall, or growth since the last full build over
--max-growth) rebuilds the index instead. Neighbors are recomputed only where they can change.
Then LATEST is swapped, under a lock: one run per --out at a time (a second one exits with code 75
and does nothing). No corpus change: nothing is done. A killed run is resumed by the next one.
Every run appends a line to history.jsonl under --out.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from dataclasses import dataclass

from pipelines.config import config_to_dict, fail, option, parse_config

EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the lock, or LATEST moved meanwhile; try again later
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> float:
    """'90s', '30m', '6h', '1d', '1h30m' -> seconds; '' -> 0 (run once)."""
    if not text:
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip().lower())
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", text.strip().lower()).strip():
        raise ValueError(f"--every must look like 30m, 6h, 1d or 1h30m, got {text!r}")
    seconds = sum(float(v) * _UNITS[u] for v, u in parts)
    if seconds <= 0:
        raise ValueError(f"--every must be a positive duration, got {text!r}")
    return seconds


@dataclass(kw_only=True)
class ReindexConfig:
    """Options of `python -m jobs.reindex`."""

    corpus: list[str] = option([], "the build's corpus: path, fsspec URL or glob, as given to jobs.build_index; repeatable")
    out: str = option("", "URL of the published build to update (local folder, s3://..., any fsspec URL)")
    text_field: str = option("", "field (jsonl) or column (parquet) holding the text; default: the build's")
    index_key: str = option("", "faiss index factory string for a full rebuild; default: the published index's family")
    max_growth: float = option(0.25, "rebuild the index from scratch when the chunks added (or removed) since the last "
                                     "full build exceed this fraction of it")
    min_recall: float = option(0.90, "rebuild the index from scratch when the updated index's neighbor recall@k on a "
                                     "fresh sample stays below this after re-tuning")
    full: bool = option(False, "rebuild the index and all neighbors from scratch (documents are still only "
                               "tokenized and embedded when new or changed)")
    keep: int = option(2, "older complete index/neighbors versions to keep after the LATEST swap; older ones are removed")
    every: str = option("", "keep running: one re-index every this long (e.g. 6h, 30m); default: run once")
    runs: int = option(0, "with --every: stop after this many runs (0 = never)")
    lock_ttl: float = option(600.0, "seconds a lock stays valid without its owner's heartbeat (a crashed run's lock "
                                    "expires after this; on the same host a dead owner's lock is broken at once)")
    recall_sample: int = option(0, "chunks in the fresh recall sample; 0 = as many as the published version used")
    concurrency: int = option(0, "parallel workers; 0 = every CPU of the Ray cluster")
    ray_address: str = option("", "Ray cluster address; default: RAY_ADDRESS, else a local instance on 127.0.0.1")
    num_cpus: int = option(0, "CPUs for a local Ray instance; 0 = all of this machine's")

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("--corpus is required (the corpus the build was made from, as it is now)")
        if not self.out:
            raise ValueError("--out is required (the published build to update)")
        if not 0 < self.max_growth:
            raise ValueError(f"--max-growth must be positive, got {self.max_growth}")
        if not 0 <= self.min_recall <= 1:
            raise ValueError(f"--min-recall must be in [0, 1], got {self.min_recall}")
        if self.keep < 0 or self.runs < 0 or self.recall_sample < 0 or self.concurrency < 0 or self.num_cpus < 0:
            raise ValueError("--keep, --runs, --recall-sample, --concurrency and --num-cpus must not be negative")
        if self.lock_ttl <= 0:
            raise ValueError(f"--lock-ttl must be positive, got {self.lock_ttl}")
        parse_every(self.every)


def run_once(cfg: ReindexConfig) -> int:
    from pipelines.reindex import run_reindex
    from pipelines.reindex_lock import LockHeld, LockLost
    from pipelines.reindex_publish import StaleBase, append_history, now
    from pipelines.storage import open_location

    out = open_location(cfg.out)
    start = time.perf_counter()
    try:
        summary = run_reindex(corpus=cfg.corpus, out=out, text_field=cfg.text_field, index_key=cfg.index_key,
                              max_growth=cfg.max_growth, min_recall=cfg.min_recall, full=cfg.full, keep=cfg.keep,
                              lock_ttl=cfg.lock_ttl, recall_sample=cfg.recall_sample, concurrency=cfg.concurrency,
                              config=config_to_dict(cfg))
    except (LockHeld, LockLost, StaleBase) as e:
        print(f"reindex: {e}; nothing published", flush=True)
        if out.is_local and isinstance(e, LockHeld):  # an O_APPEND line cannot disturb the lock holder's
            append_history(out, {"time": now(), "action": "skipped", "reason": str(e),
                                 "seconds": round(time.perf_counter() - start, 3)})
        return EXIT_BUSY
    for line in summary.lines():
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.reindex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(ReindexConfig, parser, argv)
    from pipelines.corpus import list_corpus
    from pipelines.latest import resolve_latest
    from pipelines.ray_session import init_ray
    from pipelines.storage import open_location

    try:
        out = open_location(cfg.out)
        resolve_latest(out)  # a missing build fails here, in one line, before Ray starts
        list_corpus(cfg.corpus, exclude_root=out.root if out.is_local else None)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(e))
    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    period = parse_every(cfg.every)
    done = 0
    while True:
        started = time.time()
        try:
            code = run_once(cfg)
        except (FileNotFoundError, PermissionError, ValueError) as e:
            if not period:
                fail(str(e))
            print(f"reindex: run failed: {e}", file=sys.stderr, flush=True)
            code = 1
        except Exception:  # noqa: BLE001 - a periodic driver reports a failed run and keeps its schedule
            if not period:
                raise
            traceback.print_exc()
            code = 1
        done += 1
        if not period or (cfg.runs and done >= cfg.runs):
            return code
        wait = max(0.0, started + period - time.time())
        print(f"reindex: next run in {wait:.0f} s (--every {cfg.every})", flush=True)
        time.sleep(wait)


if __name__ == "__main__":
    sys.exit(main())
