"""Sample text from a trained RETRO checkpoint, retrieving from a build's published index at chunk boundaries.

On this machine:

    python -m jobs.generate --checkpoint ./artifacts/retro --data ./artifacts/demo \\
        --prompt "To be, or not to be" --max-tokens 64 --top-k 40 --temperature 0.8

On a Ray cluster (it runs on the driver; the index and checkpoint are read from object storage):

    ray job submit --working-dir . -- python -m jobs.generate \\
        --checkpoint s3://my-bucket/runs/retro1 --data s3://my-bucket/builds/v1 --prompt "Once upon a time"

Through a running `python -m jobs.serve` service instead of loading the index and encoder here (the chunk is
sent as text; the service's neighbors come back without their continuation chunk):

    python -m jobs.generate --checkpoint ./artifacts/retro --data ./artifacts/demo \\
        --retrieval-url http://127.0.0.1:8000 --prompt "To be, or not to be"

How retrieval works (RETRO's rule): every time a chunk of chunk_size tokens completes (in the prompt or in
the generated text), it is embedded with the encoder the build used (the embeddings manifest names it), the
index LATEST names is searched for its k nearest chunks, and each neighbor's tokens plus its continuation
chunk (when in the same document) are fed to the model for the tokens that follow. --checkpoint is a
checkpoint folder (ray_train/retro/checkpoint_NNNNNNNN) or a training --out (its newest checkpoint).
The text goes to stdout; what was retrieved, and where, goes to stderr.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.inference.generate import GenerateConfig
from pipelines.runtime.config import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(GenerateConfig, parser, argv)
    from pipelines.inference.generate import run_generate

    return run_generate(cfg)


if __name__ == "__main__":
    sys.exit(main())
