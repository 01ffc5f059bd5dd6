"""The training loop every Ray Train worker runs, for any :class:`~pipelines.train.task.TrainTask`.

Why one loop: RETRO (``jobs.train_retro``) and the Memorizing Transformer (``jobs.train_memorizing``) need the
same plumbing, and a job should only say what differs (a :class:`TrainTask`: model, batches, loss, evaluation).

* Launcher: :func:`launch` runs :func:`train_loop` on ``--num-workers`` Ray Train workers (``TorchTrainer``;
  DDP through ``ray.train.torch.prepare_model``: gloo on CPU, nccl on GPU). Ray Train keeps its run state and
  checkpoints under ``--out/ray_train/<job>/`` on any fsspec URL; ``FailureConfig(max_failures)`` restarts a
  failed worker group from the newest checkpoint.
* Checkpoints: ``checkpoint_NNNNNNNN/`` holds ``model.pt`` (rank 0: model, optimizer, step, data position,
  configs as JSON strings) and ``rank-NNNNN.pt`` (every rank: its data position, RNG state and task state,
  e.g. memories). Saved with ``torch.save``; loaded with ``torch.load(..., weights_only=True)`` only.
* Resume: rerunning the same command with the same ``--out`` continues from the newest checkpoint (Ray Train
  restores its run from storage); ``--no-resume`` starts over.
* Exactness: the global batch is split evenly over the workers and the loss is the token-weighted mean over
  the whole global batch (each worker scales its summed loss by ``world / global_tokens`` before DDP averages
  the gradients), so 1 and W workers take the same steps up to float rounding, and a resumed run repeats the
  steps of an uninterrupted one.
* GPU speed: no host synchronisation inside a step (token counts and losses stay on the device until a log
  row), fused AdamW on CUDA, gradient accumulation over the micro-batches a task splits a step into
  (:meth:`TrainTask.micro_batches`; DDP syncs gradients once, on the last), bf16 autocast.
* Metrics: rank 0 appends JSON lines to ``--out/metrics.jsonl``: train rows (step, loss, lr, tokens_per_s) and
  eval rows (step, eval_loss and the task's ablation, e.g. eval_loss_no_retrieval). Rows past the checkpoint a
  run resumes from are dropped first, so the file always describes one history.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from typing import Any

from pipelines.artifacts.storage import open_location
from pipelines.runtime.redact import redact_record
from pipelines.train.checkpoint import check_same_model, load_resume_checkpoint, save_checkpoint
from pipelines.train.config import CommonTrainConfig
from pipelines.train.metrics import MetricsLog
from pipelines.train.task import TrainTask, all_reduce_sum


def lr_factor(step: int, cfg: CommonTrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.lr_decay_steps:
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / cfg.lr_decay_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def autocast(cfg: CommonTrainConfig, device: Any):
    import torch

    return torch.autocast(device_type=getattr(device, "type", "cpu"), dtype=torch.bfloat16,
                          enabled=cfg.precision == "bf16")


def optimizer_step(model: Any, optimizer: Any, grad_clip: float) -> None:
    """Clip the global gradient norm to ``grad_clip`` (0 = off), step, clear the gradients (no host sync)."""
    import torch

    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def all_reduce_tensor(t: Any) -> Any:
    """Sum a tensor over all ranks in place, on its device (no host synchronisation); identity on one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def import_object(path: str):
    module, _, attr = path.partition(":")
    __import__(module)
    return getattr(sys.modules[module], attr)


def train_loop(loop_config: dict) -> None:
    """The per-worker training loop: build, resume, train, log, evaluate, checkpoint (see the module docstring)."""
    import ray.train
    import ray.train.torch
    import torch

    cfg_cls = import_object(loop_config["config_class"])
    cfg = cfg_cls(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    task: TrainTask = import_object(loop_config["task_class"])(cfg, rank, world, device, loop_config["task_extra"])
    out = open_location(cfg.out)

    torch.manual_seed(cfg.seed)
    raw_model = task.build_model().to(device)
    main, rank_state = load_resume_checkpoint(rank)
    step, position = 0, task.start_position()
    if main is not None:
        check_same_model(json.loads(main.get("model_config_json", "{}")), json.loads(task.model_config_json()))
        raw_model.load_state_dict(main["model"])
        step = int(main["step"])
        position = json.loads(rank_state["position_json"])
        task.load_state_dict(rank_state.get("task", {}), int(rank_state.get("world_size", world)))
        if int(rank_state.get("rank", 0)) == rank:
            torch.set_rng_state(rank_state["rng"])
    model = ray.train.torch.prepare_model(raw_model) if world > 1 else raw_model
    groups = task.param_groups(raw_model, cfg.lr)
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    if main is not None:
        optimizer.load_state_dict(main["optimizer"])
    log = MetricsLog(out, step) if rank == 0 else None
    if rank == 0:
        print(f"{task.job}: {'resuming at step ' + str(step) if main else 'starting'}; {world} worker(s), "
              f"global batch {cfg.batch_size}, {sum(p.numel() for p in raw_model.parameters()):,} parameters",
              flush=True)
    if step >= cfg.max_steps:
        return
    cfg_json = json.dumps(redact_record(dataclasses.asdict(cfg)))  # stored in every checkpoint

    # loss and label-token sums of the log window, kept on the device (read only when a row is logged)
    window = torch.zeros(2, dtype=torch.float64, device=device)
    window_inputs = window_time = 0.0
    batches = task.batches(position)
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        batch, position = next(batches)
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        micro = task.micro_batches(batch)
        local_tokens = sum(torch.as_tensor(task.tokens_in(mb), dtype=torch.float64, device=device) for mb in micro)
        # each rank scales its summed loss by world / global tokens, so DDP's mean of the gradients is the
        # gradient of the token-weighted mean over the whole global batch (any number of workers or micro-batches)
        scale = (world / all_reduce_tensor(local_tokens.clone()).clamp(min=1.0)).float()
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(cfg, device):
                loss_sum = task.loss_sum(model, mb)
            (loss_sum * scale).backward()
            window[0] += loss_sum.detach()
            window_inputs += task.input_tokens(mb)
        optimizer_step(raw_model, optimizer, cfg.grad_clip)
        step += 1
        window[1] += local_tokens
        window_time += time.perf_counter() - t0

        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            window_loss, window_tokens = window.tolist()
            window.zero_()
            loss_total, tok_total, inputs_total, time_total = all_reduce_sum(
                [window_loss, window_tokens, window_inputs, window_time], device)
            times = time_total / world  # mean wall time of the window's steps over the ranks
            if log is not None:
                row = {"kind": "train", "step": step, "loss": loss_total / max(1.0, tok_total), "lr": cfg.lr * factor,
                       "tokens_per_s": inputs_total / max(1e-9, times), "epoch": position.get("epoch", 0),
                       "workers": world, "time": time.time()}
                log.write(row)
                print(f"{task.job}: step {step}/{cfg.max_steps} loss {row['loss']:.4f} "
                      f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
            window_inputs = window_time = 0.0
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            model.eval()
            with torch.no_grad(), autocast(cfg, device):
                ev = task.evaluate(raw_model)
            model.train()
            if log is not None:
                log.write({"kind": "eval", "step": step, **ev, "time": time.time()})
                print(f"{task.job}: step {step} " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                           if isinstance(v, float)), flush=True)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            save_checkpoint(raw_model=raw_model, optimizer=optimizer, task=task, step=step, position=position,
                             cfg_json=cfg_json, rank=rank, world=world, metrics={"step": step})
