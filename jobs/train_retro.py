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
import time
from dataclasses import dataclass

from pipelines.config import fail, option, parse_config
from pipelines.train_common import CommonTrainConfig

JOB = "retro"


@dataclass(kw_only=True)
class RetroTrainConfig(CommonTrainConfig):
    """Options of `python -m jobs.train_retro`."""

    seq_len: int = option(0, "tokens per training sequence; a multiple of the build's chunk size that divides the "
                             "build's --seq-len (each build sequence then gives several samples); 0 = the build's")
    num_neighbors: int = option(0, "neighbors per chunk fed to the model (at most the build's k); 0 = all")
    eval_fraction: float = option(0.05, "fraction of sequences held out for evaluation (a deterministic hash split)")
    eval_batches: int = option(4, "batches of --batch-size held-out sequences per evaluation")
    shuffle_buffer: int = option(2048, "rows shuffled together (whole sample parts are grouped up to this size)")
    data_partitions: int = option(0, "shuffle partitions of the sample join; 0 = one per seqs part")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len < 0 or self.num_neighbors < 0 or self.data_partitions < 0:
            raise ValueError("--seq-len, --num-neighbors and --data-partitions must not be negative")
        if self.shuffle_buffer <= 0 or self.eval_batches <= 0:
            raise ValueError("--shuffle-buffer and --eval-batches must be positive")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_retro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(RetroTrainConfig, parser, argv)
    from pipelines.retro_data import build_samples, resolve_spec, retro_model_dict
    from pipelines.storage import check_writable, open_location
    from pipelines.train_common import parse_overrides

    start = time.perf_counter()
    try:  # everything that can be wrong with the flags or the data fails here, before Ray starts
        data, out = open_location(cfg.data), open_location(cfg.out)
        spec, reader, _ = resolve_spec(data, seq_len=cfg.seq_len, num_neighbors=cfg.num_neighbors,
                                       eval_fraction=cfg.eval_fraction, split_seed=0)
        retro_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=reader.vocab_size,
                         chunk_size=reader.chunk_size, seq_len=spec.seq_len)  # a bad preset or override fails here
        check_writable(out)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(e))

    from pipelines.ray_session import init_ray
    from pipelines.train_common import run_training

    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    samples = build_samples(data, out, spec, partitions=cfg.data_partitions)
    for line in samples.lines():
        print(line, flush=True)
    if samples.train < cfg.batch_size:
        fail(f"only {samples.train} training samples, fewer than --batch-size {cfg.batch_size}")
    return run_training(cfg, job=JOB, data=data, out=out, vocab_size=reader.vocab_size,
                        model_for=lambda v: retro_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=v,
                                                             chunk_size=reader.chunk_size, seq_len=spec.seq_len),
                        task_class="pipelines.retro_data:RetroTask", config_class="jobs.train_retro:RetroTrainConfig",
                        task_extra={"samples_url": samples.folder}, start=start)


if __name__ == "__main__":
    sys.exit(main())
