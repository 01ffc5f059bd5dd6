"""A RETRO training run (`python -m jobs.train_retro`): its options, the checks before Ray starts, Ray Train."""
from __future__ import annotations

import time
from dataclasses import dataclass

from pipelines.runtime.config import fail, option
from pipelines.train.config import CommonTrainConfig

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
    grad_accum: int = option(1, "micro-batches per step on each worker (gradient accumulation): --batch-size "
                                "stays the global batch, each worker runs --batch-size / --num-workers / this rows "
                                "at a time")
    compile: str = option("auto", "torch.compile the model's blocks: on, off, or auto (on with --use-gpu; on CPU "
                                  "compiling costs minutes and gains little)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass instead "
                                                   "of keeping them (less memory for large presets, ~30%% more compute)")
    prefetch: int = option(2, "batches made ahead in a background thread (0 = none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len < 0 or self.num_neighbors < 0 or self.data_partitions < 0 or self.prefetch < 0:
            raise ValueError("--seq-len, --num-neighbors, --data-partitions and --prefetch must not be negative")
        if self.shuffle_buffer <= 0 or self.eval_batches <= 0:
            raise ValueError("--shuffle-buffer and --eval-batches must be positive")
        if self.grad_accum <= 0 or self.local_batch_size % self.grad_accum:
            raise ValueError(f"--grad-accum ({self.grad_accum}) must be positive and divide the per-worker batch "
                             f"(--batch-size / --num-workers = {self.local_batch_size})")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"--compile must be auto, on or off, got {self.compile!r}")

    @property
    def compile_model(self) -> bool:
        """Whether the workers torch.compile the model (--compile, auto: on GPU runs)."""
        return self.compile == "on" or (self.compile == "auto" and self.use_gpu)


def run_retro_training(cfg: RetroTrainConfig) -> int:
    """Check the flags and the build (before Ray starts), then train with Ray Train and print the summary.

    Args:
        cfg: the run's options (``python -m jobs.train_retro --help``).

    Returns:
        The process exit code: 0, or 1 when training failed (the error is printed in one line).
    """
    from pipelines.artifacts.storage import check_writable, open_location
    from pipelines.train.config import parse_overrides
    from pipelines.train.retro import build_samples, resolve_spec, retro_model_dict

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

    from pipelines.runtime.ray_session import init_ray
    from pipelines.train.launcher import run_training

    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    samples = build_samples(data, out, spec, partitions=cfg.data_partitions)
    for line in samples.lines():
        print(line, flush=True)
    if samples.train < cfg.batch_size:
        fail(f"only {samples.train} training samples, fewer than --batch-size {cfg.batch_size}")
    return run_training(cfg, job=JOB, data=data, out=out, vocab_size=reader.vocab_size,
                        model_for=lambda v: retro_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=v,
                                                             chunk_size=reader.chunk_size, seq_len=spec.seq_len),
                        task_class="pipelines.train.retro:RetroTask", config_class="pipelines.train.run_retro:RetroTrainConfig",
                        task_extra={"samples_url": samples.folder}, start=start)
