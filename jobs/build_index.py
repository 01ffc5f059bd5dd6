"""Build a retrieval database: tokenize a corpus, embed its chunks, index them, precompute neighbors.

On this machine (a local Ray instance on loopback, a local folder, the packaged encoder):

    python -m jobs.build_index                       # the bundled Shakespeare corpus -> ./artifacts/demo
    python -m jobs.build_index --corpus ./texts --out ./artifacts/mine --stages tokenize

On a Ray cluster, against object storage (credentials from the AWS_* environment, never flags):

    ray job submit --working-dir . -- python -m jobs.build_index \\
        --corpus s3://my-bucket/corpus/ --out s3://my-bucket/builds/v1

Stages, in order: tokenize (docs/ chunks/ seqs/ quarantine/), embed (embeddings/), index (index/vNNNN/),
neighbors (neighbors/vNNNN/, then LATEST names the published index and neighbors versions).
Each stage writes its own folders under --out (see docs/design.md, the artifact contract) and ends with
a manifest; rerunning the same command redoes only what is missing or invalid.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.artifacts.lock import NotCommitted
from pipelines.artifacts.storage import RetriesExhausted
from pipelines.runtime.config import fail, parse_config
from pipelines.stages.build_config import BuildConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.build_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(BuildConfig, parser, argv)
    from pipelines.runtime.ray_session import task_cause
    from pipelines.stages.build import run_build

    try:
        return run_build(cfg)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(task_cause(e)))
    except NotCommitted as e:  # another run holds the --out lock, or LATEST would move backwards
        fail(f"{e}; LATEST unchanged", code=1)
    except RetriesExhausted as e:
        fail(f"{task_cause(e)}; nothing of that stage was committed: rerun the same command to resume "
             "(finished work is kept)", code=1)


if __name__ == "__main__":
    sys.exit(main())
