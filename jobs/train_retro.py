"""Train RETRO on a build's chunks and precomputed neighbors with Ray Train (DDP), then evaluate it with and
without retrieval.

On this machine (a local Ray instance on loopback, local folders):

    python -m jobs.build_index --out ./artifacts/demo
    python -m jobs.train_retro --data ./artifacts/demo --out ./artifacts/retro --preset tiny --max-steps 200

On a Ray cluster, against object storage (credentials from the AWS_* environment, never flags):

    ray job submit --working-dir . -- python -m jobs.train_retro \\
        --data s3://my-bucket/builds/v1 --out s3://my-bucket/runs/retro1 --preset readme \\
        --max-steps 100000 --num-workers 8 --use-gpu --batch-size 64 --max-failures 3

What it does: joins seqs/, the neighbors version LATEST names and chunks/ into training samples (a Ray Data
job, written once under --out/retro_samples/), then trains with Ray Train. Every sample is --seq-len + 1
tokens with, per chunk, the k neighbors as neighbor + continuation chunk (2 * chunk_size tokens).
Outputs under --out: metrics.jsonl (train rows: step, loss, lr, tokens_per_s; eval rows: eval_loss,
eval_loss_no_retrieval on held-out sequences, the latter with every neighbor replaced by padding) and
ray_train/retro/checkpoint_NNNNNNNN/. Rerunning the same command continues from the newest checkpoint.
Sample text with retrieval: python -m jobs.generate --checkpoint ./artifacts/retro --data ./artifacts/demo
"""
from __future__ import annotations

import argparse
import sys

from pipelines.runtime.config import parse_config
from pipelines.train.run_retro import RetroTrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_retro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(RetroTrainConfig, parser, argv)
    from pipelines.train.run_retro import run_retro_training

    return run_retro_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
