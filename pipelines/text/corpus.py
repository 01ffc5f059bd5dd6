"""Listing a corpus and planning it into work units.

The driver only lists files (names and sizes, never contents) and groups them into work units of
about ``target_bytes`` of input: many small text files share a unit, a large jsonl file is cut into
byte ranges (a unit owns the lines that *start* inside its range), a large parquet file into row
groups. The plan depends only on the sorted listing and the config, so ids come out the same on
every run. Part NNNNN of every tokenize output folder is work unit NNNNN.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from pipelines.artifacts.storage import open_location

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


@dataclass
class WorkItem:
    """One file, or one byte range / row-group range of a file, inside a work unit."""

    url: str
    fmt: str
    start: int = 0  # byte offset (jsonl) or first row group (parquet)
    end: int | None = None  # exclusive; None = to the end of the file


@dataclass
class WorkUnit:
    index: int
    items: list[WorkItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"index": self.index, "items": [asdict(i) for i in self.items]}

    @staticmethod
    def from_dict(d: dict) -> WorkUnit:
        return WorkUnit(d["index"], [WorkItem(**i) for i in d["items"]])


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _visible(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if path.startswith(root) else posixpath.basename(path)
    return not any(part.startswith(".") for part in rel.split("/"))


def list_corpus(urls: list[str], exclude_root: str | None = None) -> list[InputFile]:
    """Every file of every ``--corpus`` URL, each corpus sorted, in the order given.

    Hidden files and folders (names starting with '.') are not read. Files under ``exclude_root``
    (the build's own ``--out``) are skipped so a build never reads its own artifacts.
    Raises FileNotFoundError naming the corpus that matched nothing.
    """
    files: list[InputFile] = []
    seen: set[str] = set()
    for url in urls:
        loc = open_location(url)
        fs, root = loc.fs, loc.root
        if _has_glob(root):
            matches = fs.glob(root, detail=True)
            entries = {p: info for p, info in matches.items() if info.get("type") == "file"}
            base = root.split("*")[0].rsplit("/", 1)[0]
        elif fs.isdir(root):
            entries = fs.find(root, detail=True, withdirs=False)
            base = root
        elif fs.isfile(root):
            entries = {root: fs.info(root)}
            base = posixpath.dirname(root)
        else:
            raise FileNotFoundError(f"corpus {url} does not exist")
        found = 0
        for path in sorted(entries):
            if not _visible(path, base):
                continue
            full = loc.url_of() if path == root else _url_for(loc, path)
            if exclude_root and (path == exclude_root or path.startswith(exclude_root.rstrip("/") + "/")):
                continue
            if full in seen:
                continue
            seen.add(full)
            info = entries[path]
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
            files.append(InputFile(full, int(info.get("size") or 0), f"{info.get('size')}:{stamp}"))
            found += 1
        if found == 0:
            raise FileNotFoundError(f"corpus {url} matched no readable files")
    return files


def _url_for(loc, path: str) -> str:
    if loc.is_local:
        return path
    protocol = loc.fs.protocol if isinstance(loc.fs.protocol, str) else loc.fs.protocol[0]
    return f"{protocol}://{path}"


def _parquet_row_group_sizes(url: str) -> list[int]:
    loc = open_location(url)
    with loc.fs.open(loc.root, "rb") as f:
        md = pq.ParquetFile(f).metadata
        return [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]


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
            try:
                sizes = _parquet_row_group_sizes(f.url)
            except Exception:  # noqa: BLE001 - an unreadable file is quarantined by the reader
                sizes = []
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
        current.append(WorkItem(f.url, fmt))
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
