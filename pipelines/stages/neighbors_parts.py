"""A neighbors version's parts: the table layout, committing a part with its sidecar, resuming from
the sidecars, and the recall of what was stored. Shared by the single-node search
(:mod:`pipelines.stages.neighbors`), the list-routed one (:mod:`pipelines.stages.neighbors_routed`)
and the re-index."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from pipelines.artifacts.embeddings import EmbeddingPart
from pipelines.artifacts.manifest import part_is_valid, part_name
from pipelines.artifacts.parquet import read_table, write_table
from pipelines.artifacts.storage import Location, exists, read_bytes, write_bytes_atomic
from pipelines.runtime.procstats import peak_rss_mb
from pipelines.search.knn import recall_at_k
from pipelines.search.tuning import HELD_OUT_ROWS


def neighbors_schema() -> pa.Schema:
    return pa.schema([("chunk_id", pa.int64()), ("neighbors", pa.list_(pa.int64())), ("distances", pa.list_(pa.float32()))])


def neighbors_table(chunk_ids: np.ndarray, ids: np.ndarray, dist: np.ndarray) -> pa.Table:
    n, k = ids.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.Table.from_arrays([pa.array(chunk_ids.astype(np.int64)),
                                 pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1).astype(np.int64))),
                                 pa.ListArray.from_arrays(offsets, pa.array(dist.reshape(-1).astype(np.float32)))],
                                schema=neighbors_schema())


def sidecar_path(folder: str, name: str) -> str:
    """Where a committed part's manifest entry waits for the version's manifest (what a resumed run keeps)."""
    return f"{folder}/_parts/{name}.json"


def commit_part(out: Location, folder: str, part: EmbeddingPart, chunk_ids: np.ndarray, ids: np.ndarray,
                dist: np.ndarray, short: np.ndarray) -> dict:
    """Write one neighbors part and its sidecar (what a resumed run keeps); returns its manifest entry."""
    name = part_name(part.index)
    entry = write_table(out, f"{folder}/{name}", neighbors_table(chunk_ids, ids, dist))
    entry = entry | {"path": name, "first_chunk_id": part.offset, "pad_rows": int((ids < 0).any(1).sum()),
                     "short_rows": int(short.sum())}
    write_bytes_atomic(out, sidecar_path(folder, name), json.dumps(entry).encode())
    return entry


def committed_part(out: Location, folder: str, name: str, rows: int) -> dict | None:
    """Resume: the manifest entry of part ``name`` when an earlier run committed it and it still validates."""
    sidecar = sidecar_path(folder, name)
    if not exists(out, sidecar):
        return None
    entry = json.loads(read_bytes(out, sidecar))
    if part_is_valid(out, folder, entry) and entry["rows"] == rows:
        return entry | {"kept": True, "peak_rss_mb": peak_rss_mb()}
    return None


def sample_recall(out: Location, folder: str, index_folder: str, entries: list[dict], k: int) -> float | None:
    """Recall of the written neighbors on the held-out half of the index version's exact-search
    sample (the half the tuner did not see)."""
    rel = f"{index_folder}/recall_sample.npz"
    if not exists(out, rel):
        return None
    with np.load(io.BytesIO(read_bytes(out, rel))) as z:
        held_out = HELD_OUT_ROWS if len(z["ids"]) >= 2 else slice(None)
        ids, gt_ids, gt_scores = z["ids"][held_out], z["filtered_ids"][held_out], z["filtered_scores"][held_out]
    if gt_ids.shape[1] < k:
        return None
    first = np.asarray([e["first_chunk_id"] for e in entries], dtype=np.int64)
    owner = np.searchsorted(first, ids, side="right") - 1
    # only the sample ids the entries cover (all of them, unless a benchmark searched some parts)
    covered = owner >= 0
    covered[covered] &= ids[covered] < first[owner[covered]] + np.asarray([e["rows"] for e in entries])[owner[covered]]
    ids, gt_ids, gt_scores, owner = ids[covered], gt_ids[covered], gt_scores[covered], owner[covered]
    if not len(ids):
        return None
    found = np.empty((len(ids), k), np.int64)
    for p in np.unique(owner).tolist():
        t = read_table(out, f"{folder}/{entries[p]['path']}", columns=["neighbors"])
        nb = t.column(0).combine_chunks().flatten().to_numpy().reshape(-1, k)
        sel = owner == p
        found[sel] = nb[ids[sel] - first[p]]
    return recall_at_k(found, gt_ids, gt_scores, k)
