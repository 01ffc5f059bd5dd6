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
import sys

from pipelines.reindex.config import ReindexConfig
from pipelines.runtime.config import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.reindex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(ReindexConfig, parser, argv)
    from pipelines.reindex.schedule import run_schedule

    return run_schedule(cfg)


if __name__ == "__main__":
    sys.exit(main())
