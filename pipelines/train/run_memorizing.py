"""A Memorizing Transformer training run (`python -m jobs.train_memorizing`): its options, the checks before Ray starts, Ray Train."""
from __future__ import annotations

import time
from dataclasses import dataclass

from pipelines.runtime.config import fail, option
from pipelines.train.config import CommonTrainConfig

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


def run_memorizing_training(cfg: MemorizingTrainConfig) -> int:
    """Check the flags and the build (before Ray starts), then train with Ray Train and print the summary.

    Args:
        cfg: the run's options (``python -m jobs.train_memorizing --help``).

    Returns:
        The process exit code: 0, or 1 when training failed (the error is printed in one line).
    """
    from pipelines.artifacts.build_reader import BuildReader
    from pipelines.artifacts.storage import check_writable, open_location
    from pipelines.train.config import parse_overrides
    from pipelines.train.memorizing import DocOrder, memorizing_model_dict

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

    from pipelines.runtime.ray_session import init_ray
    from pipelines.train.launcher import run_training

    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    return run_training(cfg, job=JOB, data=data, out=out, vocab_size=reader.vocab_size,
                        model_for=lambda v: memorizing_model_dict(cfg.preset, parse_overrides(cfg.override), vocab_size=v),
                        task_class="pipelines.train.memorizing:MemorizingTask",
                        config_class="pipelines.train.run_memorizing:MemorizingTrainConfig", task_extra={}, start=start)
