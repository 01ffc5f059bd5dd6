"""Re-index, step 2: append the delta to ``docs/ chunks/ seqs/ quarantine/`` and ``tombstones/``.

Only the added and changed documents (and new quarantine records) are tokenized: the items that
hold them are packed into new work units whose indices are the new part numbers, tokenized with
the tokenize stage's own code (:func:`pipelines.stages.tokenize.stage_or_load_unit` with ``keep``) and
written by its :func:`pipelines.stages.tokenize.finalize_task`, with ids continuing after the current
maximum doc and chunk ids. Existing parts are never touched.

The four manifests and the tombstones manifest must change together. They are first written as
one journal, ``reindex/_pending.json``; then applied one by one; then the journal is removed. A
run killed in between finds the journal and applies it again (:func:`apply_pending`), so the
folders never disagree for longer than a run. The journal and each manifest are written only after
checking, immediately before, that the run still holds the ``--out`` lock.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipelines.artifacts.lock import OutLock
from pipelines.artifacts.manifest import MANIFEST_NAME, code_version, read_manifest
from pipelines.artifacts.storage import Location, exists, read_bytes, remove, remove_tree, write_bytes_atomic
from pipelines.artifacts.tombstones import FOLDER as TOMBSTONES
from pipelines.artifacts.tombstones import Tombstones, write_tombstones_part
from pipelines.artifacts.versions import fingerprint_of
from pipelines.reindex.scan import CorpusDelta
from pipelines.stages.build_config import BuildConfig
from pipelines.stages.tokenize import OUTPUT_FOLDERS, STAGING, TokenizeSettings, finalize_task, stage_or_load_unit
from pipelines.text.corpus import WorkUnit
from pipelines.text.tokenizer import load_tokenizer

PENDING = "reindex/_pending.json"


@dataclass
class AppendSummary:
    documents: int = 0
    chunks: int = 0
    seqs: int = 0
    quarantined: int = 0
    parts: tuple[str, ...] = ()
    tombstoned_documents: int = 0
    tombstoned_chunks: int = 0
    seconds: float = 0.0


def tokenize_settings(out: Location, text_field: str = "") -> TokenizeSettings:
    """The build's own tokenize settings, from ``chunks/_manifest.json`` (a re-index must chunk alike)."""
    m = read_manifest(out, "chunks")
    if m is None:
        raise FileNotFoundError(f"{out.url_of('chunks')}/_manifest.json does not exist: build the database first")
    cfg = m.get("config", {})
    tokenizer = cfg.get("tokenizer") or m.get("tokenizer", {}).get("name")
    if not tokenizer:
        raise ValueError(f"{out.url_of('chunks')}/_manifest.json does not name the tokenizer that made the chunks")
    return TokenizeSettings(int(m["chunk_size"]), int(m["seq_len"]), text_field or cfg.get("text_field", "text"),
                            tokenizer, 0, float(m.get("max_doc_mb", BuildConfig.max_doc_mb)))


def next_part_index(out: Location) -> int:
    """One past the highest part number in any tokenize folder (they share numbers)."""
    top = -1
    for folder in OUTPUT_FOLDERS:
        for e in (read_manifest(out, folder) or {}).get("parts", []):
            top = max(top, int(e["path"].removeprefix("part-").split(".")[0]))
    return top + 1


@dataclass(frozen=True)
class AppendUnit:
    """One new part: the items holding selected records, and where its ``keep`` pairs come from."""

    unit: WorkUnit
    sources: list[list[int]]  # [scanned unit, item in it, item in the new unit], per item
    record_offsets: list[int]


def plan_append_units(delta: CorpusDelta, first_index: int) -> list[AppendUnit]:
    """The new parts: the items holding selected records, in corpus order, packed until about
    ``delta.unit_bytes`` of selected text (from the scan's per-item counts)."""
    plans: list[AppendUnit] = []
    items, sources, offsets, size = [], [], [], 0
    for (u, i), (_, nbytes) in sorted(delta.selected_items.items()):
        sources.append([u, i, len(items)])
        items.append(delta.units[u].items[i])
        offsets.append(delta.record_offsets[u][i])
        size += nbytes
        if size >= delta.unit_bytes:
            plans.append(AppendUnit(WorkUnit(first_index + len(plans), items), sources, offsets))
            items, sources, offsets, size = [], [], [], 0
    if items:
        plans.append(AppendUnit(WorkUnit(first_index + len(plans), items), sources, offsets))
    return plans


def keep_pairs(sources: list[list[int]], scanned_units: list[int], tables: list) -> frozenset:
    """(item in the new unit, position) of every selected record; ``tables[n]`` holds the selected rows
    of ``scanned_units[n]`` from one bucket."""
    where = {(u, i): j for u, i, j in sources}
    keep = set()
    for u, t in zip(scanned_units, tables):
        for i, p in zip(t.column("item").to_pylist(), t.column("position").to_pylist()):
            j = where.get((u, i))
            if j is not None:
                keep.add((j, p))
    return frozenset(keep)


@ray.remote(num_cpus=1)
def stage_selected_task(out_url: str, plan: str, unit_json: str, sources: list, scanned_units: list[int],
                        settings: TokenizeSettings, *tables) -> dict:
    """Tokenize the selected records of one new unit (``tables``: their rows, per bucket and scanned unit)."""
    from pipelines.artifacts.storage import open_location

    unit = WorkUnit.from_dict(json.loads(unit_json))
    staged = stage_or_load_unit(open_location(out_url), plan, unit, settings,
                                keep=keep_pairs(sources, scanned_units, list(tables)))
    return {"index": unit.index, "docs": len(staged["doc_chunks"]), "chunks": int(staged["tokens"].shape[0]),
            "reasons": Counter(staged["q_reason"].tolist())}


@ray.remote(num_cpus=1)
def tombstones_task(out_url: str, index: int, *tables) -> dict:
    """This run's tombstones part: the dead documents of every bucket, by doc_id (one part per run)."""
    from pipelines.artifacts.storage import open_location

    table = pa.concat_tables(tables).sort_by("doc_id")
    return write_tombstones_part(open_location(out_url), index, table)


def _manifest(old: dict, parts: list[dict], totals: dict, extra: dict) -> dict:
    """A new manifest: the old one's keys, its parts plus ``parts``, new totals (write_manifest's format)."""
    m = dict(old)
    m.update(extra)
    m.update({"parts": old["parts"] + parts, "totals": totals, "code_version": code_version(),
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return m


def _write_manifest_dict(out: Location, folder: str, m: dict) -> None:
    write_bytes_atomic(out, f"{folder}/{MANIFEST_NAME}", json.dumps(m, indent=2, sort_keys=True).encode())


def apply_pending(out: Location, lock: OutLock) -> bool:
    """Finish a journaled append (this run's, or one a killed run left); True when there was one."""
    if not exists(out, PENDING):
        return False
    journal = json.loads(read_bytes(out, PENDING))
    for folder in journal["order"]:
        lock.verify()
        _write_manifest_dict(out, folder, journal["manifests"][folder])
    lock.verify()
    remove(out, PENDING)
    remove_tree(out, STAGING)  # this run's units, and any a killed run of another plan left (we hold the lock)
    return True


def _stage(out: Location, plan: str, a: AppendUnit, delta: CorpusDelta, settings: TokenizeSettings) -> ray.ObjectRef:
    """Submit the tokenizing of one new unit with the selected rows of the scanned units it draws from."""
    scanned = sorted({u for u, _, _ in a.sources})
    units = [u for _ in delta.selected for u in scanned]
    tables = [per_unit[u] for per_unit in delta.selected for u in scanned]
    return stage_selected_task.remote(out.url, plan, json.dumps(a.unit.to_dict()), a.sources, units, settings, *tables)


def append_delta(out: Location, lock: OutLock, delta: CorpusDelta, settings: TokenizeSettings, tomb: Tombstones,
                 run_id: str) -> AppendSummary:
    """Tokenize the selected records into new parts, tombstone the dead documents, commit both."""
    start = time.perf_counter()
    summary = AppendSummary()
    chunks_m = read_manifest(out, "chunks")
    old = {f: read_manifest(out, f) for f in OUTPUT_FOLDERS}
    totals = dict(chunks_m["totals"])
    next_doc, next_chunk = int(totals["documents"]), int(totals["chunks"])
    first_index = next_part_index(out)
    settings = dataclasses.replace(settings, unit_bytes=delta.unit_bytes)
    units = plan_append_units(delta, first_index)
    tok = load_tokenizer(settings.tokenizer)
    plan = fingerprint_of({"units": [a.unit.to_dict() for a in units], "selected": delta.fingerprint,
                           "settings": settings.__dict__, "tokenizer": tok.fingerprint, "next": [next_doc, next_chunk],
                           "base_plan": chunks_m.get("plan")})[:16]

    entries: list[dict] = []
    reasons: Counter = Counter()
    if units:
        counts = ray.get([_stage(out, plan, a, delta, settings) for a in units])
        counts.sort(key=lambda c: c["index"])
        tasks, d_off, c_off = [], next_doc, next_chunk
        for a, c in zip(units, counts):
            tasks.append(json.dumps({"unit": a.unit.to_dict(), "doc_offset": d_off, "chunk_offset": c_off,
                                     "record_offsets": a.record_offsets}))
            d_off += c["docs"]
            c_off += c["chunks"]
            reasons.update(c["reasons"])
        entries = ray.get([finalize_task.remote(out.url, plan, settings, t) for t in tasks])
        summary.documents, summary.chunks = d_off - next_doc, c_off - next_chunk
        summary.seqs = sum(e["seqs"]["rows"] for e in entries)
        summary.quarantined = sum(reasons.values())
        summary.parts = tuple(e["chunks"]["path"] for e in entries)

    tomb_m = read_manifest(out, TOMBSTONES) or {"stage": "reindex", "folder": TOMBSTONES, "parts": [], "config": {},
                                                "totals": {"documents": 0, "chunks": 0}}
    tomb_entries = []
    if delta.dead_documents:
        tomb_entries = [ray.get(tombstones_task.remote(out.url, len(tomb_m["parts"]), *delta.dead)) | {"run": run_id}]
        summary.tombstoned_documents = delta.dead_documents
        summary.tombstoned_chunks = delta.dead_chunks

    by_reason = Counter(totals.get("quarantined_by_reason", {}))
    by_reason.update(reasons)
    totals.update({
        "documents_read": int(totals.get("documents_read", 0)) + summary.documents + summary.quarantined,
        "documents": next_doc + summary.documents, "chunks": next_chunk + summary.chunks,
        "seqs": int(totals.get("seqs", 0)) + summary.seqs,
        "quarantined": int(totals.get("quarantined", 0)) + summary.quarantined,
        "quarantined_by_reason": dict(by_reason),
        "live_documents": next_doc + summary.documents - len(tomb) - delta.dead_documents,
        "live_chunks": next_chunk + summary.chunks - tomb.chunks - summary.tombstoned_chunks,
    })
    extra = {"plan": plan, "reindexed": True, "last_reindex": run_id}
    manifests = {f: _manifest(old[f], [e[f] for e in entries], totals, extra) for f in OUTPUT_FOLDERS}
    manifests[TOMBSTONES] = _manifest(tomb_m, tomb_entries, {
        "documents": int(tomb_m["totals"]["documents"]) + summary.tombstoned_documents,
        "chunks": int(tomb_m["totals"]["chunks"]) + summary.tombstoned_chunks}, {"last_reindex": run_id})
    order = [TOMBSTONES, *OUTPUT_FOLDERS]  # chunks last, as the tokenize stage does
    lock.verify()
    write_bytes_atomic(out, PENDING, json.dumps({"plan": plan, "order": order, "manifests": manifests}).encode())
    apply_pending(out, lock)
    summary.seconds = time.perf_counter() - start
    return summary
