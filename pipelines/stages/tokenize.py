"""The tokenize stage: corpus -> ``docs/``, ``chunks/``, ``seqs/``, ``quarantine/`` (docs/design.md).

Two passes over work units (see :mod:`pipelines.text.corpus`), both on Ray Data:
1. ``TokenizeUnits`` (actor per CPU, tokenizer loaded once) reads and tokenizes each unit and
   stages its chunks with unit-local ids under ``chunks/_staging/<plan>/``. It returns counts only.
2. The driver turns the counts into global offsets (prefix sums of a few integers per unit) and
   ``finalize_units`` writes the final parts with dense global ids.
Nothing but counts reaches the driver. A staged unit is kept across a kill, so a rerun only
tokenizes what is missing; the final parts are a pure function of staged data and offsets, so
they come out byte-identical on every run. Once ``LATEST`` is published, the chunks under it are
never rewritten: a rerun with the same plan is a no-op (or rewrites the same bytes), another plan is
refused (:func:`refuse_rewriting_published`).
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - imported once per worker, not on the first part written
import ray

from pipelines.artifacts.arrays import read_arrays, write_arrays
from pipelines.artifacts.manifest import invalid_parts, part_name, read_manifest, write_manifest
from pipelines.artifacts.parquet import write_table
from pipelines.artifacts.storage import (
    Location,
    exists,
    list_names,
    one_line,
    open_location,
    remove,
    remove_tree,
)
from pipelines.artifacts.versions import LATEST
from pipelines.runtime.ray_session import one_per_node, run_bounded
from pipelines.runtime.redact import redact
from pipelines.stages.build_config import BuildConfig
from pipelines.text.chunking import doc_to_chunks, seq_starts
from pipelines.text.corpus import (
    InputFile,
    WorkUnit,
    list_corpus,
    plan_fingerprint,
    plan_units,
    record_offsets,
    source_of,
)
from pipelines.text.readers import TOKENIZER_REJECTED, Record, read_item
from pipelines.text.tokenizer import ChunkTokenizer, encode_each, load_tokenizer

OUTPUT_FOLDERS = ("docs", "seqs", "quarantine", "chunks")  # chunks last: its manifest marks the stage done
STAGING = "chunks/_staging"
ENCODE_BATCH_BYTES = 4 << 20  # texts handed to the Rust tokenizer at once

CHUNKS_SCHEMA = pa.schema([("chunk_id", pa.int64()), ("doc_id", pa.int64()), ("tokens", pa.list_(pa.int32()))])
DOCS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.string()), ("sha256", pa.string()),
                         ("first_chunk_id", pa.int64()), ("num_chunks", pa.int64())])
SEQS_SCHEMA = pa.schema([("seq_start", pa.int64())])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything that shapes the tokenize output (and so the plan fingerprint)."""

    chunk_size: int
    seq_len: int
    text_field: str
    tokenizer: str
    unit_bytes: int
    max_doc_mb: float

    @property
    def max_doc_bytes(self) -> int:
        return int(self.max_doc_mb * (1 << 20))


# ----------------------------------------------------------------------------- pass 1: tokenize


def tokenize_unit(unit: WorkUnit, settings: TokenizeSettings, tokenizer,
                  keep: frozenset | None = None) -> dict[str, np.ndarray]:
    """Read and tokenize one unit; returns the staged arrays (ids are local to the unit).

    ``keep``: (item index, record position) pairs to turn into documents or quarantine records;
    other records are only counted (re-indexing tokenizes just the new and changed documents).
    None keeps every record."""
    import hashlib

    tokens: list[np.ndarray] = []
    doc_item, doc_pos, doc_chunks, doc_sha = [], [], [], []
    q_item, q_pos, q_reason, q_detail = [], [], [], []
    item_records = np.zeros(len(unit.items), dtype=np.int64)
    pending: list[tuple[int, Record]] = []
    pending_bytes = 0

    def quarantine(item_idx: int, position: int, reason: str, detail: str) -> None:
        q_item.append(item_idx), q_pos.append(position), q_reason.append(reason), q_detail.append(redact(detail))

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        for (item_idx, rec), enc in zip(pending, encode_each(tokenizer.tokenizer, [r.text for _, r in pending])):
            if isinstance(enc, Exception):
                quarantine(item_idx, rec.position, TOKENIZER_REJECTED, one_line(enc))
                continue
            chunks = doc_to_chunks(np.asarray(enc.ids, dtype=np.int32), settings.chunk_size)
            tokens.append(chunks)
            doc_item.append(item_idx)
            doc_pos.append(rec.position)
            doc_chunks.append(len(chunks))
            doc_sha.append(hashlib.sha256(rec.text.encode("utf-8")).hexdigest())
        pending, pending_bytes = [], 0

    for item_idx, item in enumerate(unit.items):
        for rec in read_item(item, settings.text_field, settings.max_doc_bytes):
            if rec.position >= 0:
                item_records[item_idx] = rec.position + 1
            if keep is not None and (item_idx, rec.position) not in keep:
                continue
            if rec.text is None:
                quarantine(item_idx, rec.position, rec.reason, rec.detail)
                continue
            pending.append((item_idx, rec))
            pending_bytes += len(rec.text)
            if pending_bytes >= ENCODE_BATCH_BYTES:
                flush()
    flush()
    c1 = settings.chunk_size + 1
    return {
        "tokens": np.concatenate(tokens) if tokens else np.zeros((0, c1), dtype=np.int32),
        "doc_item": np.asarray(doc_item, dtype=np.int32),
        "doc_pos": np.asarray(doc_pos, dtype=np.int64),
        "doc_chunks": np.asarray(doc_chunks, dtype=np.int64),
        "doc_sha": np.asarray(doc_sha, dtype="S64"),
        "q_item": np.asarray(q_item, dtype=np.int32),
        "q_pos": np.asarray(q_pos, dtype=np.int64),
        "q_reason": np.asarray(q_reason, dtype=np.str_),
        "q_detail": np.asarray(q_detail, dtype=np.str_),
        "item_records": item_records,
    }


def _staged_name(plan: str, index: int) -> str:
    return f"{STAGING}/{plan}/unit-{index:05d}.npz"


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name: str) -> ChunkTokenizer:
    """One tokenizer per worker process: Ray reuses warm workers across tasks and both passes."""
    return load_tokenizer(name)


def stage_or_load_unit(out: Location, plan: str, unit: WorkUnit, settings: TokenizeSettings,
                       keep: frozenset | None = None) -> dict[str, np.ndarray]:
    """The staged arrays of ``unit``: kept from an earlier (killed) run when intact, else computed now
    (``keep``: see :func:`tokenize_unit`; the plan fingerprint must cover it)."""
    rel = _staged_name(plan, unit.index)
    if exists(out, rel):
        try:
            return read_arrays(out, rel)
        except Exception:  # noqa: BLE001 - a damaged staged file is simply redone
            pass
    staged = tokenize_unit(unit, settings, _cached_tokenizer(settings.tokenizer), keep)
    write_arrays(out, rel, **staged)
    return staged


# SPREAD: units are independent, so they go to every node; Ray's default packs short tasks onto the node that
# submits them while it has a free CPU, which left a cluster's other nodes idle (and all reads on one node)
@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def tokenize_task(out_url: str, plan: str, settings: TokenizeSettings, unit_json: str) -> dict:
    """Pass 1 as a plain Ray task over one work unit: stages its arrays, returns only its counts.

    Plain tasks rather than a Ray Data map: a unit is already a balanced piece of work, and a dataset's
    fixed cost (planning, its resource budget holding back tasks on small clusters) was a third of the
    stage's time on 2 CPUs."""
    unit = WorkUnit.from_dict(json.loads(unit_json))
    staged = stage_or_load_unit(open_location(out_url), plan, unit, settings)
    return {"index": unit.index, "docs": len(staged["doc_chunks"]), "chunks": int(staged["tokens"].shape[0]),
            "item_records": staged["item_records"].tolist(), "reasons": dict(Counter(staged["q_reason"].tolist()))}


# ----------------------------------------------------------------------------- pass 2: finalize


def finalize_unit(out: Location, plan: str, unit: WorkUnit, doc_offset: int, chunk_offset: int,
                  record_offsets: list[int], settings: TokenizeSettings) -> dict[str, dict]:
    """Write the four final parts of one unit with global ids; returns their manifest entries."""
    s = read_arrays(out, _staged_name(plan, unit.index))
    n_docs = len(s["doc_chunks"])
    doc_ids = doc_offset + np.arange(n_docs, dtype=np.int64)
    first_chunk = chunk_offset + np.concatenate([[0], np.cumsum(s["doc_chunks"])[:-1]]).astype(np.int64) if n_docs else np.zeros(0, np.int64)
    n_chunks = s["tokens"].shape[0]
    c1 = settings.chunk_size + 1
    chunk_ids = chunk_offset + np.arange(n_chunks, dtype=np.int64)
    chunk_doc = np.repeat(doc_ids, s["doc_chunks"])
    token_list = pa.ListArray.from_arrays(pa.array(np.arange(0, (n_chunks + 1) * c1, c1, dtype=np.int32)),
                                          pa.array(s["tokens"].reshape(-1)))
    items = unit.items
    doc_sources = [source_of(items[i].url, items[i].fmt, p + record_offsets[i] if p >= 0 else p)
                   for i, p in zip(s["doc_item"].tolist(), s["doc_pos"].tolist())]
    q_sources = [source_of(items[i].url, items[i].fmt, p + record_offsets[i] if p >= 0 else p)
                 for i, p in zip(s["q_item"].tolist(), s["q_pos"].tolist())]
    seqs = np.concatenate([seq_starts(f, n, settings.chunk_size, settings.seq_len)
                           for f, n in zip(first_chunk.tolist(), s["doc_chunks"].tolist())]) if n_docs else np.zeros(0, np.int64)
    name = part_name(unit.index)
    tables = {
        "docs": pa.table({"doc_id": doc_ids, "source": doc_sources, "sha256": s["doc_sha"].astype(str).tolist(),
                          "first_chunk_id": first_chunk, "num_chunks": s["doc_chunks"]}, schema=DOCS_SCHEMA),
        "seqs": pa.table({"seq_start": seqs.astype(np.int64)}, schema=SEQS_SCHEMA),
        "quarantine": pa.table({"source": q_sources, "reason": s["q_reason"].tolist(), "detail": s["q_detail"].tolist()},
                               schema=QUARANTINE_SCHEMA),
        "chunks": pa.Table.from_arrays([pa.array(chunk_ids), pa.array(chunk_doc), token_list], schema=CHUNKS_SCHEMA),
    }
    return {folder: write_table(out, f"{folder}/{name}", tables[folder]) | {"path": name} for folder in OUTPUT_FOLDERS}


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def finalize_task(out_url: str, plan: str, settings: TokenizeSettings, task_json: str) -> dict[str, dict]:
    """Pass 2 as a plain Ray task: a few integers in, four small parts out (cheaper than a dataset)."""
    t = json.loads(task_json)
    return finalize_unit(open_location(out_url), plan, WorkUnit.from_dict(t["unit"]), t["doc_offset"],
                         t["chunk_offset"], t["record_offsets"], settings)


# ----------------------------------------------------------------------------- driver


@dataclass
class TokenizeSummary:
    documents_read: int
    documents: int
    chunks: int
    seqs: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    seconds: float
    up_to_date: bool = False

    @property
    def bad_fraction(self) -> float:
        return self.quarantined / max(1, self.documents_read)

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"tokenize: up to date ({self.documents} documents, {self.chunks} chunks); nothing to do"]
        rate = self.chunks / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined_by_reason.items())) or "none"
        return [
            f"tokenize: {self.documents_read} documents read, {self.documents} tokenized, "
            f"{self.quarantined} quarantined ({reasons})",
            f"tokenize: {self.chunks} chunks, {self.seqs} sequences in {self.seconds:.1f} s ({rate:,.0f} chunks/s)",
        ]


def _summary_from_manifest(m: dict) -> TokenizeSummary:
    t = m["totals"]
    return TokenizeSummary(t["documents_read"], t["documents"], t["chunks"], t["seqs"], t["quarantined"],
                           t["quarantined_by_reason"], 0.0, up_to_date=True)


def auto_unit_bytes(files: list[InputFile]) -> int:
    """About 64 units for the corpus, each 1-64 MiB: depends only on the input, never on the cluster."""
    total = sum(f.size for f in files)
    return int(min(64 << 20, max(1 << 20, total // 64)))


def run_tokenize(*, corpus: list[str], out: Location, chunk_size: int, seq_len: int, text_field: str,
                 tokenizer: str, unit_bytes: int, concurrency: int, config: dict,
                 max_doc_mb: float = BuildConfig.max_doc_mb) -> TokenizeSummary:
    """The tokenize stage (see the module docstring).

    Raises:
        RetriesExhausted: an input could not be read however often it was retried; nothing is committed,
            and a rerun resumes (units already tokenized are kept).
    """
    start = time.perf_counter()
    files = list_corpus(corpus, exclude=out)
    tok = load_tokenizer(tokenizer)  # fails fast on a bad name, and gives the fingerprint
    settings = TokenizeSettings(chunk_size, seq_len, text_field, tokenizer, unit_bytes or auto_unit_bytes(files),
                                max_doc_mb)
    units = plan_units(files, settings.unit_bytes)
    plan = plan_fingerprint(files, units, {**settings.__dict__, "tokenizer_fingerprint": tok.fingerprint})

    done = read_manifest(out, "chunks")
    same_plan = done is not None and done.get("plan") == plan
    if same_plan and all(
        (m := read_manifest(out, f)) is not None and not invalid_parts(out, f, m["parts"]) for f in OUTPUT_FOLDERS
    ):
        return _summary_from_manifest(done)
    if not same_plan:  # the same plan rewrites the same bytes, which its manifests may go on vouching for
        refuse_rewriting_published(out)
        for folder in reversed(OUTPUT_FOLDERS):  # an old manifest must not vouch for parts being replaced
            remove(out, f"{folder}/_manifest.json")

    pins = one_per_node(len(units))

    def submit(indexed: tuple[int, WorkUnit]) -> ray.ObjectRef:
        index, unit = indexed
        task = tokenize_task.options(scheduling_strategy=pins[index]) if pins[index] else tokenize_task
        return task.remote(out.url, plan, settings, json.dumps(unit.to_dict()))

    counted = run_bounded(submit, list(enumerate(units)), concurrency, "tokenize: pass 1")
    tokenize_seconds = time.perf_counter() - start

    docs = np.array([r["docs"] for r in counted], dtype=np.int64)
    chunks = np.array([r["chunks"] for r in counted], dtype=np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(docs)[:-1]])
    chunk_offsets = np.concatenate([[0], np.cumsum(chunks)[:-1]])
    offsets_by_unit = record_offsets(units, [r["item_records"] for r in counted])
    tasks = [json.dumps({"unit": u.to_dict(), "doc_offset": int(d), "chunk_offset": int(c), "record_offsets": ro})
             for u, d, c, ro in zip(units, doc_offsets, chunk_offsets, offsets_by_unit)]
    entries = ray.get([(finalize_task.options(scheduling_strategy=pin) if pin else finalize_task).remote(
        out.url, plan, settings, t) for t, pin in zip(tasks, one_per_node(len(tasks)))])
    print(f"tokenize: pass 1 (tokenize) {tokenize_seconds:.1f} s, pass 2 (write parts) "
          f"{time.perf_counter() - start - tokenize_seconds:.1f} s", flush=True)

    reasons: Counter = Counter()
    for r in counted:
        reasons.update(r["reasons"])
    n_seqs = sum(e["seqs"]["rows"] for e in entries)
    summary = TokenizeSummary(int(docs.sum()) + sum(reasons.values()), int(docs.sum()), int(chunks.sum()), n_seqs,
                              sum(reasons.values()), dict(reasons), time.perf_counter() - start)
    totals = {k: getattr(summary, k) for k in ("documents_read", "documents", "chunks", "seqs", "quarantined", "quarantined_by_reason")}
    for folder in OUTPUT_FOLDERS:
        _remove_unlisted_parts(out, folder, {e[folder]["path"] for e in entries})
        write_manifest(out, folder, stage="tokenize", parts=[e[folder] for e in entries], totals=totals, config=config,
                       extra={"plan": plan, "tokenizer": tok.describe(), "chunk_size": chunk_size, "seq_len": seq_len,
                              "max_doc_mb": max_doc_mb})
    remove_tree(out, STAGING)
    return summary


def refuse_rewriting_published(out: Location) -> None:
    """Chunk ids are what a published LATEST's index and neighbors point at: never reassign them under it."""
    if exists(out, LATEST):
        raise ValueError(f"{out.url} is published (LATEST exists) and was tokenized from other input or settings: "
                         "re-tokenizing would rewrite the chunk ids its index and neighbors name; build into a new "
                         "--out, or bring this one up to date with `python -m jobs.reindex --corpus ... --out ...`")


def _remove_unlisted_parts(out: Location, folder: str, keep: set[str]) -> None:
    """Parts left by an earlier run with a different plan are removed so the folder matches its manifest."""
    for name in list_names(out, folder):
        if name.startswith("part-") and name not in keep:
            remove(out, f"{folder}/{name}")
