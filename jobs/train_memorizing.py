"""Train the Memorizing Transformer on a build's documents with Ray Train (DDP), each worker with its own memories.

On this machine (a local Ray instance on loopback, local folders):

    python -m jobs.build_index --out ./artifacts/demo --stages tokenize
    python -m jobs.train_memorizing --data ./artifacts/demo --out ./artifacts/memorizing --preset tiny --max-steps 200

On a Ray cluster, against object storage (credentials from the AWS_* environment, never flags):

    ray job submit --working-dir . -- python -m jobs.train_memorizing \\
        --data s3://my-bucket/builds/v1 --out s3://my-bucket/runs/mem1 --preset readme \\
        --max-steps 50000 --num-workers 8 --use-gpu --batch-size 64 --seq-len 512 --max-failures 3

What it does: every row of the global batch streams whole documents (tokens from chunks/, in a seeded document
order), one after another, in consecutive segments of --seq-len tokens; the row's kNN and XL memories are
cleared when its document ends. Only the tokenize stage of the build is needed (chunks/, docs/).
Outputs under --out: metrics.jsonl (train rows: step, loss, lr, tokens_per_s; eval rows on held-out documents:
eval_loss with the memories, eval_loss_no_memory without any, eval_loss_no_knn with the XL memory only) and
ray_train/memorizing/checkpoint_NNNNNNNN/ (the model, and each worker's memories and stream positions).
Rerunning the same command continues from the newest checkpoint (with the same --num-workers).
"""
from __future__ import annotations

import argparse
import sys

from pipelines.runtime.config import parse_config
from pipelines.train.run_memorizing import MemorizingTrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_memorizing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(MemorizingTrainConfig, parser, argv)
    from pipelines.train.run_memorizing import run_memorizing_training

    return run_memorizing_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
