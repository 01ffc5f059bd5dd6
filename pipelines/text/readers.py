"""Reading documents out of a work item, turning every bad input into a quarantine record.

A reader yields :class:`Record` values: either a document's text, or a reason why the input could
not become one. Nothing that was read is dropped silently; the tokenize stage counts both kinds so
that documents + quarantined = inputs.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from pipelines.artifacts.storage import open_location
from pipelines.text.corpus import WorkItem

# Quarantine reasons (stable strings: users filter on them).
INVALID_UTF8 = "invalid_utf8"
BINARY = "binary"
EMPTY = "empty"
INVALID_JSON = "invalid_json"
MISSING_TEXT_FIELD = "missing_text_field"
INVALID_TEXT_FIELD = "invalid_text_field"
UNREADABLE = "unreadable"
UNSUPPORTED_FORMAT = "unsupported_format"
NUL = bytes(1)


@dataclass(frozen=True)
class Record:
    """One input: ``position`` is -1 for a whole file, else the 0-based line/row inside the item."""

    position: int
    text: str | None
    reason: str = ""
    detail: str = ""


def _decode(data: bytes) -> tuple[str | None, str, str]:
    if NUL in data:
        return None, BINARY, f"NUL byte at offset {data.index(NUL)}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, INVALID_UTF8, f"{e.reason} at byte {e.start}"
    if not text.strip():
        return None, EMPTY, "no non-whitespace text"
    return text, "", ""


def _read_text_file(item: WorkItem) -> Iterator[Record]:
    loc = open_location(item.url)
    with loc.fs.open(loc.root, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark is not text
    text, reason, detail = _decode(data)
    yield Record(-1, text, reason, detail)


def _json_line_record(position: int, raw: bytes, text_field: str) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(position, None, INVALID_UTF8, f"{e.reason} at byte {e.start}")
    if not line.strip():
        return Record(position, None, EMPTY, "blank line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(position, None, INVALID_JSON, str(e))
    if not isinstance(obj, dict) or text_field not in obj:
        return Record(position, None, MISSING_TEXT_FIELD, f"no field {text_field!r}")
    value = obj[text_field]
    if not isinstance(value, str):
        return Record(position, None, INVALID_TEXT_FIELD, f"field {text_field!r} is {type(value).__name__}, not a string")
    if not value.strip():
        return Record(position, None, EMPTY, f"field {text_field!r} has no non-whitespace text")
    return Record(position, value)


def _read_jsonl(item: WorkItem, text_field: str) -> Iterator[Record]:
    """Lines starting in [start, end); for .gz the whole file (gzip cannot be split)."""
    loc = open_location(item.url)
    with loc.fs.open(loc.root, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if item.fmt == "jsonl.gz" else raw
        if item.start > 0:
            f.seek(item.start - 1)
            f.readline()  # finish the line that started before our range; it belongs to the previous unit
        position = 0
        while True:
            if item.end is not None and f.tell() >= item.end:
                break
            line = f.readline()
            if not line:
                break
            yield _json_line_record(position, line.rstrip(b"\r\n"), text_field)
            position += 1


def _read_parquet(item: WorkItem, text_field: str) -> Iterator[Record]:
    loc = open_location(item.url)
    with loc.fs.open(loc.root, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            yield Record(-1, None, MISSING_TEXT_FIELD, f"no column {text_field!r}; columns: {pf.schema_arrow.names}")
            return
        end = pf.metadata.num_row_groups if item.end is None else item.end
        groups = list(range(item.start, end))
        position = 0
        for batch in pf.iter_batches(row_groups=groups, columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if value is None:
                    yield Record(position, None, MISSING_TEXT_FIELD, f"column {text_field!r} is null")
                elif not isinstance(value, str):
                    yield Record(position, None, INVALID_TEXT_FIELD, f"column {text_field!r} is {type(value).__name__}")
                elif not value.strip():
                    yield Record(position, None, EMPTY, f"column {text_field!r} has no non-whitespace text")
                else:
                    yield Record(position, value)
                position += 1


def read_item(item: WorkItem, text_field: str) -> Iterator[Record]:
    """All records of ``item``; an error part-way quarantines the rest of the file, keeping what was read."""
    if item.fmt == "unsupported":
        yield Record(-1, None, UNSUPPORTED_FORMAT, "extension not one of .txt .md .rst .jsonl .jsonl.gz .parquet")
        return
    readers = {"text": _read_text_file, "jsonl": _read_jsonl, "jsonl.gz": _read_jsonl, "parquet": _read_parquet}
    reader = readers[item.fmt]
    args = (item,) if item.fmt == "text" else (item, text_field)
    last = -1
    try:
        for rec in reader(*args):
            last = rec.position
            yield rec
    except Exception as e:  # noqa: BLE001 - any read failure is quarantined with its cause
        where = "" if last < 0 else f" after record {last}"
        yield Record(-1, None, UNREADABLE, f"{type(e).__name__}{where}: {e}"[:2000])
