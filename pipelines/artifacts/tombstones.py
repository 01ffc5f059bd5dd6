"""Tombstones: the documents (and their chunk id ranges) that a re-index removed or replaced.

Extends the artifact contract (README, "Re-indexing"). Ids are never reused, and published parts
are never rewritten, so a removed or changed document stays in ``docs/``, ``chunks/``, ``seqs/``
and ``embeddings/``; ``tombstones/`` says it is dead:

| path | content |
| --- | --- |
| ``tombstones/part-NNNNN.parquet`` | ``doc_id`` int64, ``first_chunk_id`` int64, ``num_chunks`` int64 (the dead chunk ids are ``[first_chunk_id, first_chunk_id + num_chunks)``), ``source`` string, ``reason`` string (``removed``, ``changed``, ``quarantined``) |
| ``tombstones/_manifest.json`` | parts with rows and sha256; totals ``documents``, ``chunks`` |

One part per re-index run that tombstoned anything, numbered in order. A published index version
never returns a tombstoned chunk, and a neighbors row of a tombstoned chunk is all -1 pads.
Readers of ``chunks/``, ``docs/`` and ``seqs/`` skip tombstoned ids with :class:`Tombstones`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.artifacts.manifest import part_name, read_manifest
from pipelines.artifacts.parquet import read_table, write_table
from pipelines.artifacts.storage import Location

FOLDER = "tombstones"
SCHEMA = pa.schema([("doc_id", pa.int64()), ("first_chunk_id", pa.int64()), ("num_chunks", pa.int64()),
                    ("source", pa.string()), ("reason", pa.string())])
REASONS = ("removed", "changed", "quarantined")


@dataclass(frozen=True)
class Tombstones:
    """Every tombstoned document: sorted, disjoint chunk ranges (memory: 24 bytes per dead document)."""

    doc_ids: np.ndarray
    first: np.ndarray  # sorted
    count: np.ndarray
    parts: int  # tombstone parts these come from (a published version records how many it applied)

    @classmethod
    def empty(cls) -> "Tombstones":
        z = np.zeros(0, np.int64)
        return cls(z, z, z, 0)

    @classmethod
    def load(cls, out: Location, parts: int | None = None) -> "Tombstones":
        """The tombstones of the first ``parts`` parts (default: all listed in the manifest)."""
        m = read_manifest(out, FOLDER)
        if m is None:
            return cls.empty()
        entries = m["parts"][: len(m["parts"]) if parts is None else parts]
        if not entries:
            return cls.empty()
        tables = [read_table(out, f"{FOLDER}/{e['path']}", columns=["doc_id", "first_chunk_id", "num_chunks"])
                  for e in entries]
        doc = np.concatenate([t.column(0).to_numpy() for t in tables]).astype(np.int64)
        first = np.concatenate([t.column(1).to_numpy() for t in tables]).astype(np.int64)
        count = np.concatenate([t.column(2).to_numpy() for t in tables]).astype(np.int64)
        order = np.argsort(first, kind="stable")
        return cls(doc[order], first[order], count[order], len(entries))

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def chunks(self) -> int:
        return int(self.count.sum())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.doc_ids.tobytes() + self.first.tobytes() + self.count.tobytes()).hexdigest()[:16]

    def dead(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``chunk_ids`` are tombstoned."""
        ids = np.asarray(chunk_ids, dtype=np.int64)
        if len(self.first) == 0:
            return np.zeros(ids.shape, bool)
        pos = np.searchsorted(self.first, ids, side="right") - 1
        ok = pos >= 0
        p = np.maximum(pos, 0)
        return ok & (ids < self.first[p] + self.count[p])

    def dead_docs(self) -> set[int]:
        return set(self.doc_ids.tolist())

    def chunk_ids(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The dead chunk ids in ``[lo, hi)``, sorted (for ``remove_ids``)."""
        ranges = [np.arange(max(f, lo), f + c if hi is None else min(f + c, hi), dtype=np.int64)
                  for f, c in zip(self.first.tolist(), self.count.tolist())]
        ranges = [r for r in ranges if len(r)]
        return np.concatenate(ranges) if ranges else np.zeros(0, np.int64)

    def since(self, parts: int, out: Location) -> "Tombstones":
        """Only the tombstones added after the first ``parts`` parts."""
        if parts >= self.parts:
            return Tombstones.empty()
        older = Tombstones.load(out, parts)
        keep = ~np.isin(self.doc_ids, older.doc_ids)
        return Tombstones(self.doc_ids[keep], self.first[keep], self.count[keep], self.parts)


def tombstones_table(doc_ids, first_chunk_ids, num_chunks, sources, reasons) -> pa.Table:
    bad = sorted(set(reasons) - set(REASONS))
    if bad:
        raise ValueError(f"unknown tombstone reason(s) {bad}")
    return pa.table({"doc_id": np.asarray(doc_ids, np.int64), "first_chunk_id": np.asarray(first_chunk_ids, np.int64),
                     "num_chunks": np.asarray(num_chunks, np.int64), "source": list(sources), "reason": list(reasons)},
                    schema=SCHEMA)


def write_tombstones_part(out: Location, index: int, table: pa.Table) -> dict:
    """Commit one tombstones part; returns its manifest entry (the manifest is written by the caller)."""
    name = part_name(index)
    return write_table(out, f"{FOLDER}/{name}", table) | {"path": name, "documents": table.num_rows,
                                                           "chunks": int(np.asarray(table.column("num_chunks")).sum())}
