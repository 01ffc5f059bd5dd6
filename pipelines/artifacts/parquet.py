"""Deterministic Parquet encoding: the same table always gives the same bytes.

Byte-identical parts are part of the artifact contract (reruns and resumed runs must reproduce
them), so every part is encoded here with fixed writer options and no timestamps.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.artifacts.storage import Location, read_bytes, sha256_bytes, write_bytes_atomic


def table_to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        write_statistics=False,
        store_schema=True,
        row_group_size=1 << 20,
    )
    return buf.getvalue()


def write_table(loc: Location, rel: str, table: pa.Table) -> dict:
    """Commit ``table`` at ``rel``; return its manifest entry (path, rows, bytes, sha256)."""
    data = table_to_bytes(table)
    write_bytes_atomic(loc, rel, data)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": sha256_bytes(data)}


def read_table(loc: Location, rel: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(loc, rel)), columns=columns)
