"""The options of a re-index (`python -m jobs.reindex`): one dataclass, validated once, and the --every parser."""
from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.runtime.config import option

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
