"""Checkpoints: saving and resuming inside Ray Train, finding and loading the newest one from storage.

``checkpoint_NNNNNNNN/`` holds ``model.pt`` (rank 0: model, optimizer, step, data position, configs as JSON
strings) and ``rank-NNNNN.pt`` (every rank: its data position, RNG state and task state). Loaded with
``torch.load(..., weights_only=True)`` only: nothing from storage is unpickled."""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Optional

from pipelines.artifacts.storage import Location, open_location, read_bytes

RUNS = "ray_train"
MODEL_FILE = "model.pt"
CHECKPOINT_FORMAT = 1


def torch_load_bytes(data: bytes) -> dict:
    """Only tensors and plain containers: ``weights_only=True`` refuses anything that would run code."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def run_location(out: Location, job: str) -> Location:
    return out.child(RUNS, job)


def list_checkpoints(url: str, job: str | None = None) -> list[str]:
    """Checkpoint folders (URLs), oldest first: of a checkpoint URL itself, or of a run under an ``--out``."""
    loc = open_location(url)
    loc.fs.invalidate_cache()  # other processes (the workers) wrote here: no stale listings (s3fs caches them)
    if loc.fs.exists(loc.path(MODEL_FILE)):
        return [loc.url]
    roots = [run_location(loc, job)] if job else []
    if not job and loc.fs.exists(loc.path(RUNS)):
        roots = [loc.child(RUNS, p.rstrip("/").rsplit("/", 1)[-1]) for p in loc.fs.ls(loc.path(RUNS), detail=False)]
    roots.append(loc)  # the run folder itself
    found: list[str] = []
    for root in roots:
        if not root.fs.exists(root.root):
            continue
        for p in root.fs.ls(root.root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("checkpoint_") and root.fs.exists(root.path(name, MODEL_FILE)):
                found.append(root.url_of(name))
    return sorted(set(found), key=lambda u: u.rsplit("/", 1)[-1])


def load_model_checkpoint(url: str, job: str | None = None) -> tuple[dict, str]:
    """(rank 0's ``model.pt`` payload, its folder URL) of the newest loadable checkpoint under ``url``."""
    candidates = list_checkpoints(url, job)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint under {url} (expected checkpoint_*/{MODEL_FILE}, or a training --out)")
    for ck in reversed(candidates):
        loc = open_location(ck)
        try:
            return torch_load_bytes(read_bytes(loc, MODEL_FILE)), ck
        except Exception:  # noqa: BLE001 - a checkpoint cut short by a kill: fall back to the previous one
            continue
    raise ValueError(f"no loadable checkpoint under {url}")


def save_checkpoint(*, raw_model, optimizer, task: Any, step: int, position: dict, cfg_json: str,
                     rank: int, world: int, metrics: dict) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory(prefix="retroforge-ckpt-") as d:
        if rank == 0:
            torch.save({"format": CHECKPOINT_FORMAT, "job": task.job, "step": step, "world_size": world,
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "position_json": json.dumps(position), "train_config_json": cfg_json,
                        "model_config_json": task.model_config_json(), **task.checkpoint_extra()},
                       os.path.join(d, MODEL_FILE))
        torch.save({"rank": rank, "world_size": world, "step": step, "position_json": json.dumps(position),
                    "rng": torch.get_rng_state(), "task": task.state_dict()}, os.path.join(d, f"rank-{rank:05d}.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def load_resume_checkpoint(rank: int) -> tuple[Optional[dict], Optional[dict]]:
    """(model.pt, this rank's rank file or rank 0's) of the checkpoint Ray Train resumes from, or (None, None)."""
    import ray.train

    ck = ray.train.get_checkpoint()
    if ck is None:
        return None, None
    with ck.as_directory() as d:
        with open(os.path.join(d, MODEL_FILE), "rb") as f:
            main = torch_load_bytes(f.read())
        mine = os.path.join(d, f"rank-{rank:05d}.pt")
        path = mine if os.path.exists(mine) else os.path.join(d, "rank-00000.pt")
        with open(path, "rb") as f:
            rank_state = torch_load_bytes(f.read())
    return main, rank_state


def check_same_model(saved: dict, wanted: dict) -> None:
    """A resumed run must build the model its checkpoint holds; say which settings differ instead of a
    state-dict size mismatch (a changed --preset, --override or --vocab with an old --out)."""
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if saved and changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {wanted.get(k)!r} now" for k in changed)
        raise ValueError(f"--out holds a checkpoint of a different model ({diff}); use a new --out, or --no-resume "
                         "to start over")
