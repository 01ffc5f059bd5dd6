"""Re-index, step 1: what changed in the corpus since the build (by content hash against ``docs/``).

The corpus is listed and planned into work units exactly like the tokenize stage
(:func:`pipelines.text.corpus.list_corpus`, :func:`pipelines.text.corpus.plan_units`). The diff is a
distributed hash join, so that no process holds the corpus (docs/design.md, scale rules):

1. hash: one task per unit reads it and keeps, per record, its position and the sha256 of its text (the
   same hash as ``docs/.sha256``) or its quarantine reason; the driver gets its record counts only;
2. name and bucket: one task per unit names each record by its source (the tokenize stage's ``source``:
   URL, plus ``#line=N``/``#row=N``, from the counts' global offsets) and splits its rows into ``B``
   buckets by a hash of the source; one task per ``docs/`` part does the same with its live documents
   (those without a tombstone), and one per ``quarantine/`` part with the rows recorded before;
3. join: one task per bucket compares its rows: a source not live is *added*, one with another hash
   *changed*, a live document whose source was not seen *removed*, a live one whose input is now bad
   *quarantined*. It returns counts, and as Ray objects the records to tokenize (split by the unit that
   holds them, for :mod:`pipelines.reindex.append`) and the rows of the documents that die (tombstones).

The tables travel as Ray objects between tasks (spilled to disk when the object store fills); the driver
holds only counts, per unit and per input file, and object references. A bucket holds about
``BUCKET_ROWS`` rows. A document is never retired because its input could not be read: when a file or
folder comes back unreadable (:data:`pipelines.text.readers.NOT_READ`), the live documents it held stay
as they are, and a storage failure that outlasts the retries stops the scan. A corpus under
``IN_PROCESS_SCAN_BYTES`` runs the same three steps in this process (cheaper than starting Ray workers).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import Location, open_location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.runtime.redact import redact
from pipelines.stages.tokenize import TokenizeSettings, auto_unit_bytes
from pipelines.text.corpus import WorkUnit, list_corpus, plan_units, record_offsets, source_of
from pipelines.text.readers import NOT_READ, read_item

IN_PROCESS_SCAN_BYTES = 16 << 20
BUCKET_ROWS = 1 << 20  # rows (records, live documents) one join task holds, about 150 MiB
MAX_BUCKETS = 256

RECORDS = pa.schema([("item", pa.int32()), ("position", pa.int64()), ("sha256", pa.string()), ("nbytes", pa.int64()),
                     ("reason", pa.string()), ("detail", pa.string())])
NAMED = pa.schema([("source", pa.string()), ("unit", pa.int32()), *RECORDS])
SELECTED = pa.schema([("item", pa.int32()), ("position", pa.int64()), ("nbytes", pa.int64())])
DEAD = pa.schema([("doc_id", pa.int64()), ("first_chunk_id", pa.int64()), ("num_chunks", pa.int64()),
                  ("source", pa.string()), ("reason", pa.string())])


# ----------------------------------------------------------------------------- step 1: hash


def scan_unit(unit: WorkUnit, text_field: str, max_doc_bytes: int) -> tuple[dict, pa.Table]:
    """Hash every record of one unit. Returns the record count of each item (for global line numbers)
    and a table of (item, position, sha256, nbytes) for documents, (item, position, reason, detail) for
    bad records."""
    cols: dict[str, list] = {name: [] for name in RECORDS.names}
    item_records = [0] * len(unit.items)
    for i, item in enumerate(unit.items):
        for rec in read_item(item, text_field, max_doc_bytes):
            if rec.position >= 0:
                item_records[i] = rec.position + 1
            if rec.text is None:
                row = (i, rec.position, None, 0, rec.reason, redact(rec.detail))  # as the quarantine rows record it
            else:
                data = rec.text.encode("utf-8")
                row = (i, rec.position, hashlib.sha256(data).hexdigest(), len(data), None, None)
            for name, value in zip(RECORDS.names, row):
                cols[name].append(value)
    return {"index": unit.index, "item_records": item_records}, pa.table(cols, schema=RECORDS)


@ray.remote(num_cpus=1, num_returns=2)
def scan_unit_task(unit_json: str, text_field: str, max_doc_bytes: int) -> tuple[dict, pa.Table]:
    return scan_unit(WorkUnit.from_dict(json.loads(unit_json)), text_field, max_doc_bytes)


# ----------------------------------------------------------------------------- step 2: name and bucket


def bucket_of(source: str, buckets: int) -> int:
    """A stable bucket for a source (the same in every process and run)."""
    return zlib.crc32(source.encode("utf-8")) % buckets


def split_by_bucket(table: pa.Table, sources: list[str], buckets: int) -> list[pa.Table]:
    keys = pa.array([bucket_of(s, buckets) for s in sources], pa.int32())
    import pyarrow.compute as pc

    return [table.filter(pc.equal(keys, b)) for b in range(buckets)]


def name_records(unit: WorkUnit, offsets: list[int], records: pa.Table, buckets: int) -> list:
    """[not-read sources, then one table per bucket]: the unit's records named by their source."""
    items = unit.items
    sources = [source_of(items[i].url, items[i].fmt, p + offsets[i] if p >= 0 else p)
               for i, p in zip(records.column("item").to_pylist(), records.column("position").to_pylist())]
    not_read = [s for s, r in zip(sources, records.column("reason").to_pylist()) if r in NOT_READ]
    named = pa.Table.from_arrays([pa.array(sources, pa.string()), pa.array([unit.index] * len(sources), pa.int32()),
                                  *records.columns], schema=NAMED)
    return [not_read, *split_by_bucket(named, sources, buckets)]


@ray.remote(num_cpus=1)
def name_records_task(unit_json: str, offsets: list[int], records: pa.Table, buckets: int) -> list:
    return name_records(WorkUnit.from_dict(json.loads(unit_json)), offsets, records, buckets)


def bucket_docs_part(out: Location, rel: str, tomb: Tombstones, buckets: int) -> list:
    """[row count, then one table per bucket] of the live documents of one ``docs/`` part."""
    t = read_table(out, rel, columns=["doc_id", "source", "sha256", "first_chunk_id", "num_chunks"])
    if len(tomb):
        import pyarrow.compute as pc

        t = t.filter(pc.invert(pc.is_in(t.column("doc_id"), value_set=pa.array(tomb.doc_ids))))
    return [t.num_rows, *split_by_bucket(t, t.column("source").to_pylist(), buckets)]


def bucket_quarantine_part(out: Location, rel: str, buckets: int) -> list:
    """[row count, then one table per bucket] of the quarantine rows one part recorded before."""
    t = read_table(out, rel, columns=["source", "reason", "detail"])
    return [t.num_rows, *split_by_bucket(t, t.column("source").to_pylist(), buckets)]


@ray.remote(num_cpus=1)
def bucket_docs_task(out_url: str, rel: str, tombstone_parts: int, buckets: int) -> list:
    out = open_location(out_url)
    return bucket_docs_part(out, rel, Tombstones.load(out, tombstone_parts), buckets)


@ray.remote(num_cpus=1)
def bucket_quarantine_task(out_url: str, rel: str, buckets: int) -> list:
    return bucket_quarantine_part(open_location(out_url), rel, buckets)


# ----------------------------------------------------------------------------- step 3: join


def _held_by(source: str, not_read: set[str]) -> bool:
    """True when the file of ``source``, or a folder above it, is in ``not_read``."""
    url = re.sub(r"#(?:line|row)=\d+$", "", source)
    while url:
        if url in not_read:
            return True
        url = url.rpartition("/")[0]
    return False


def _rows(tables: list[pa.Table]) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


def join_bucket(records: list[pa.Table], live_tables: list[pa.Table], bad_before: list[pa.Table], not_read: set[str],
                units: int) -> list:
    """[counts, dead documents, then one table of selected records per unit] for one bucket."""
    live = {r["source"]: r for r in _rows(live_tables)}
    seen_bad = {(r["source"], r["reason"], r["detail"]) for r in _rows(bad_before)}
    counts: Counter = Counter()
    reasons: Counter = Counter()
    items: dict[tuple[int, int], list[int]] = {}
    selected: dict[int, list[tuple[int, int, int]]] = {}
    dead: list[tuple] = []
    docs_seen: set[str] = set()
    bad_live: set[str] = set()

    def select(r: dict, nbytes: int) -> None:
        selected.setdefault(r["unit"], []).append((r["item"], r["position"], nbytes))
        c = items.setdefault((r["unit"], r["item"]), [0, 0])
        c[0] += 1
        c[1] += max(nbytes, 1)

    for r in _rows(records):
        source = r["source"]
        if r["reason"] is not None:
            if r["reason"] not in NOT_READ and source in live:
                bad_live.add(source)
            if (source, r["reason"], r["detail"]) not in seen_bad:
                select(r, 0)
                counts["new_bad"] += 1
                reasons[r["reason"]] += 1
            continue
        counts["documents_seen"] += 1
        docs_seen.add(source)
        old = live.get(source)
        if old is not None and old["sha256"] == r["sha256"]:
            counts["unchanged"] += 1
            continue
        select(r, r["nbytes"])
        if old is None:
            counts["added"] += 1
        else:
            counts["changed"] += 1
            dead.append((old["doc_id"], old["first_chunk_id"], old["num_chunks"], source, "changed"))
    for source, old in live.items():
        if source in docs_seen:
            continue
        if source in bad_live:  # a live document whose input is now bad (a file-level error after good
            reason = "quarantined"  # records leaves those records live: they were seen)
        elif _held_by(source, not_read):
            counts["kept_unread"] += 1
            continue
        else:
            reason = "removed"
        counts[reason] += 1
        dead.append((old["doc_id"], old["first_chunk_id"], old["num_chunks"], source, reason))
    dead.sort()
    counts["dead_chunks"] = sum(d[2] for d in dead)
    digest = hashlib.sha256(json.dumps([sorted(selected.items()), dead]).encode()).hexdigest()
    summary = {"counts": dict(counts), "reasons": dict(reasons), "items": [[*k, *v] for k, v in sorted(items.items())],
               "digest": digest}
    dead_table = pa.Table.from_pylist([dict(zip(DEAD.names, d)) for d in dead], schema=DEAD)
    per_unit = [pa.Table.from_pylist([dict(zip(SELECTED.names, s)) for s in selected.get(u, [])], schema=SELECTED)
                for u in range(units)]
    return [summary, dead_table, *per_unit]


@ray.remote(num_cpus=1)
def join_bucket_task(n_records: int, n_live: int, not_read: list[str], units: int, *tables: pa.Table) -> list:
    records, live, bad = tables[:n_records], tables[n_records:n_records + n_live], tables[n_records + n_live:]
    return join_bucket(list(records), list(live), list(bad), set(not_read), units)


# ----------------------------------------------------------------------------- driver


@dataclass
class CorpusDelta:
    """The difference between the corpus now and the live documents of the build: counts, and where
    the rows that the append needs are (Ray objects, or tables when the scan ran in this process)."""

    units: list[WorkUnit]
    record_offsets: list[list[int]]  # per unit, per item: lines/rows of the same file in earlier units
    # (unit, item) -> (records to tokenize, their bytes): added and changed documents, new quarantine records
    selected_items: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    selected: list[list[Any]] = field(default_factory=list)  # [bucket][unit]: SELECTED rows (item, position, nbytes)
    dead: list[Any] = field(default_factory=list)  # [bucket]: DEAD rows of the live documents that die
    added: int = 0
    changed: int = 0
    removed: int = 0
    quarantined: int = 0  # live documents whose input is now bad
    dead_chunks: int = 0
    new_bad: int = 0
    not_read: list[str] = field(default_factory=list)  # files and folders that could not be read this time
    kept_unread: int = 0  # live documents left as they are because their input could not be read
    documents_seen: int = 0
    unchanged: int = 0
    unit_bytes: int = 0
    buckets: int = 1
    seconds: float = 0.0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""  # of what is selected and what dies (the append's plan covers it)

    @property
    def dead_documents(self) -> int:
        return self.changed + self.removed + self.quarantined

    @property
    def empty(self) -> bool:
        return not (self.selected_items or self.dead_documents)


def bucket_count(rows: int) -> int:
    """Buckets for about ``rows`` records and live documents, each at most about ``BUCKET_ROWS``."""
    return max(1, min(MAX_BUCKETS, math.ceil(rows / BUCKET_ROWS)))


def _resolve(values: list, in_process: bool) -> list:
    return values if in_process else ray.get(values)


def scan_corpus(out: Location, corpus: list[str], settings: TokenizeSettings, tomb: Tombstones,
                in_process_bytes: int = IN_PROCESS_SCAN_BYTES) -> CorpusDelta:
    """List, hash and compare: the delta the re-index has to apply (no writes).

    Args:
        out: the build. corpus: its ``--corpus`` URLs. settings: the build's tokenize settings.
        tomb: the tombstones so far (their documents are not live).
        in_process_bytes: a corpus up to this size is scanned in this process, a larger one by Ray tasks.

    Returns:
        The delta: counts, and the rows the append needs as Ray objects.

    Raises:
        FileNotFoundError: the build has no ``docs/``.
        RetriesExhausted: the storage kept failing; nothing is retired on a partial view of the corpus.
    """
    start = time.perf_counter()
    docs_m = read_manifest(out, "docs")
    if docs_m is None:
        raise FileNotFoundError(f"{out.url_of('docs')}/_manifest.json does not exist: build the database first "
                                "(python -m jobs.build_index)")
    bad_m = read_manifest(out, "quarantine") or {"parts": []}
    files = list_corpus(corpus, exclude=out)
    unit_bytes = auto_unit_bytes(files)
    units = plan_units(files, unit_bytes)
    corpus_bytes = sum(f.size for f in files)
    local = corpus_bytes <= in_process_bytes
    known_rows = sum(int(e.get("rows", 0)) for e in docs_m["parts"] + bad_m["parts"])
    buckets = bucket_count(known_rows + corpus_bytes // 256)  # records: about one per 256 bytes of input, or more

    # 1. hash
    unit_json = [json.dumps(u.to_dict()) for u in units]
    if local:
        hashed = [scan_unit(u, settings.text_field, settings.max_doc_bytes) for u in units]
        counts, records = [h[0] for h in hashed], [h[1] for h in hashed]
    else:
        refs = [scan_unit_task.remote(j, settings.text_field, settings.max_doc_bytes) for j in unit_json]
        counts, records = ray.get([r[0] for r in refs]), [r[1] for r in refs]
    offsets = record_offsets(units, [c["item_records"] for c in counts])

    # 2. name and bucket: the corpus' records, the live documents, the quarantine rows recorded before
    n = buckets + 1
    if local:
        named = [name_records(u, o, r, buckets) for u, o, r in zip(units, offsets, records)]
        live = [bucket_docs_part(out, f"docs/{e['path']}", tomb, buckets) for e in docs_m["parts"]]
        before = [bucket_quarantine_part(out, f"quarantine/{e['path']}", buckets) for e in bad_m["parts"]]
        not_read = [s for nm in named for s in nm[0]]
    else:
        named = [name_records_task.options(num_returns=n).remote(j, o, r, buckets)
                 for j, o, r in zip(unit_json, offsets, records)]
        live = [bucket_docs_task.options(num_returns=n).remote(out.url, f"docs/{e['path']}", tomb.parts, buckets)
                for e in docs_m["parts"]]
        before = [bucket_quarantine_task.options(num_returns=n).remote(out.url, f"quarantine/{e['path']}", buckets)
                  for e in bad_m["parts"]]
        not_read = [s for got in ray.get([nm[0] for nm in named]) for s in got]
        del records

    # 3. join, bucket by bucket
    delta = CorpusDelta(units, offsets, unit_bytes=unit_bytes, buckets=buckets, not_read=not_read)
    joined = []
    for b in range(buckets):
        tables = [nm[b + 1] for nm in named] + [lv[b + 1] for lv in live] + [q[b + 1] for q in before]
        args = (len(named), len(live), not_read, len(units))
        joined.append(join_bucket([nm[b + 1] for nm in named], [lv[b + 1] for lv in live],
                                  [q[b + 1] for q in before], set(not_read), len(units)) if local else
                      join_bucket_task.options(num_returns=2 + len(units)).remote(*args, *tables))
    del named, live, before
    summaries = _resolve([j[0] for j in joined], local)
    delta.dead = [j[1] for j in joined]
    delta.selected = [list(j[2:]) for j in joined]
    totals: Counter = Counter()
    reasons: Counter = Counter()
    for s in summaries:
        totals.update(s["counts"])
        reasons.update(s["reasons"])
        for u, i, c, nbytes in s["items"]:
            old = delta.selected_items.get((u, i), (0, 0))
            delta.selected_items[(u, i)] = (old[0] + c, old[1] + nbytes)
    for name in ("added", "changed", "removed", "quarantined", "dead_chunks", "new_bad", "kept_unread",
                 "documents_seen", "unchanged"):
        setattr(delta, name, int(totals.get(name, 0)))
    delta.bad_reasons = dict(reasons)
    delta.fingerprint = hashlib.sha256("".join(s["digest"] for s in summaries).encode()).hexdigest()
    delta.seconds = time.perf_counter() - start
    return delta
