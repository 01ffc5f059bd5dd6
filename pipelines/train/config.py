"""The options every training job shares (each job's config dataclass extends :class:`CommonTrainConfig`)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from pipelines.runtime.config import option


@dataclass(kw_only=True)
class CommonTrainConfig:
    """Options every training job has (each job's config dataclass extends this one)."""

    data: str = option("", "URL of a build made by jobs.build_index (local folder, s3://..., any fsspec URL); required")
    out: str = option("", "URL where this run writes metrics.jsonl, checkpoints (ray_train/) and derived data; required")
    preset: str = option("tiny", "model size preset (see the model's PRESETS); vocabulary and chunk size come from --data")
    vocab: str = option("full", "output vocabulary: 'full' (the tokenizer's) or 'corpus' (only the token ids the build's "
                                "chunks use, renumbered: a 30522-token BERT vocabulary shrinks to a few thousand on a "
                                "small corpus, and the output layer with it; the map is stored in every checkpoint)")
    override: list[str] = option([], "model config field=value (Python literal), repeatable, e.g. --override dec_depth=4")
    max_steps: int = option(100, "train until this global step (a resumed run continues up to it)")
    batch_size: int = option(8, "global batch size (rows per step over all workers); must divide by --num-workers")
    num_workers: int = option(1, "Ray Train workers (DDP ranks)")
    use_gpu: bool = option(False, "one GPU per worker (nccl); default CPU workers (gloo)")
    cpus_per_worker: float = option(1.0, "CPUs per worker; also its torch thread count")
    max_failures: int = option(0, "worker-group restarts Ray Train allows after a failure (each resumes from the newest checkpoint)")
    lr: float = option(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    pkm_value_lr: float = option(0.0, "learning rate of product-key memory value tables; 0 = --lr")
    warmup_steps: int = option(10, "linear learning-rate warm-up steps")
    lr_decay_steps: int = option(0, "cosine decay to 10%% of --lr over this many steps after warm-up; 0 = constant "
                                    "(the schedule never depends on --max-steps, so a resumed run matches)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    log_every: int = option(10, "write a train row to metrics.jsonl every this many steps")
    eval_every: int = option(50, "evaluate every this many steps (and at --max-steps); 0 = only at the end")
    checkpoint_every: int = option(50, "checkpoint every this many steps (and at --max-steps); 0 = only at the end")
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)")
    seed: int = option(0, "seed of the model init and of the data order")
    precision: str = option("bf16", "bf16 (autocast: about 3x faster matmuls on this CPU) or fp32")
    resume: bool = option(True, "continue from the newest checkpoint under --out; --no-resume starts over")
    ray_address: str = option("", "Ray cluster address; default RAY_ADDRESS, else a local instance on 127.0.0.1")
    num_cpus: int = option(0, "CPUs of a local Ray instance; 0 = all of this machine's")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (the URL of a build made by jobs.build_index)")
        if not self.out:
            raise ValueError("--out is required (where checkpoints and metrics.jsonl go)")
        positive = ("max_steps", "batch_size", "num_workers", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_failures", "warmup_steps", "lr_decay_steps", "eval_every", "checkpoint_every", "num_cpus",
                     "grad_clip", "pkm_value_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"--batch-size ({self.batch_size}) must be a multiple of --num-workers ({self.num_workers})")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.vocab not in ("full", "corpus"):
            raise ValueError(f"--vocab must be full or corpus, got {self.vocab!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        parse_overrides(self.override)  # a malformed override fails here, before any work

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.num_workers


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dec_depth=4", "dec_cross_attn_layers=(2, 4)"]`` -> dict; values are Python literals (else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out
