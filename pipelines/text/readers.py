"""Reading documents out of a work item, turning every bad input into a quarantine record.

A reader yields :class:`Record` values: either a document's text, or a reason why the input could
not become one. Nothing that was read is dropped silently; the tokenize stage counts both kinds so
that documents + quarantined = inputs. No reader holds more than ``max_doc_bytes`` (plus a buffer) of
one document: a longer text file, jsonl line or parquet value is quarantined as ``too_large`` without
being held. Storage errors that outlast the retries (:class:`pipelines.artifacts.storage.RetriesExhausted`)
are not input errors: they propagate, so a flaky read fails the job instead of losing the rest of a file.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.artifacts.storage import RetriesExhausted, one_line, open_input, open_location
from pipelines.text.corpus import WorkItem
from pipelines.text.listing import BROKEN_SYMLINK, UNLISTABLE

# Quarantine reasons (stable strings: users filter on them).
INVALID_UTF8 = "invalid_utf8"
INVALID_UNICODE = "invalid_unicode"  # text UTF-8 cannot encode: a JSON escape of a lone surrogate
BINARY = "binary"
EMPTY = "empty"
INVALID_JSON = "invalid_json"
MISSING_TEXT_FIELD = "missing_text_field"
INVALID_TEXT_FIELD = "invalid_text_field"
TOO_LARGE = "too_large"
TOKENIZER_REJECTED = "tokenizer_rejected"  # the tokenizer raised on the text (quarantined by the tokenize stage)
UNREADABLE = "unreadable"
UNSUPPORTED_FORMAT = "unsupported_format"
# The reasons that say "this input could not be read", not "it was read and is bad": a re-index keeps the
# documents such an entry held instead of retiring them.
NOT_READ = frozenset({UNREADABLE, UNLISTABLE, BROKEN_SYMLINK})
NUL = bytes(1)
SKIP_BYTES = 1 << 20  # what one step of skipping an oversized line reads


@dataclass(frozen=True)
class Record:
    """One input: ``position`` is -1 for a whole file, else the 0-based line/row inside the item."""

    position: int
    text: str | None
    reason: str = ""
    detail: str = ""


def _too_large(position: int, nbytes: int, limit: int, what: str) -> Record:
    return Record(position, None, TOO_LARGE, f"{what} of {nbytes:,} bytes exceeds --max-doc-mb ({limit:,} bytes)")


def _document(position: int, text: str, what: str) -> Record:
    """``text`` as a document, or why it cannot be one: blank, or not encodable as UTF-8 (the chunk hash
    and the tokenizer need UTF-8)."""
    if not text.strip():
        return Record(position, None, EMPTY, f"{what} has no non-whitespace text")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return Record(position, None, INVALID_UNICODE,
                          f"{what} holds {text[e.start]!r} at character {e.start}: {e.reason}")
    return Record(position, text)


def _utf8_document(position: int, data: bytes, what: str) -> Record:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(position, None, INVALID_UTF8, f"{e.reason} at byte {e.start}")
    return _document(position, text, what)


def _read_text_file(item: WorkItem, limit: int) -> Iterator[Record]:
    with open_input(open_location(item.url)) as f:
        data = f.read(limit + 4)  # one byte past the limit, after a byte-order mark
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark is not text
    if len(data) > limit:
        yield Record(-1, None, TOO_LARGE, f"file larger than --max-doc-mb ({limit:,} bytes)")
    elif NUL in data:
        yield Record(-1, None, BINARY, f"NUL byte at offset {data.index(NUL)}")
    else:
        yield _utf8_document(-1, data, "file")


def _json_line_record(position: int, raw: bytes, text_field: str) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(position, None, INVALID_UTF8, f"{e.reason} at byte {e.start}")
    if not line.strip():
        return Record(position, None, EMPTY, "blank line")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # a JSONDecodeError, an over-long integer, too deep nesting
        return Record(position, None, INVALID_JSON, one_line(e))
    if not isinstance(obj, dict) or text_field not in obj:
        return Record(position, None, MISSING_TEXT_FIELD, f"no field {text_field!r}")
    value = obj[text_field]
    if not isinstance(value, str):
        return Record(position, None, INVALID_TEXT_FIELD, f"field {text_field!r} is {type(value).__name__}, not a string")
    return _document(position, value, f"field {text_field!r}")


def _skip_line(f: BinaryIO) -> int:
    """Read past the end of the current line, a bounded piece at a time; returns the bytes skipped."""
    skipped = 0
    while True:
        piece = f.readline(SKIP_BYTES)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _next_line(f: BinaryIO, limit: int) -> tuple[bytes, int] | None:
    """The next line without its end, and its length; a line longer than ``limit`` is skipped, not held
    (its bytes come back empty). None at the end of the file."""
    line = f.readline(limit + 2)  # room for "\r\n"
    if not line:
        return None
    if line.endswith(b"\n") or len(line) <= limit:
        body = line.rstrip(b"\r\n")
        return body, len(body)
    return b"", len(line) + _skip_line(f)


def _read_jsonl(item: WorkItem, text_field: str, limit: int) -> Iterator[Record]:
    """Lines starting in [start, end); for .gz the whole file (gzip cannot be split)."""
    with open_input(open_location(item.url)) as raw:
        f = gzip.GzipFile(fileobj=raw) if item.fmt == "jsonl.gz" else raw
        if item.start > 0:
            f.seek(item.start - 1)
            _skip_line(f)  # finish the line that started before our range; it belongs to the previous unit
        position = 0
        while item.end is None or f.tell() < item.end:
            got = _next_line(f, limit)
            if got is None:
                break
            line, size = got
            yield _too_large(position, size, limit, "line") if size > limit else _json_line_record(position, line, text_field)
            position += 1


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _text_column_records(first: int, column: pa.Array, text_field: str, limit: int) -> Iterator[Record]:
    """Records of a string column, decoded value by value (Arrow does not vouch for UTF-8); a value over
    ``limit`` is never copied out of Arrow."""
    data = column.cast(pa.large_binary())
    lengths = pc.binary_length(data)
    oversized = pc.fill_null(pc.greater(lengths, limit), False)
    kept = pc.if_else(oversized, pa.scalar(None, pa.large_binary()), data).to_pylist()
    sizes = pc.fill_null(lengths, 0).to_numpy()
    what = f"column {text_field!r}"
    for i, (big, value) in enumerate(zip(oversized.to_numpy(zero_copy_only=False), kept)):
        if big:
            yield _too_large(first + i, int(sizes[i]), limit, "value")
        elif value is None:
            yield Record(first + i, None, MISSING_TEXT_FIELD, f"{what} is null")
        else:
            yield _utf8_document(first + i, value, what)


def _other_column_records(first: int, column: pa.Array, text_field: str) -> Iterator[Record]:
    """A column that is not text: every non-null value is the wrong type."""
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            yield Record(first + i, None, MISSING_TEXT_FIELD, f"column {text_field!r} is null")
        else:
            yield Record(first + i, None, INVALID_TEXT_FIELD, f"column {text_field!r} is {type(value).__name__}")


def _read_parquet(item: WorkItem, text_field: str, limit: int) -> Iterator[Record]:
    with open_input(open_location(item.url)) as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            yield Record(-1, None, MISSING_TEXT_FIELD, f"no column {text_field!r}; columns: {pf.schema_arrow.names}")
            return
        end = pf.metadata.num_row_groups if item.end is None else item.end
        position = 0
        for batch in pf.iter_batches(row_groups=list(range(item.start, end)), columns=[text_field], batch_size=4096):
            column = batch.column(0)
            if _is_text_type(column.type):
                yield from _text_column_records(position, column, text_field, limit)
            else:
                yield from _other_column_records(position, column, text_field)
            position += len(column)


def read_item(item: WorkItem, text_field: str, max_doc_bytes: int) -> Iterator[Record]:
    """All records of ``item``; an error part-way quarantines the rest of the file, keeping what was read.

    Raises:
        RetriesExhausted: the storage kept failing (the job stops and names the file; nothing is lost).
    """
    if item.reason:  # the listing could not read it
        yield Record(-1, None, item.reason, item.detail)
        return
    if item.fmt == "unsupported":
        yield Record(-1, None, UNSUPPORTED_FORMAT, "extension not one of .txt .md .rst .jsonl .jsonl.gz .parquet")
        return
    if item.fmt == "text":
        records = _read_text_file(item, max_doc_bytes)
    elif item.fmt == "parquet":
        records = _read_parquet(item, text_field, max_doc_bytes)
    else:
        records = _read_jsonl(item, text_field, max_doc_bytes)
    last = -1
    try:
        for rec in records:
            last = rec.position
            yield rec
    except RetriesExhausted:
        raise
    except Exception as e:  # noqa: BLE001 - any other read failure is quarantined with its cause
        where = "" if last < 0 else f" after record {last}"
        yield Record(-1, None, UNREADABLE, f"{type(e).__name__}{where}: {e}"[:2000])
