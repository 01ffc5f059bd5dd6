"""Re-index, step 5: the neighbors version that goes with the new index version.

One part per embeddings part, as the neighbors stage writes them (rows for every chunk id, in
order), computed by :class:`ReindexNeighborsWorker` actors through
:func:`pipelines.stages.neighbors.run_parts`. Per row:
- a tombstoned chunk: its neighbors are dropped (all -1, pad distances);
- a new chunk, and every live chunk after a full rebuild: searched on the new index
  (:func:`pipelines.search.knn.search_neighbors`: never itself, never its own document);
- an old chunk with a tombstoned neighbor: searched again on the new index;
- any other old chunk: its stored neighbors are still its nearest among the old chunks, so only the
  new chunks can change them: ``delta.index`` (the new vectors alone) is searched and merged with
  the stored list (:func:`pipelines.search.knn.merge_topk`). With an exact index that gives what a full
  rebuild gives. Rows the merge leaves unchanged keep their stored bytes.
Parts are committed with a sidecar in ``_parts/`` as the neighbors stage does, so a killed run
resumes with the parts it finished.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import ray

from pipelines.artifacts.embeddings import DocBounds, EmbeddingPart, NpyPart, load_embeddings_info, part_rel, read_part_ids
from pipelines.artifacts.lock import OutLock
from pipelines.artifacts.manifest import part_is_valid, part_name, read_manifest, write_manifest
from pipelines.artifacts.parquet import write_table
from pipelines.artifacts.storage import Location, open_location, remove_stale_temporaries, write_bytes_atomic
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import NeighborsReader, fetch_files, open_index, read_faiss
from pipelines.runtime.procstats import peak_rss_mb
from pipelines.runtime.ray_session import max_node_cpus
from pipelines.search.knn import merge_topk, pad_distance, search_neighbors, use_blas_for_batches
from pipelines.search.rerank import ExactVectors
from pipelines.stages.neighbors import MIN_ROWS_PER_ACTOR, QUERY_BLOCK_ROWS, run_parts
from pipelines.stages.neighbors_parts import committed_part, neighbors_table, sample_recall, sidecar_path

COUNTS = ("rows_new", "rows_researched", "rows_checked", "rows_updated", "rows_dropped")


def _score(dist: np.ndarray, metric: str) -> np.ndarray:
    """Smaller is nearer (what merge_topk sorts by)."""
    return dist if metric == "l2" else -dist


def _dist(score: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    d = score if metric == "l2" else -score
    return np.where(ids >= 0, d, pad_distance(metric)).astype(np.float32)


class ReindexNeighborsWorker:
    """A Ray actor: the new index (memory-mapped where possible), ``delta.index``, the stored
    neighbors of the published version, document bounds and tombstones, loaded once."""

    def __init__(self, out_url: str, index_version: str, folder: str, base_neighbors: str, chunks_covered: int,
                 chunks_total: int, tombstone_parts: int, k: int, extra: int, metric: str, full: bool, threads: int):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        use_blas_for_batches()
        self.out = open_location(out_url)
        self.index = open_index(self.out, index_version, mmap=True)
        self.delta = None
        m = read_manifest(self.out, f"index/{index_version}")
        if not full and any(e["path"] == "delta.index" for e in m["parts"]):
            entries = [e for e in m["parts"] if e["path"] == "delta.index"]
            local = fetch_files(self.out, f"index/{index_version}", entries)
            self.delta = read_faiss(os.path.join(local, "delta.index"), mmap=False)
        self.rerank = int(m.get("rerank_candidates", 0))
        self.exact = ExactVectors(self.out, load_embeddings_info(self.out)) if self.rerank else None
        self.bounds = DocBounds.load(self.out, chunks_total)
        self.tomb = Tombstones.load(self.out, tombstone_parts)
        self.stored = None if full else NeighborsReader(self.out, base_neighbors)
        self.folder, self.covered, self.k, self.extra, self.metric, self.full = folder, chunks_covered, k, extra, metric, full

    def _search(self, index, x, q, k, extra):
        lo, hi = self.bounds.range_of(q)
        ids, dist, _ = search_neighbors(index, x, q, lo, hi, k=k, extra=extra, metric=self.metric, exact=self.exact,
                                        rerank=self.rerank)
        return ids, dist

    def part(self, part: EmbeddingPart) -> dict:
        name = part_name(part.index)
        kept = committed_part(self.out, self.folder, name, part.rows)
        if kept is not None:
            return kept
        t = time.perf_counter()
        chunk_ids = read_part_ids(self.out, part) if part.rows else np.zeros(0, np.int64)
        k, n = self.k, part.rows
        dead = self.tomb.dead(chunk_ids)
        ids = np.full((n, k), -1, np.int64)
        dist = np.full((n, k), pad_distance(self.metric), np.float32)
        counts = dict.fromkeys(COUNTS, 0)
        counts["rows_dropped"] = int(dead.sum())
        new_rows = part.offset >= self.covered
        if self.full or new_rows:
            search = ~dead
            merge = np.zeros(n, bool)
            counts["rows_new" if new_rows else "rows_researched"] = int(search.sum())
        else:
            stored_ids, stored_dist = self.stored.lookup(chunk_ids)
            ids[~dead], dist[~dead] = stored_ids[~dead], stored_dist[~dead]
            lost = (self.tomb.dead(np.maximum(stored_ids, 0)) & (stored_ids >= 0)).any(1)
            search = ~dead & lost
            merge = ~dead & ~lost if self.delta is not None and self.delta.ntotal > 0 else np.zeros(n, bool)
            counts["rows_researched"], counts["rows_checked"] = int(search.sum()), int(merge.sum())
        if search.any() or merge.any():
            npy = NpyPart(self.out, part_rel(part))
            for start, block in npy.blocks(QUERY_BLOCK_ROWS):
                sl = slice(start, start + len(block))
                q = chunk_ids[sl]
                rows = np.nonzero(search[sl])[0]
                if len(rows):
                    ids[sl][rows], dist[sl][rows] = self._search(self.index, block[rows], q[rows], k, self.extra)
                rows = np.nonzero(merge[sl])[0]
                if len(rows):
                    # new chunks are never the query nor in its document: a plain search, no filter
                    new_dist, new_ids = self.delta.search(block[rows], min(k, int(self.delta.ntotal)))
                    old_ids, old_dist = ids[sl][rows], dist[sl][rows]
                    m_ids, m_score = merge_topk((old_ids, _score(old_dist, self.metric)),
                                                (new_ids, _score(new_dist, self.metric)), k)
                    changed = (m_ids != old_ids).any(1)
                    upd = rows[changed]
                    ids[sl][upd] = m_ids[changed]
                    dist[sl][upd] = _dist(m_score[changed], m_ids[changed], self.metric)
                    counts["rows_updated"] += int(changed.sum())
        entry = write_table(self.out, f"{self.folder}/{name}", neighbors_table(chunk_ids, ids, dist))
        entry = entry | {"path": name, "first_chunk_id": part.offset,
                         "pad_rows": int(((ids < 0).any(1) & ~dead).sum()), "short_rows": 0, **counts}
        write_bytes_atomic(self.out, sidecar_path(self.folder, name), json.dumps(entry).encode())
        return entry | {"kept": False, "seconds": round(time.perf_counter() - t, 3), "peak_rss_mb": peak_rss_mb()}

    def run(self, part: dict) -> dict:
        return self.part(EmbeddingPart.from_dict(part))


@dataclass
class NeighborsUpdate:
    version: str
    chunks: int
    rows_new: int
    rows_researched: int
    rows_checked: int
    rows_updated: int
    rows_dropped: int
    parts: int
    parts_kept: int
    recall_at_k: float | None
    seconds: float


def run_reindex_neighbors(out: Location, *, version: str, index_version: str, base_neighbors: str,
                          chunks_covered: int, tombstone_parts: int, k: int, extra: int, metric: str, full: bool,
                          fingerprint: str, reindex: dict, concurrency: int, config: dict,
                          lock: OutLock) -> NeighborsUpdate:
    """Compute (or resume) ``neighbors/<version>`` and write its manifest (while ``lock`` is still this
    run's); LATEST is left alone."""
    start = time.perf_counter()
    folder = f"neighbors/{version}"
    remove_stale_temporaries(out, folder)
    info = load_embeddings_info(out, needed_by="the re-index job")
    parts = list(info.parts)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    n_actors = max(1, min(concurrency or cluster_cpus, len(parts), math.ceil(info.n / MIN_ROWS_PER_ACTOR)))
    cpus = max(1, min(cluster_cpus // n_actors, max_node_cpus()))
    entries = run_parts(out.url, parts, n_actors=n_actors, cpus=cpus, worker_cls=ReindexNeighborsWorker,
                        index_version=index_version, folder=folder, base_neighbors=base_neighbors,
                        chunks_covered=chunks_covered, chunks_total=info.n, tombstone_parts=tombstone_parts, k=k,
                        extra=extra, metric=metric, full=full)
    entries.sort(key=lambda e: e["first_chunk_id"])
    kept = sum(1 for e in entries if e.pop("kept"))
    for e in entries:
        e.pop("seconds", None), e.pop("peak_rss_mb", None)
    if [e["first_chunk_id"] for e in entries] != [p.offset for p in parts] or \
            [e["rows"] for e in entries] != [p.rows for p in parts] or \
            not all(part_is_valid(out, folder, e) for e in entries):
        raise RuntimeError(f"{out.url_of(folder)}: parts do not cover every chunk exactly once; not publishing")
    counts = {c: sum(int(e[c]) for e in entries) for c in COUNTS}
    recall = sample_recall(out, folder, f"index/{index_version}", entries, k)
    lock.verify()
    write_manifest(out, folder, stage="reindex", parts=entries,
                   totals={"rows": info.n, "k": k, "rows_with_pads": sum(e["pad_rows"] for e in entries),
                           "rows_short_after_retries": 0, "rows_tombstoned": counts["rows_dropped"]},
                   config=config,
                   extra={"fingerprint": fingerprint, "index_version": index_version, "metric": metric,
                          "recall_at_k": recall, "reindex": reindex | counts | {"base_neighbors": base_neighbors}})
    return NeighborsUpdate(version, info.n, *(counts[c] for c in COUNTS), len(parts), kept, recall,
                           time.perf_counter() - start)
