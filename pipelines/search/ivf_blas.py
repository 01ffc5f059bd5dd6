"""List-major IVF-Flat search with BLAS, for the neighbors stage's big query batches.

faiss searches an IVF-Flat index query by query, scanning each probed list with vector
instructions. The neighbors stage queries every chunk, thousands at a time, so each inverted list
is probed by many queries of the same batch: grouping the batch by list turns the scans into one
matrix product per list (queries of the list x the list's vectors, ``faiss.knn``: BLAS plus
C++ heaps), 5-7x faster here than ``index.search`` at dim 384 with 8,192-query batches. Results equal faiss' own search up to float rounding and ties (same lists, same vectors,
exact distances). Used for plain IVF-Flat indices when the batch gives enough queries per list;
everything else goes to faiss.
"""
from __future__ import annotations

import numpy as np

MIN_QUERIES_PER_LIST = 16  # below this, per-list matrix products are too thin to beat faiss' scan
MIN_DIM = 128  # at small dimensions faiss' own scan is already cheap (measured slower here at d=64)


def plain_ivf_flat(index):
    """The IndexIVFFlat itself when ``index`` is one (no pre-transform, no refinement), else None."""
    import faiss

    idx = faiss.downcast_index(index)
    return idx if isinstance(idx, faiss.IndexIVFFlat) else None


def worth_it(ivf, n_queries: int) -> bool:
    return ivf.d >= MIN_DIM and n_queries * ivf.nprobe >= MIN_QUERIES_PER_LIST * ivf.nlist


def _list_arrays(invlists, lst: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    size = invlists.list_size(lst)
    codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * d * 4)
    ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
    return np.frombuffer(codes, dtype=np.float32).reshape(size, d), np.asarray(ids, dtype=np.int64)


def search(ivf, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k nearest in the probed lists, like ``ivf.search(x, k)``."""
    import faiss

    n, d = x.shape
    ip = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    _, assign = ivf.quantizer.search(x, ivf.nprobe)
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    lists, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    best_s = np.full((n, k), np.inf, np.float32)  # scores: smaller is nearer
    best_i = np.full((n, k), -1, np.int64)
    invlists = ivf.invlists
    metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    for lst, s, e in zip(lists.tolist(), starts.tolist(), ends.tolist()):
        if lst < 0 or invlists.list_size(lst) == 0:
            continue
        rows = order[s:e] // ivf.nprobe
        vecs, ids = _list_arrays(invlists, lst, d)
        take = min(k, len(ids))
        dist, local = faiss.knn(x[rows], vecs, take, metric=metric)  # BLAS + C++ heaps
        score = -dist if ip else dist
        cand_s = np.concatenate([best_s[rows], score], 1)
        cand_i = np.concatenate([best_i[rows], np.where(local >= 0, ids[np.maximum(local, 0)], -1)], 1)
        keep = np.argpartition(cand_s, k - 1, axis=1)[:, :k]
        best_s[rows] = np.take_along_axis(cand_s, keep, 1)
        best_i[rows] = np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(best_s, axis=1, kind="stable")
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    if ip:
        return np.where(best_i >= 0, -best_s, -np.inf).astype(np.float32), best_i
    return np.maximum(best_s, 0).astype(np.float32), best_i
