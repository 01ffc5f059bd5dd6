"""The driver side of training: Ray Train's ``TorchTrainer`` around the shared loop, then the closing summary."""
from __future__ import annotations

import dataclasses
import os
import posixpath
import sys
import time
from typing import Callable

from pipelines.artifacts.storage import Location, open_location
from pipelines.train.checkpoint import RUNS, list_checkpoints
from pipelines.train.config import CommonTrainConfig
from pipelines.train.loop import train_loop
from pipelines.train.metrics import METRICS, read_metrics
from pipelines.train.vocab import corpus_vocab


def storage_for(loc: Location):
    """(storage_path, storage_filesystem) for Ray Train: a plain path locally, fsspec through pyarrow elsewhere."""
    if loc.is_local:
        os.makedirs(loc.root, exist_ok=True)
        return loc.root, None
    import pyarrow.fs

    return loc.root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(loc.fs))


def launch(cfg: CommonTrainConfig, *, job: str, task_class: str, config_class: str, task_extra: dict | None = None):
    """Run :func:`train_loop` under Ray Train and return its ``Result``; Ray must be initialised."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = open_location(cfg.out)
    runs = out.child(RUNS)
    if not cfg.resume:
        for rel in (posixpath.join(RUNS, job), METRICS):
            if out.fs.exists(out.path(rel)):
                out.fs.rm(out.path(rel), recursive=True)
    storage_path, storage_fs = storage_for(runs)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        # --data and --out as absolute URLs: the workers' working directory is not the driver's
        train_loop_config={"config": {**dataclasses.asdict(cfg), "data": open_location(cfg.data).url, "out": out.url},
                           "config_class": config_class, "task_class": task_class,
                           "task_extra": task_extra or {}},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=job, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    return trainer.fit()


def run_training(cfg: CommonTrainConfig, *, job: str, data: Location, out: Location, vocab_size: int,
                 model_for: Callable[[int], dict], task_class: str, config_class: str, task_extra: dict,
                 start: float) -> int:
    """The part of a training job after its checks: the corpus vocabulary when asked for (the model is then
    rebuilt by ``model_for(vocab size)``), Ray Train, one error line on failure, the closing summary.
    Returns the exit code."""
    vocab = corpus_vocab(data, out).tolist() if cfg.vocab == "corpus" else None
    if vocab is not None:
        print(f"{job}: corpus vocabulary of {len(vocab)} of the tokenizer's {vocab_size} tokens", flush=True)
    model = model_for(len(vocab) if vocab is not None else vocab_size)
    try:
        launch(cfg, job=job, task_class=task_class, config_class=config_class,
               task_extra={**task_extra, "model_config": model, "vocab_ids": vocab})
    except Exception as e:  # noqa: BLE001 - Ray Train raises the workers' error here; report it in one line
        cause = getattr(e, "__cause__", None) or e
        print(f"error: training failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    for line in summary_lines(out, job, time.perf_counter() - start):
        print(line, flush=True)
    return 0


def summary_lines(out: Location, job: str, seconds: float) -> list[str]:
    """The closing lines a job prints: last train and eval rows, the newest checkpoint."""
    rows = read_metrics(out)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    lines = []
    if train:
        t = train[-1]
        lines.append(f"{job}: step {t['step']}: loss {t['loss']:.4f}, {t['tokens_per_s']:,.0f} tokens/s "
                     f"({t['workers']} worker(s))")
    if evals:
        e = evals[-1]
        lines.append(f"{job}: eval at step {e['step']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in e.items() if k.startswith("eval_loss")))
    cks = list_checkpoints(out.url, job)
    lines.append(f"{job}: {len(cks)} checkpoint(s) kept, newest {cks[-1] if cks else '-'}; metrics in "
                 f"{out.url_of(METRICS)}; {seconds:.1f} s")
    return lines
