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
import time
from dataclasses import dataclass

from pipelines.config import fail, option, parse_config
from pipelines.train_common import CommonTrainConfig

JOB = "memorizing"


@dataclass(kw_only=True)
class MemorizingTrainConfig(CommonTrainConfig):
    """Options of `python -m jobs.train_memorizing`."""

    seq_len: int = option(256, "tokens per segment (each step, every row reads the next segment of its document)")
    eval_fraction: float = option(0.1, "fraction of documents held out for evaluation (a deterministic hash split)")
    eval_docs: int = option(8, "held-out documents per evaluation; 0 = all")
    eval_segments: int = option(16, "segments read from each held-out document per evaluation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len <= 0 or self.eval_segments <= 0 or self.eval_docs < 0:
            raise ValueError("--seq-len and --eval-segments must be positive, --eval-docs not negative")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_memorizing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(MemorizingTrainConfig, parser, argv)
    from pipelines.memorizing_data import DocOrder, memorizing_model_dict
    from pipelines.storage import check_writable, open_location
    from pipelines.train_common import BuildReader, parse_overrides

    start = time.perf_counter()
    try:  # everything that can be wrong with the flags or the data fails here, before Ray starts
        data, out = open_location(cfg.data), open_location(cfg.out)
        reader = BuildReader(data)
        order = DocOrder(data, reader, seed=cfg.seed, eval_fraction=cfg.eval_fraction)
        order.next_train(0, 1, limit=order.n_docs)
        if cfg.eval_fraction > 0 and not order.eval_docs(1):
            raise ValueError(f"--eval-fraction {cfg.eval_fraction} holds out none of the {order.n_docs} documents; raise it")
        memorizing_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=reader.vocab_size)  # fails early
        check_writable(out)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(e))

    from pipelines.ray_session import init_ray
    from pipelines.train_common import run_training

    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    return run_training(cfg, job=JOB, data=data, out=out, vocab_size=reader.vocab_size,
                        model_for=lambda v: memorizing_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=v),
                        task_class="pipelines.memorizing_data:MemorizingTask",
                        config_class="jobs.train_memorizing:MemorizingTrainConfig", task_extra={}, start=start)


if __name__ == "__main__":
    sys.exit(main())
