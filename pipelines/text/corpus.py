"""Listing a corpus and planning it into work units.

The driver only lists files (names and sizes, never contents; :mod:`pipelines.text.listing`) and groups
them into work units of about ``target_bytes`` of input: many small text files share a unit, a large
jsonl file is cut into byte ranges (a unit owns the lines that *start* inside its range), a large
parquet file into row groups. The plan depends only on the sorted listing and the config, so ids come
out the same on every run. Part NNNNN of every tokenize output folder is work unit NNNNN.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from pipelines.artifacts.storage import Location, RetriesExhausted, open_input, open_location
from pipelines.runtime.redact import redact
from pipelines.text.listing import Entry, corpus_entries

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)


def file_format(path: str) -> str:
    """'text', 'jsonl', 'jsonl.gz', 'parquet', or 'unsupported' (which is quarantined, not dropped)."""
    low = path.lower()
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    if low.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if low.endswith(".jsonl"):
        return "jsonl"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "unsupported"


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    fingerprint: str  # size plus mtime/etag: a changed file changes the plan
    reason: str = ""  # set: the listing could not read this entry (a quarantine reason), and ``detail`` says why
    detail: str = ""


@dataclass
class WorkItem:
    """One file, or one byte range / row-group range of a file, inside a work unit."""

    url: str
    fmt: str
    start: int = 0  # byte offset (jsonl) or first row group (parquet)
    end: int | None = None  # exclusive; None = to the end of the file
    reason: str = ""  # set: the listing could not read this entry; it becomes one quarantine record
    detail: str = ""


@dataclass
class WorkUnit:
    index: int
    items: list[WorkItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"index": self.index, "items": [asdict(i) for i in self.items]}

    @staticmethod
    def from_dict(d: dict) -> WorkUnit:
        return WorkUnit(d["index"], [WorkItem(**i) for i in d["items"]])


def _input_file(loc: Location, entry: Entry) -> InputFile:
    url = loc.url_for_path(entry.path)
    if entry.reason:
        return InputFile(url, 0, "", entry.reason, entry.detail)
    info = entry.info
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return InputFile(url, int(info.get("size") or 0), f"{info.get('size')}:{stamp}")


def list_corpus(urls: list[str], exclude: Location | None = None) -> list[InputFile]:
    """Every entry of every ``--corpus`` URL, each corpus sorted, in the order given.

    Hidden files and folders (names starting with '.') are not read. Entries under ``exclude`` (the
    build's own ``--out``, on any filesystem) are skipped so a build never reads its own artifacts. An
    entry that cannot be listed or followed comes back with its ``reason``, to be quarantined.
    Raises FileNotFoundError naming the corpus that matched no readable file, RetriesExhausted when the
    storage kept failing.
    """
    files: list[InputFile] = []
    seen: set[str] = set()
    for url in urls:
        loc = open_location(url)
        found = [f for f in (_input_file(loc, e) for e in corpus_entries(loc, exclude)) if f.url not in seen]
        if not any(not f.reason for f in found):
            problems = "; ".join(f"{f.url}: {f.reason} ({f.detail})" for f in found[:3])
            raise FileNotFoundError(f"corpus {url} matched no readable files" + (f": {problems}" if problems else ""))
        seen.update(f.url for f in found)
        files += found
    return files


def _parquet_row_group_sizes(url: str) -> list[int]:
    """Row-group sizes from the footer; none when the file cannot be parsed (its reader quarantines it). A
    storage failure is not hidden: it fails the plan, naming the file."""
    try:
        with open_input(open_location(url)) as f:
            md = pq.ParquetFile(f).metadata
            return [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
    except RetriesExhausted:
        raise
    except Exception:  # noqa: BLE001 - an unreadable file is quarantined by the reader
        return []


def plan_units(files: list[InputFile], target_bytes: int) -> list[WorkUnit]:
    """Group files into units of about ``target_bytes``; split big jsonl/parquet files."""
    units: list[WorkUnit] = []
    current: list[WorkItem] = []
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            units.append(WorkUnit(len(units), current))
        current, current_bytes = [], 0

    for f in files:
        fmt = file_format(f.url)
        if fmt == "jsonl" and f.size > target_bytes:
            flush()
            for start in range(0, f.size, target_bytes):
                end = min(start + target_bytes, f.size)
                units.append(WorkUnit(len(units), [WorkItem(f.url, fmt, start, end if end < f.size else None)]))
            continue
        if fmt == "parquet" and f.size > target_bytes:
            flush()
            sizes = _parquet_row_group_sizes(f.url)
            if len(sizes) > 1:
                start, acc = 0, 0
                for i, s in enumerate(sizes):
                    acc += s
                    if acc >= target_bytes or i == len(sizes) - 1:
                        end = i + 1
                        units.append(WorkUnit(len(units), [WorkItem(f.url, fmt, start, end if end < len(sizes) else None)]))
                        start, acc = end, 0
                continue
        if current_bytes + f.size > target_bytes:
            flush()
        current.append(WorkItem(f.url, fmt, reason=f.reason, detail=f.detail))
        current_bytes += f.size
    flush()
    return units


def plan_fingerprint(files: list[InputFile], units: list[WorkUnit], settings: dict) -> str:
    """A hash of the listing, the plan and the settings that shape the output."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(f) for f in files], sort_keys=True).encode())
    h.update(json.dumps([u.to_dict() for u in units], sort_keys=True).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def source_of(url: str, fmt: str, position: int) -> str:
    """The ``source`` a docs, quarantine or tombstones row records (and the re-index scan compares): the
    input's URL without user info or signatures, and where in it the document was."""
    url = redact(url)
    if position < 0:
        return url
    if fmt == "parquet":
        return f"{url}#row={position}"
    return f"{url}#line={position + 1}"  # line numbers are 1-based, as editors show them


def record_offsets(units: list[WorkUnit], item_records: list[list[int]]) -> list[list[int]]:
    """For each item, how many lines/rows of the same file come before it (in earlier units)."""
    seen: dict[str, int] = {}
    offsets = []
    for unit, counts in zip(units, item_records):
        row = []
        for item, n in zip(unit.items, counts):
            row.append(seen.get(item.url, 0))
            seen[item.url] = seen.get(item.url, 0) + n
        offsets.append(row)
    return offsets
