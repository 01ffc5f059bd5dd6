"""Pure kNN pieces shared by the index and neighbors stages (no Ray, no storage).

- ``filter_candidates``: the neighbor rule (never the chunk itself, never its own document,
  -1 pads), applied to what the index returned.
- ``search_neighbors``: asks the index for k + extra (+1 for the chunk itself); the rows that the
  filter leaves short (a large document crowding the top of the list, where the seed wrote -1s)
  are searched again per document with the document excluded by a faiss ID selector.
- ``exact_block`` / ``merge_topk``: brute-force ground truth for a query sample, one block of the
  database at a time, so it runs part by part in parallel and never holds all embeddings.
- ``recall_at_k``: id recall that counts ties (duplicate texts give equal distances) as hits.

Scores are "smaller is nearer" internally: squared L2, or the negated inner product.
"""
from __future__ import annotations

import numpy as np

TIE_CANDIDATES = 8  # ground truth keeps k + this many, so equal-distance alternatives count as hits
RETRY_ROUNDS = 3  # re-searches of rows left short: 1x, 4x, 16x the probes
EXACT_REFETCH_MAX = 2048  # exact indices re-ask short rows for this many candidates at most


def use_blas_for_batches() -> None:
    """With faiss' defaults (BLAS threshold 128k, database blocks of 1024), flat searches of a few
    hundred to a few thousand queries ran 2-5x slower per query here than with these settings."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    faiss.cvar.distance_compute_blas_database_bs = 4096


def pad_distance(metric: str) -> float:
    """Distance written for a -1 pad: the worst possible value under the metric."""
    return float("inf") if metric == "l2" else float("-inf")


def filter_candidates(cand_ids: np.ndarray, cand_dist: np.ndarray, query_ids: np.ndarray, lo: np.ndarray,
                      hi: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, in the index's order, the first k candidates that are neither the query nor in
    ``[lo, hi)`` (its document); returns ids (n, k) with -1 pads, distances, and valid counts."""
    n = len(query_ids)
    valid = (cand_ids >= 0) & (cand_ids != query_ids[:, None])
    valid &= ~((cand_ids >= lo[:, None]) & (cand_ids < hi[:, None]))
    rank = np.cumsum(valid, axis=1) - 1
    keep = valid & (rank < k)
    ids = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), pad_distance(metric), dtype=np.float32)
    r, c = np.nonzero(keep)
    ids[r, rank[r, c]] = cand_ids[r, c]
    dist[r, rank[r, c]] = cand_dist[r, c]
    return ids, dist, np.minimum(valid.sum(axis=1), k)


def ivf_of(index):
    """The IVF part of an index (also inside a pre-transform), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except Exception:  # noqa: BLE001 - not an IVF index (Flat, HNSW, shards)
        return None


def _params_for(index, sel, boost: int, keep: list):
    """Search parameters carrying ``sel`` for this index type, with ``boost`` x the probes."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        inner = _params_for(idx.index, sel, boost, keep)
        keep.append(inner)
        return faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(idx, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(min(idx.nlist, max(1, idx.nprobe) * boost)))
    if isinstance(idx, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(idx.hnsw.efSearch * boost))
    return faiss.SearchParameters(sel=sel)


def search_excluding(index, x: np.ndarray, k: int, lo: int, hi: int, boost: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """k nearest ids outside ``[lo, hi)`` (a document, which contains the query itself), using a
    search-time faiss ID selector, so the excluded document cannot crowd out the answer."""
    import faiss

    shards = faiss.downcast_index(index)
    if isinstance(shards, faiss.IndexShards):  # selectors see shard-local ids: search shard by shard
        found_d, found_i, offset = [], [], 0
        for i in range(shards.count()):
            shard = shards.at(i)
            d, ids = search_excluding(shard, x, k, max(lo - offset, 0), max(hi - offset, 0), boost, metric)
            found_d.append(d)
            found_i.append(np.where(ids >= 0, ids + offset, -1))
            offset += int(shard.ntotal)
        ids, d = np.concatenate(found_i, 1), np.concatenate(found_d, 1)
        score = np.where(ids < 0, np.inf, d if metric == "l2" else -d)
        order = np.argsort(score, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
    sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(lo), int(max(lo, hi))))
    keep: list = [sel]
    params = _params_for(index, sel, boost, keep)
    return index.search(x, k, params=params)


def batched_search(index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, list-major with BLAS for a plain IVF-Flat index and a big batch (ivf_blas)."""
    from pipelines.search import ivf_blas

    ivf = ivf_blas.plain_ivf_flat(index)
    if ivf is not None and ivf_blas.worth_it(ivf, len(x)):
        return ivf_blas.search(ivf, x, k)
    return index.search(x, k)


def search_neighbors(index, x: np.ndarray, query_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, k: int,
                     extra: int, metric: str, candidates: list | None = None, exact=None,
                     rerank: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k filtered neighbors per query row; returns (ids, distances, rows_short mask).

    One batched search for k + extra + 1 candidates serves most rows. Rows the filter leaves
    short (their own document crowds the candidates) are searched again: on an exact index with
    k + document length + 1 candidates (enough by construction); otherwise, and for documents too
    long for that, per document with the document excluded at search time by an ID selector, with
    1x, 4x, then 16x the probes (IVF nprobe / HNSW efSearch).
    ``exact`` (a :class:`pipelines.search.rerank.ExactVectors`) re-ranks every search's candidates
    with exact distances; the index is then asked for at least ``rerank`` candidates per row.
    ``candidates`` (a list) receives the unfiltered first-pass ids, for measuring the index alone."""
    ntotal = int(index.ntotal)
    wanted = k + extra + 1 if exact is None else max(k + extra + 1, rerank)

    def ranked(xq: np.ndarray, d: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (d, i) if exact is None else exact.rescore(xq, i, metric)

    fetch = max(1, min(wanted, ntotal))
    cand_d, cand_i = batched_search(index, x, fetch)
    if candidates is not None:
        candidates.append(cand_i)
    cand_d, cand_i = ranked(x, cand_d, cand_i)
    ids, dist, n_valid = filter_candidates(cand_i, cand_d, query_ids, lo, hi, k, metric)
    short = n_valid < k
    if fetch >= ntotal:  # every vector was a candidate: nothing more to find
        return ids, dist, short
    boostable = _boostable(index)
    if not boostable and short.any():
        # exact index: k + (document length) + 1 candidates always hold k from other documents,
        # and one batched (BLAS) search for all short rows beats per-document filtered scans
        rows = np.nonzero(short)[0]
        rows = rows[(hi[rows] - lo[rows]) + k + 1 <= EXACT_REFETCH_MAX]
        if len(rows):
            wide = int(min(ntotal, (hi[rows] - lo[rows]).max() + wanted))
            d2, i2 = ranked(x[rows], *index.search(x[rows], wide))
            ids[rows], dist[rows], n_valid[rows] = filter_candidates(i2, d2, query_ids[rows], lo[rows], hi[rows], k, metric)
            short = n_valid < k
    boost = 1
    for _ in range(RETRY_ROUNDS):
        if not short.any():
            break
        rows = np.nonzero(short)[0]
        for doc_lo in np.unique(lo[rows]).tolist():
            grp = rows[lo[rows] == doc_lo]
            d2, i2 = search_excluding(index, x[grp], k if exact is None else fetch, doc_lo, int(hi[grp[0]]), boost, metric)
            d2, i2 = ranked(x[grp], d2, i2)
            d2, i2 = d2[:, :k], i2[:, :k]
            nv2 = (i2 >= 0).sum(1)
            better = nv2 > n_valid[grp]
            upd = grp[better]
            ids[upd] = i2[better]
            dist[upd] = np.where(i2[better] >= 0, d2[better], pad_distance(metric))
            n_valid[upd] = nv2[better]
        short = n_valid < k
        boost *= 4
        if not boostable:
            break  # exact indices: more probes cannot find more
    return ids, dist, short


def _boostable(index) -> bool:
    """Whether more probes can find more (IVF, HNSW; shards of them)."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexShards):
        return idx.count() > 0 and _boostable(idx.at(0))
    return ivf_of(idx) is not None or isinstance(idx, faiss.IndexHNSW)


def exact_block(queries: np.ndarray, query_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray, block: np.ndarray,
                block_ids: np.ndarray, m: int, metric: str) -> tuple[tuple, tuple]:
    """Exact top-m of ``queries`` within one block of the database, twice: excluding only the
    query itself ("raw", what the index alone is judged on) and also excluding its document
    ``[lo, hi)`` ("filtered", the neighbor rule). Each is (ids with -1 pads, scores)."""
    if metric == "l2":
        score = (queries * queries).sum(1)[:, None] + (block * block).sum(1)[None, :] - 2.0 * (queries @ block.T)
    else:
        score = -(queries @ block.T)
    score = score.astype(np.float32)
    score[block_ids[None, :] == query_ids[:, None]] = np.inf
    raw = _top_m(score, block_ids, m)
    score[(block_ids[None, :] >= lo[:, None]) & (block_ids[None, :] < hi[:, None])] = np.inf
    return raw, _top_m(score, block_ids, m)


def _top_m(score: np.ndarray, block_ids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    width = score.shape[1]
    if m < width:
        cols = np.argpartition(score, m - 1, axis=1)[:, :m]
    else:
        cols = np.broadcast_to(np.arange(width), score.shape)
    s = np.take_along_axis(score, cols, 1)
    ids = np.where(np.isfinite(s), block_ids[cols], -1)
    return pad_topk(ids, s, m)


def pad_topk(ids: np.ndarray, scores: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score, id), -1 entries last, and cut or pad to m columns."""
    n = ids.shape[0]
    scores = np.where(ids < 0, np.inf, scores).astype(np.float32)
    if ids.shape[1] < m:
        ids = np.concatenate([ids, np.full((n, m - ids.shape[1]), -1, np.int64)], 1)
        scores = np.concatenate([scores, np.full((n, m - scores.shape[1]), np.inf, np.float32)], 1)
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, scores), axis=1)[:, :m]
    return np.take_along_axis(ids, order, 1).astype(np.int64), np.take_along_axis(scores, order, 1)


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], m: int) -> tuple[np.ndarray, np.ndarray]:
    return pad_topk(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1), m)


def empty_topk(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, m), -1, np.int64), np.full((n, m), np.inf, np.float32)


def recall_at_k(found: np.ndarray, gt_ids: np.ndarray, gt_scores: np.ndarray, k: int) -> float:
    """Share of the exact k nearest found; any id as near as the exact k-th one counts (ties)."""
    want = np.minimum((gt_ids[:, :k] >= 0).sum(1), k)
    if want.sum() == 0:
        return 1.0
    kth = gt_scores[np.arange(len(gt_ids)), np.maximum(want - 1, 0)]
    kth = np.where(want > 0, kth, -np.inf)
    tol = 1e-4 * np.abs(np.where(np.isfinite(kth), kth, 0)) + 1e-5
    accept = (gt_ids >= 0) & (gt_scores <= (kth + tol)[:, None])
    match = (found[:, :k, None] == gt_ids[:, None, :]) & accept[:, None, :] & (found[:, :k, None] >= 0)
    hits = np.minimum(match.any(axis=2).sum(1), want)
    return float(hits.sum() / want.sum())
