"""Exact re-ranking of an index's candidates with the stored embeddings.

A compressed index (PQ, SQ, OPQ...) ranks by approximate distances: with 64-byte PQ codes the
true nearest neighbor is often not first (faiss' own SIFT1M figures: ``IVF4096,PQ64`` stops at
recall@1 0.82 at any nprobe). It is, however, almost always among the first few dozen candidates.
So the neighbors search asks the index for more candidates than it keeps (``rerank``, chosen by
the tuner for the measured recall), computes their exact distances from the float16 embeddings
that the embed stage stored (the same values the index was built from), and keeps the nearest.
The embeddings are memory-mapped on a local ``--out`` and read row by row on object storage;
no copy of them is held, unlike faiss' ``IndexRefineFlat``, which keeps every vector in float32
inside the index (four times the embeddings, in RAM).
"""
from __future__ import annotations

import numpy as np

from pipelines.artifacts.embeddings import EmbeddingsInfo, gather_rows
from pipelines.artifacts.storage import Location

RESCORE_BYTES = 64 << 20  # gathered candidate vectors per block: memory is bounded by this, not by the batch


def is_lossy(index) -> bool:
    """Whether the index's distances are approximate (anything but Flat storage: IVF-Flat,
    HNSW-Flat, IndexFlat, ID maps and shards of them are exact)."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexShards):
        return idx.count() > 0 and is_lossy(idx.at(0))
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return is_lossy(idx.index)
    if isinstance(idx, faiss.IndexHNSW):
        return not isinstance(faiss.downcast_index(idx.storage), faiss.IndexFlat)
    return not isinstance(idx, (faiss.IndexFlat, faiss.IndexIVFFlat))


class ExactVectors:
    """Exact (stored float16) embeddings by chunk id, for re-ranking candidates."""

    def __init__(self, out: Location, info: EmbeddingsInfo):
        self.out, self.info = out, info

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of ``ids`` (any order, repeats allowed; every id valid)."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        return gather_rows(self.out, self.info, uniq)[inverse]

    def rescore(self, x: np.ndarray, cand_ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Candidates re-sorted by exact distance: (distances, ids) like ``index.search``; -1 pads last.
        Rows go in blocks whose gathered vectors stay under ``RESCORE_BYTES``, whatever the candidate count."""
        n, c = cand_ids.shape
        dist = np.full((n, c), np.inf if metric == "l2" else -np.inf, np.float32)
        rows_per_block = max(1, RESCORE_BYTES // max(1, c * x.shape[1] * 4))
        for start in range(0, n, rows_per_block):
            rows = slice(start, min(n, start + rows_per_block))
            ok = cand_ids[rows] >= 0
            if not ok.any():
                continue
            block = np.zeros((ok.shape[0], c, x.shape[1]), np.float32)
            block[ok] = self.take(cand_ids[rows][ok])
            dot = np.einsum("nd,ncd->nc", x[rows], block)
            if metric == "l2":
                d = (x[rows] ** 2).sum(1)[:, None] + (block ** 2).sum(2) - 2 * dot
                dist[rows] = np.where(ok, np.maximum(d, 0), np.inf)
            else:
                dist[rows] = np.where(ok, dot, -np.inf)
        score = dist if metric == "l2" else -dist
        order = np.argsort(score, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(cand_ids, order, 1)
