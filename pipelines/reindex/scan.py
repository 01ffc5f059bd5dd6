"""Re-index, step 1: what changed in the corpus since the build (by content hash against ``docs/``).

The corpus is listed and planned into work units exactly like the tokenize stage
(:func:`pipelines.text.corpus.list_corpus`, :func:`pipelines.text.corpus.plan_units`), and every unit is
read by a Ray task (in the driver, below 16 MiB of input) that only hashes: for each record, its
position and the sha256 of its text (the same hash as ``docs/.sha256``), or its quarantine reason.
Nothing is tokenized here.

The driver names each record by its source (the tokenize stage's ``source``: URL, plus
``#line=N``/``#row=N``), and compares with the live documents of ``docs/`` (those without a
tombstone): a source not there is *added*, one with another hash *changed*, a live document whose
source was not seen *removed*. A document is never retired because its input could not be read: when a
file or folder comes back unreadable (:data:`pipelines.text.readers.NOT_READ`), the live documents it
held stay as they are, and a storage failure that outlasts the retries stops the scan. Driver memory is
O(documents): about 150 bytes each.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import ray

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import Location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.runtime.redact import redact
from pipelines.stages.tokenize import TokenizeSettings, _record_offsets, _source, auto_unit_bytes
from pipelines.text.corpus import WorkItem, WorkUnit, list_corpus, plan_units
from pipelines.text.readers import NOT_READ, read_item

IN_PROCESS_SCAN_BYTES = 16 << 20


def scan_unit(unit: WorkUnit, text_field: str, max_doc_bytes: int) -> dict:
    """Hash every record of one unit: ``docs`` (item, position, sha256, bytes) and ``bad`` (item,
    position, reason, detail), plus the record count of each item (for global line numbers)."""
    docs, bad = [], []
    item_records = [0] * len(unit.items)
    for i, item in enumerate(unit.items):
        for rec in read_item(item, text_field, max_doc_bytes):
            if rec.position >= 0:
                item_records[i] = rec.position + 1
            if rec.text is None:
                bad.append((i, rec.position, rec.reason, redact(rec.detail)))  # as the quarantine rows record it
            else:
                data = rec.text.encode("utf-8")
                docs.append((i, rec.position, hashlib.sha256(data).hexdigest(), len(data)))
    return {"index": unit.index, "docs": docs, "bad": bad, "item_records": item_records}


@ray.remote(num_cpus=1)
def scan_units_task(units_json: list[str], text_field: str, max_doc_bytes: int) -> list[dict]:
    return [scan_unit(WorkUnit.from_dict(json.loads(u)), text_field, max_doc_bytes) for u in units_json]


def scan_all(units: list[WorkUnit], files_bytes: int, text_field: str, max_doc_bytes: int) -> list[dict]:
    """Scan every unit: in this process for a small corpus (reading and hashing a few MiB costs less
    than starting Ray workers), else as Ray tasks of several units each (about 4 per CPU)."""
    if files_bytes <= IN_PROCESS_SCAN_BYTES:
        return [scan_unit(u, text_field, max_doc_bytes) for u in units]
    n_tasks = max(1, min(len(units), 4 * int(ray.cluster_resources().get("CPU", 1))))
    groups = [[json.dumps(u.to_dict()) for u in units[i::n_tasks]] for i in range(n_tasks)]
    return [s for batch in ray.get([scan_units_task.remote(g, text_field, max_doc_bytes) for g in groups]) for s in batch]


@dataclass
class Selected:
    """A record to tokenize: where it is (unit item, position inside the item) and how big."""

    unit: int
    item: int
    position: int
    nbytes: int


@dataclass
class CorpusDelta:
    """The difference between the corpus now and the live documents of the build."""

    units: list[WorkUnit]
    record_offsets: list[list[int]]  # per unit, per item: lines/rows of the same file in earlier units
    selected: list[Selected]  # added and changed documents, and new quarantine records, in corpus order
    added: list[str] = field(default_factory=list)  # sources
    # source -> (doc_id, first_chunk_id, num_chunks) of the live document that dies
    changed: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    removed: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    quarantined: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # a live document's input now bad
    new_bad: int = 0
    not_read: list[str] = field(default_factory=list)  # files and folders that could not be read this time
    kept_unread: int = 0  # live documents left as they are because their input could not be read
    documents_seen: int = 0
    unchanged: int = 0
    unit_bytes: int = 0
    seconds: float = 0.0
    bad_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.selected or self.removed or self.changed or self.quarantined)

    def tombstoned(self) -> list[tuple[int, int, int, str, str]]:
        """(doc_id, first_chunk_id, num_chunks, source, reason) of every live document that dies in
        this run, by doc_id."""
        rows = [(*v, s, reason) for reason, d in (("removed", self.removed), ("quarantined", self.quarantined),
                                                  ("changed", self.changed)) for s, v in d.items()]
        return sorted(rows)


def live_documents(out: Location, tomb: Tombstones) -> dict[str, tuple[int, str, int, int]]:
    """source -> (doc_id, sha256, first_chunk_id, num_chunks) of every document without a tombstone."""
    m = read_manifest(out, "docs")
    if m is None:
        raise FileNotFoundError(f"{out.url_of('docs')}/_manifest.json does not exist: build the database first "
                                "(python -m jobs.build_index)")
    dead = tomb.dead_docs()
    live: dict[str, tuple[int, str, int, int]] = {}
    for e in m["parts"]:
        t = read_table(out, f"docs/{e['path']}", columns=["doc_id", "source", "sha256", "first_chunk_id", "num_chunks"])
        for d, s, h, f, n in zip(*(t.column(i).to_pylist() for i in range(5))):
            if d not in dead:
                live[s] = (d, h, f, n)
    return live


def quarantined_before(out: Location) -> set[tuple[str, str, str]]:
    m = read_manifest(out, "quarantine")
    seen: set[tuple[str, str, str]] = set()
    for e in (m or {}).get("parts", []):
        t = read_table(out, f"quarantine/{e['path']}")
        seen.update(zip(*(t.column(c).to_pylist() for c in ("source", "reason", "detail"))))
    return seen


def _held_by(source: str, not_read: set[str]) -> bool:
    """True when the file of ``source``, or a folder above it, is in ``not_read``."""
    url = re.sub(r"#(?:line|row)=\d+$", "", source)
    while url:
        if url in not_read:
            return True
        url = url.rpartition("/")[0]
    return False


def scan_corpus(out: Location, corpus: list[str], settings: TokenizeSettings, tomb: Tombstones) -> CorpusDelta:
    """List, hash and compare: the delta the re-index has to apply (no writes).

    Raises:
        RetriesExhausted: the storage kept failing; nothing is retired on a partial view of the corpus.
    """
    start = time.perf_counter()
    files = list_corpus(corpus, exclude=out)
    unit_bytes = auto_unit_bytes(files)
    units = plan_units(files, unit_bytes)
    live = live_documents(out, tomb)
    seen_bad = quarantined_before(out)
    scans = sorted(scan_all(units, sum(f.size for f in files), settings.text_field, settings.max_doc_bytes),
                   key=lambda s: s["index"])
    offsets = _record_offsets(units, [s["item_records"] for s in scans])

    delta = CorpusDelta(units, offsets, [], unit_bytes=unit_bytes)
    seen: set[str] = set()
    reasons: Counter = Counter()
    for unit, scan, unit_offsets in zip(units, scans, offsets):
        # records in corpus order: documents and bad records interleaved by (item, position)
        rows = [(i, p, "doc", h, n) for i, p, h, n in scan["docs"]] + [(i, p, "bad", r, d) for i, p, r, d in scan["bad"]]
        rows.sort(key=lambda r: (r[0], r[1] if r[1] >= 0 else 1 << 62))
        for i, p, kind, a, b in rows:
            item: WorkItem = unit.items[i]
            source = _source(item.url, item.fmt, p + unit_offsets[i] if p >= 0 else p)
            if kind == "bad":
                if a in NOT_READ:
                    delta.not_read.append(source)
                elif source in live and source not in seen:
                    delta.quarantined[source] = _ids(live[source])
                if (source, a, b) not in seen_bad:
                    delta.selected.append(Selected(unit.index, i, p, 0))
                    delta.new_bad += 1
                    reasons[a] += 1
                continue
            delta.documents_seen += 1
            seen.add(source)
            delta.quarantined.pop(source, None)  # a file-level error after good records: those still live
            old = live.get(source)
            if old is not None and old[1] == a:
                delta.unchanged += 1
                continue
            delta.selected.append(Selected(unit.index, i, p, b))
            if old is None:
                delta.added.append(source)
            else:
                delta.changed[source] = _ids(old)
    gone = [s for s in live if s not in seen and s not in delta.quarantined]
    not_read = set(delta.not_read)
    delta.removed = {s: _ids(live[s]) for s in gone if not _held_by(s, not_read)}
    delta.kept_unread = len(gone) - len(delta.removed)
    delta.bad_reasons = dict(reasons)
    delta.seconds = time.perf_counter() - start
    return delta


def _ids(doc: tuple[int, str, int, int]) -> tuple[int, int, int]:
    return doc[0], doc[2], doc[3]
