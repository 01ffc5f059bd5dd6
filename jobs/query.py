"""Query a build: the chunks nearest a text, or what the neighbors stage stored for a chunk.

On this machine:

    python -m jobs.query --data ./artifacts/demo --text "To be, or not to be" --k 5
    python -m jobs.query --data ./artifacts/demo --chunk-id 1234          # a chunk and its stored neighbors
    python -m jobs.query --data ./artifacts/demo --text "Once more unto the breach" --json

On a Ray cluster (it runs on the driver; the build is read from object storage):

    ray job submit --working-dir . -- python -m jobs.query --data s3://my-bucket/builds/v1 --text "a storm at sea"

--text is tokenized and embedded with the build's own tokenizer and encoder (as the first chunk of a document
would be) and searched in the index version LATEST names. Each hit shows its rank, chunk id, document id,
distance (squared L2 for an l2 build), source and text; --json prints one object per hit instead. Chunks a
re-index removed are never shown.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.inference.query import QueryConfig
from pipelines.runtime.config import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(QueryConfig, parser, argv)
    from pipelines.inference.query import run_query

    return run_query(cfg)


if __name__ == "__main__":
    sys.exit(main())
