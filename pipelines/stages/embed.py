"""The embed stage: ``chunks/`` -> ``embeddings/`` (one ``part-NNNNN.npy`` per chunks part, plus
``ids/part-NNNNN.parquet`` with the chunk ids of the same rows: the numpy + metadata layout that
autofaiss and embedding-reader read).

On CPUs one Ray task per part, at most ``concurrency`` at a time: each worker process loads the encoder
once and keeps it (Ray reuses the process for the next part, and for the next stage or build in the same
session), so the stage's fixed cost is a model load, not an actor pool's start-up; on GPUs a Ray Data
pool of actors, one per GPU. Parts are embedded batch by batch, so a worker's memory is bounded by one part. Each finished part gets a small commit record under
``embeddings/_parts/<fingerprint>/``; a killed run redoes only parts without a valid record, and
the manifest, written last, lists them all.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray

from models.encoder import ChunkEncoder, EncoderConfig
from pipelines.artifacts.manifest import part_is_valid, read_manifest, require_manifest, write_manifest
from pipelines.artifacts.parquet import read_table, write_table
from pipelines.artifacts.storage import (
    Location,
    exists,
    list_names,
    open_input,
    open_location,
    read_bytes,
    remove,
    remove_tree,
    sha256_bytes,
    write_bytes_atomic,
)
from pipelines.runtime.ray_session import one_per_node, run_bounded
from pipelines.text.tokenizer import load_tokenizer, resolve_model_path

FOLDER = "embeddings"
RECORDS = f"{FOLDER}/_parts"
EMBEDDING_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedSettings:
    """Everything that shapes the embeddings (and so the stage fingerprint)."""

    encoder: str
    pooling: str
    embedding_dtype: str
    compute_dtype: str
    batch_size: int
    device: str


def check_tokenizer(chunks_manifest: dict, encoder: str, allow_mismatch: bool) -> dict:
    """The encoder's tokenizer must be the one that made the chunks; returns its description."""
    made_by = chunks_manifest.get("tokenizer", {})
    try:
        mine = load_tokenizer(encoder).describe()
    except ValueError as e:
        raise ValueError(f"encoder {encoder!r}: {e}") from None
    if made_by.get("fingerprint") != mine["fingerprint"] and not allow_mismatch:
        raise ValueError(
            f"encoder {encoder!r} uses a different tokenizer than the one that made the chunks "
            f"({made_by.get('name')!r}, fingerprint {str(made_by.get('fingerprint'))[:12]} vs {mine['fingerprint'][:12]}); "
            f"re-tokenize with --tokenizer {encoder}, or pass --allow-tokenizer-mismatch"
        )
    return mine


def read_chunk_tokens(out: Location, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(chunk_id (n,), tokens (n, c+1) int32) of one chunks part, without a Python loop over rows."""
    t = read_table(out, f"chunks/{part}", columns=["chunk_id", "tokens"])
    ids = t.column("chunk_id").to_numpy()
    flat = t.column("tokens").combine_chunks()
    values = flat.values.to_numpy(zero_copy_only=False)
    return ids, values.reshape(len(ids), -1) if len(ids) else values.reshape(0, 0)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_part_encoder(settings: EmbedSettings, cls_id: int) -> ChunkEncoder:
    """The encoder that ``settings`` name, loaded from its (local or packaged) weights."""
    return ChunkEncoder(EncoderConfig(resolve_model_path(settings.encoder), settings.pooling, settings.compute_dtype,
                                      settings.device, cls_id=cls_id))


@functools.lru_cache(maxsize=1)
def _process_encoder(settings: EmbedSettings, cls_id: int) -> ChunkEncoder:
    """One encoder per worker process: Ray reuses a CPU worker process for the next task, so the encoder is
    loaded once per process (and once per session in a long-lived local Ray), not once per part or stage."""
    return load_part_encoder(settings, cls_id)


def embed_part(out: Location, encoder: ChunkEncoder, settings: EmbedSettings, fingerprint: str, part: str,
               chunks_sha256: str) -> dict:
    """Embed one chunks part, write its ``.npy`` and ids, then its commit record (last); returns the record."""
    stem = part.removesuffix(".parquet")
    ids, tokens = read_chunk_tokens(out, part)
    dtype = np.dtype(settings.embedding_dtype)
    vectors = encoder.embed_rows(tokens, settings.batch_size, out=np.empty((len(ids), encoder.dim), dtype=dtype))
    data = _npy_bytes(vectors)
    write_bytes_atomic(out, f"{FOLDER}/{stem}.npy", data)
    ids_entry = write_table(out, f"{FOLDER}/ids/{part}", pa.table({"chunk_id": pa.array(ids, pa.int64())}))
    entry = {"path": f"{stem}.npy", "rows": len(ids), "bytes": len(data), "sha256": sha256_bytes(data),
             "ids_path": f"ids/{part}", "ids_bytes": ids_entry["bytes"], "ids_sha256": ids_entry["sha256"],
             "first_chunk_id": int(ids[0]) if len(ids) else -1, "chunks_sha256": chunks_sha256}
    write_bytes_atomic(out, f"{RECORDS}/{fingerprint}/{stem}.json", json.dumps(entry).encode())
    return entry


@ray.remote
def embed_part_task(out_url: str, settings: EmbedSettings, fingerprint: str, cls_id: int, threads: int, part: str,
                    chunks_sha256: str) -> dict:
    """CPU workers: a task per part on the process's cached encoder (no actor start-up, no pool to plan)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return embed_part(open_location(out_url), _process_encoder(settings, cls_id), settings, fingerprint, part,
                      chunks_sha256)


class EmbedParts:
    """GPU workers: a Ray Data actor that holds the encoder on its GPU and embeds whole parts. (Ray does not
    reuse a GPU task's process, so a task per part would load the encoder once per part.)"""

    def __init__(self, out_url: str, settings: EmbedSettings, fingerprint: str, cls_id: int, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.out = open_location(out_url)
        self.settings = settings
        self.fingerprint = fingerprint
        self.encoder = load_part_encoder(settings, cls_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = [embed_part(self.out, self.encoder, self.settings, self.fingerprint, str(part), str(sha))
                   for part, sha in zip(batch["part"], batch["chunks_sha256"])]
        return {"entry": np.asarray([json.dumps(e) for e in entries])}


def _committed(out: Location, fingerprint: str, chunks_part: str, chunks_sha256: str) -> dict | None:
    """The commit record of a part made from this exact chunks part, whose files still validate, else None."""
    rel = f"{RECORDS}/{fingerprint}/{chunks_part.removesuffix('.parquet')}.json"
    if not exists(out, rel):
        return None
    entry = json.loads(read_bytes(out, rel))
    if entry.get("chunks_sha256") != chunks_sha256:
        return None
    ids_entry = {"path": entry["ids_path"], "bytes": entry["ids_bytes"], "sha256": entry["ids_sha256"]}
    if part_is_valid(out, FOLDER, entry) and part_is_valid(out, FOLDER, ids_entry):
        return entry
    return None


@dataclass
class EmbedSummary:
    chunks: int
    embedded_now: int
    parts: int
    seconds: float
    dim: int
    up_to_date: bool = False

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"embed: up to date ({self.chunks} chunks, dim {self.dim}); nothing to do"]
        rate = self.embedded_now / self.seconds if self.seconds > 0 else 0.0
        return [f"embed: {self.embedded_now} of {self.chunks} chunks embedded now ({self.parts} parts, dim {self.dim}) "
                f"in {self.seconds:.1f} s ({rate:,.0f} chunks/s)"]


def run_embed(*, out: Location, encoder: str, pooling: str, embedding_dtype: str, compute_dtype: str,
              batch_size: int, concurrency: int, cpus_per_worker: float, gpus_per_worker: float,
              allow_tokenizer_mismatch: bool, config: dict) -> EmbedSummary:
    start = time.perf_counter()
    chunks = require_manifest(out, "chunks", "the embed stage")
    tokenizer = check_tokenizer(chunks, encoder, allow_tokenizer_mismatch)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    settings = EmbedSettings(encoder, pooling, embedding_dtype, compute_dtype, batch_size, device)
    # Settings only: each part's record also names the sha256 of the chunks part it was made from, so
    # appending chunk parts (re-indexing) re-embeds only the new parts.
    fingerprint = hashlib.sha256(json.dumps(asdict(settings) | {"batch_size": 0}, sort_keys=True).encode()).hexdigest()[:16]
    chunk_sha = {p["path"]: p["sha256"] for p in chunks["parts"]}
    parts = list(chunk_sha)
    done = read_manifest(out, FOLDER)
    if done and done.get("fingerprint") == fingerprint and [p["ids_path"].removeprefix("ids/") for p in done["parts"]] == parts \
            and all(_committed(out, fingerprint, p, chunk_sha[p]) for p in parts):
        return EmbedSummary(done["totals"]["chunks"], 0, len(done["parts"]), 0.0, done["dim"], up_to_date=True)
    if done:
        remove(out, f"{FOLDER}/_manifest.json")  # it must not vouch for parts being replaced

    entries = {p: _committed(out, fingerprint, p, chunk_sha[p]) for p in parts}
    todo = [p for p in parts if entries[p] is None]
    if todo:
        workers = max(1, min(len(todo), concurrency))
        threads = max(1, int(cpus_per_worker))
        args = {"out_url": out.url, "settings": settings, "fingerprint": fingerprint, "cls_id": tokenizer["cls_id"],
                "threads": threads}
        if gpus_per_worker > 0:
            made = _embed_on_gpu_actors(todo, chunk_sha, args, workers, cpus_per_worker, gpus_per_worker)
        else:
            pins = one_per_node(len(todo))  # the first wave spread over the nodes; then wherever a CPU frees

            def submit(indexed: tuple[int, str]) -> ray.ObjectRef:
                index, part = indexed
                task = embed_part_task.options(num_cpus=cpus_per_worker, scheduling_strategy=pins[index])
                return task.remote(part=part, chunks_sha256=chunk_sha[part], **args)

            made = run_bounded(submit, list(enumerate(todo)), workers, "embed")
        for e in made:
            entries[e["ids_path"].removeprefix("ids/")] = e
    listed = [entries[p] for p in parts]
    dim = _dim_of(out, listed)
    total = sum(e["rows"] for e in listed)
    write_manifest(out, FOLDER, stage="embed", parts=listed, totals={"chunks": total, "dim": dim}, config=config,
                   extra={"fingerprint": fingerprint, "dtype": embedding_dtype, "dim": dim, "encoder": encoder,
                          "pooling": pooling, "compute_dtype": compute_dtype, "tokenizer": tokenizer,
                          "chunks_manifest_parts": len(parts)})
    _remove_stale_records(out, fingerprint)
    embedded_now = sum(entries[p]["rows"] for p in todo)
    return EmbedSummary(total, embedded_now, len(parts), time.perf_counter() - start, dim)


def _embed_on_gpu_actors(todo: list[str], chunk_sha: dict[str, str], args: dict, workers: int, cpus_per_worker: float,
                         gpus_per_worker: float) -> list[dict]:
    """Parts embedded by a Ray Data pool of ``workers`` GPU actors, each loading the encoder once."""
    ds = ray.data.from_items([{"part": p, "chunks_sha256": chunk_sha[p]} for p in todo], override_num_blocks=len(todo))
    rows = ds.map_batches(EmbedParts, batch_size=1, num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                          compute=ray.data.ActorPoolStrategy(size=workers), fn_constructor_kwargs=args).take_all()
    return [json.loads(r["entry"]) for r in rows]


def _dim_of(out: Location, entries: list[dict]) -> int:
    """Read the dim from the first part's .npy header (a few hundred bytes, not the data)."""
    for e in entries:
        with open_input(out.child(FOLDER, e["path"])) as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = np.lib.format._read_array_header(f, version)
            if len(shape) == 2:
                return int(shape[1])
    return 0


def _remove_stale_records(out: Location, keep: str) -> None:
    for name in list_names(out, RECORDS):
        if name != keep:
            remove_tree(out, f"{RECORDS}/{name}")
