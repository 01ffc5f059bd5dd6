"""What the training jobs share: the Ray Train launcher, checkpoints, resume, metrics, a deterministic data order.

Why one module: RETRO (``jobs.train_retro``) and the Memorizing Transformer (``jobs.train_memorizing``) need the
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
* Metrics: rank 0 appends JSON lines to ``--out/metrics.jsonl``: train rows (step, loss, lr, tokens_per_s) and
  eval rows (step, eval_loss and the task's ablation, e.g. eval_loss_no_retrieval). Rows past the checkpoint a
  run resumes from are dropped first, so the file always describes one history.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from pipelines.config import option
from pipelines.storage import Location, open_location, read_bytes, write_bytes_atomic

METRICS = "metrics.jsonl"
RUNS = "ray_train"
MODEL_FILE = "model.pt"
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- config


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


def lr_factor(step: int, cfg: CommonTrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.lr_decay_steps:
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / cfg.lr_decay_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- determinism


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, keys): the data order never depends on the cluster."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]]))


def in_eval_split(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic held-out split by id (splitmix64 hash): same ids, same answer on every machine and run."""
    x = (np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading a build


class BuildReader:
    """Read-only access to a build's ``chunks/`` by chunk id, a few parts at a time (never the whole table).

    Ids are dense and parts are written in id order (DESIGN.md), so part i holds ids
    ``[offsets[i], offsets[i] + rows[i])``: the manifest alone locates any id. Each part read is checked
    against that (its first chunk_id), so a build that broke the rule fails loudly instead of feeding
    wrong tokens to a model.
    """

    def __init__(self, data: Location | str, cache_parts: int = 4):
        from pipelines.manifest import require_manifest

        self.data = open_location(data) if isinstance(data, str) else data
        m = require_manifest(self.data, "chunks", "training")
        self.manifest = m
        self.chunk_size = int(m["chunk_size"])
        self.seq_len = int(m["seq_len"])
        self.tokenizer = dict(m.get("tokenizer", {}))
        self.parts = [p["path"] for p in m["parts"]]
        self.rows = np.asarray([int(p["rows"]) for p in m["parts"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)
        self.n_chunks = int(self.rows.sum())
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_parts = max(1, cache_parts)
        self._tombstones = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get("vocab_size", 0))

    def part_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def read_part(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (rows, c+1) int32, doc_id (rows,) int64) of chunks part ``i`` (cached)."""
        from pipelines.parquet_io import read_table

        if i in self._cache:
            return self._cache[i]
        t = read_table(self.data, f"chunks/{self.parts[i]}", columns=["chunk_id", "doc_id", "tokens"])
        n = t.num_rows
        ids = t.column("chunk_id").to_numpy()
        if n != self.rows[i] or (n and ids[0] != self.offsets[i]):
            raise ValueError(f"{self.data.url_of('chunks', self.parts[i])}: expected {self.rows[i]} rows from chunk id "
                             f"{self.offsets[i]}, found {n} from {ids[0] if n else '-'} (chunk ids must be dense, in part order)")
        flat = t.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False)
        tokens = flat.reshape(n, self.chunk_size + 1).astype(np.int32, copy=False)
        doc = t.column("doc_id").to_numpy().astype(np.int64, copy=False)
        if len(self._cache) >= self._cache_parts:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = (tokens, doc)
        return tokens, doc

    def dead(self, ids: np.ndarray) -> np.ndarray:
        """Which chunk ids a re-index tombstoned (readers skip them; ``tombstones/`` exists only after one)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._tombstones is None:
            from pipelines.manifest import read_manifest

            if read_manifest(self.data, "tombstones") is None:
                self._tombstones = False
            else:
                from pipelines.tombstones import Tombstones

                self._tombstones = Tombstones.load(self.data)
        return self._tombstones.dead(ids) if self._tombstones else np.zeros(ids.shape, bool)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, c+1), doc_id (n,)) for any chunk ids in [0, n_chunks), reading only the parts they hit."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_chunks):
            raise IndexError(f"chunk ids must lie in [0, {self.n_chunks})")
        tokens = np.zeros((len(ids), self.chunk_size + 1), np.int32)
        doc = np.zeros(len(ids), np.int64)
        owner = self.part_of(ids)
        for p in np.unique(owner).tolist():
            sel = owner == p
            t, d = self.read_part(p)
            local = ids[sel] - self.offsets[p]
            tokens[sel], doc[sel] = t[local], d[local]
        return tokens, doc


# ----------------------------------------------------------------------------- a compact vocabulary


class TokenMap:
    """The token ids a build uses, renumbered densely (pad 0 stays 0): models predict over these only.

    Why: the output layer and softmax over a 30522-token BERT vocabulary dominate a small model's step on CPU,
    and a small corpus uses a few thousand of those ids. Ids outside the map (a prompt's rare words) become the
    tokenizer's [UNK]."""

    def __init__(self, ids: np.ndarray, unk_id: int = 100):
        self.ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0 or self.ids[0] != 0 or np.any(np.diff(self.ids) <= 0):
            raise ValueError("a token map must be sorted, unique, and start with the pad id 0")
        self._lut = np.zeros(int(self.ids[-1]) + 1, np.int64)
        self._lut[self.ids] = np.arange(len(self.ids))
        hit = np.searchsorted(self.ids, unk_id)
        self.unk = int(hit) if hit < len(self.ids) and self.ids[hit] == unk_id else 0

    def __len__(self) -> int:
        return len(self.ids)

    def to_compact(self, tokens: np.ndarray) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64)
        inside = (t >= 0) & (t < len(self._lut))
        out = np.where(inside, self._lut[np.clip(t, 0, len(self._lut) - 1)], self.unk)
        known = inside & (self.ids[out] == t)
        return np.where(known, out, self.unk)

    def to_full(self, tokens: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(tokens, dtype=np.int64)]


def _part_token_ids(data_url: str, part: int) -> np.ndarray:
    tokens, _ = BuildReader(data_url, cache_parts=1).read_part(part)
    return np.unique(tokens)


def corpus_vocab(data: Location, out: Location) -> np.ndarray:
    """The sorted token ids of every chunk (plus pad and the special tokens): one Ray task per chunks part,
    only the unique ids come back. Cached under ``--out/vocab/`` by the chunks' fingerprint."""
    import ray

    reader = BuildReader(data)
    rel = f"vocab/{fingerprint([p['sha256'] for p in reader.manifest['parts']])}.json"
    try:
        return np.asarray(json.loads(read_bytes(out, rel))["ids"], dtype=np.int64)
    except FileNotFoundError:
        pass
    task = ray.remote(num_cpus=1)(_part_token_ids)
    found = ray.get([task.remote(data.url, i) for i in range(len(reader.parts))])
    special = [reader.tokenizer.get(k) for k in ("pad_id", "cls_id", "sep_id")] + [100]
    ids = np.union1d(np.concatenate(found + [np.zeros(1, np.int64)]),
                     np.asarray([s for s in special if s is not None], np.int64))
    write_bytes_atomic(out, rel, json.dumps({"ids": ids.tolist(), "data": data.url}).encode())
    return ids


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """``--out/metrics.jsonl``, written by rank 0 only. Appends on a local folder; on object storage (no
    append) the file is rewritten whole, which is one atomic PUT per row."""

    def __init__(self, out: Location, resume_step: int):
        self.out = out
        self.rows: list[dict] = []
        try:
            text = read_bytes(out, METRICS).decode()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                if int(row.get("step", 0)) <= resume_step:  # rows after the checkpoint belong to a lost future
                    self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        write_bytes_atomic(self.out, METRICS, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.out.is_local:
            with open(self.out.path(METRICS), "a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self._rewrite()


def read_metrics(out: Location | str) -> list[dict]:
    """All rows of ``--out/metrics.jsonl`` (tests and benchmarks)."""
    out = open_location(out) if isinstance(out, str) else out
    out.fs.invalidate_cache()  # rank 0 rewrites it from another process
    return [json.loads(line) for line in read_bytes(out, METRICS).decode().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- the task interface


class TrainTask:
    """What a job plugs into :func:`train_loop`. One instance per worker (rank)."""

    job: str = "task"
    ablation_metric: str = "eval_loss_ablated"

    def __init__(self, cfg: CommonTrainConfig, rank: int, world: int, device: Any, extra: dict):
        self.cfg, self.rank, self.world, self.device, self.extra = cfg, rank, world, device, extra
        # --vocab corpus: the model's ids are the build's token ids renumbered (see TokenMap)
        self.vocab = TokenMap(np.asarray(extra["vocab_ids"])) if extra.get("vocab_ids") else None

    def compact(self, tokens: np.ndarray) -> np.ndarray:
        """Tokenizer ids -> the model's ids (unchanged without a corpus vocabulary)."""
        return self.vocab.to_compact(tokens) if self.vocab is not None else tokens

    def model_config_json(self) -> str:
        """The model config as JSON (stored in checkpoints; generation rebuilds the model from it)."""
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def start_position(self) -> dict:
        """The data position of a fresh run (JSON-able)."""
        raise NotImplementedError

    def batches(self, position: dict) -> Iterator[tuple[Any, dict]]:
        """This rank's part of each global batch from ``position`` on, with the position after it."""
        raise NotImplementedError

    def tokens_in(self, batch: Any) -> int:
        """Label tokens that count in the loss (not padding)."""
        raise NotImplementedError

    def input_tokens(self, batch: Any) -> int:
        """Token positions the model processed (for tokens/s)."""
        raise NotImplementedError

    def loss_sum(self, model, batch: Any):
        """Summed cross-entropy over this rank's batch (a scalar tensor with grad)."""
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        """Held-out losses, reduced over all ranks (every rank calls this)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Per-rank state beyond the data position (e.g. memories); tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict, saved_world: int) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        """Extra entries of rank 0's model.pt: the vocabulary map, which generation needs."""
        import torch

        return {"vocab_ids": torch.from_numpy(self.vocab.ids)} if self.vocab is not None else {}

    def param_groups(self, model, lr: float) -> list[dict]:
        from models.pkm import param_groups

        return param_groups(model, lr, self.cfg.pkm_value_lr or lr, weight_decay=self.cfg.weight_decay)


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sum a few floats over all ranks (identity on one rank)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(cfg: CommonTrainConfig, device: Any):
    import torch

    return torch.autocast(device_type=getattr(device, "type", "cpu"), dtype=torch.bfloat16,
                          enabled=cfg.precision == "bf16")


def import_object(path: str):
    module, _, attr = path.partition(":")
    __import__(module)
    return getattr(sys.modules[module], attr)


# ----------------------------------------------------------------------------- the loop (runs on every worker)


def _save_checkpoint(*, raw_model, optimizer, task: TrainTask, step: int, position: dict, cfg_json: str,
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


def _load_checkpoint(rank: int) -> tuple[Optional[dict], Optional[dict]]:
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
    main, rank_state = _load_checkpoint(rank)
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
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if main is not None:
        optimizer.load_state_dict(main["optimizer"])
    log = MetricsLog(out, step) if rank == 0 else None
    if rank == 0:
        print(f"{task.job}: {'resuming at step ' + str(step) if main else 'starting'}; {world} worker(s), "
              f"global batch {cfg.batch_size}, {sum(p.numel() for p in raw_model.parameters()):,} parameters",
              flush=True)
    if step >= cfg.max_steps:
        return
    cfg_json = json.dumps(dataclasses.asdict(cfg))

    window_loss = window_tokens = window_inputs = 0.0
    window_time = 0.0
    batches = task.batches(position)
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        batch, position = next(batches)
        factor = lr_factor(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        local_tokens = task.tokens_in(batch)
        global_tokens = max(1.0, all_reduce_sum([local_tokens], device)[0])
        with autocast(cfg, device):
            loss_sum = task.loss_sum(model, batch)
        (loss_sum * (world / global_tokens)).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += float(loss_sum.detach())
        window_tokens += local_tokens
        window_inputs += task.input_tokens(batch)
        window_time += time.perf_counter() - t0

        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
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
            window_loss = window_tokens = window_inputs = window_time = 0.0
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
            _save_checkpoint(raw_model=raw_model, optimizer=optimizer, task=task, step=step, position=position,
                             cfg_json=cfg_json, rank=rank, world=world, metrics={"step": step})


# ----------------------------------------------------------------------------- the launcher (runs on the driver)


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
