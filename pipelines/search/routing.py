"""List-routed all-chunks search: the pure pieces (no Ray, no storage).

At 10^9 chunks no worker can hold the index plus the exact vectors it must rank with. The
routed search splits the IVF's inverted lists into shards whose exact (float16) vectors fit a
worker's memory budget, routes every query to the shards holding the lists it probes, ranks it
there with exact distances (own document excluded by a mask, so no retries are needed), and
merges each query's per-shard top-k. A shard is scanned list by list with one matrix product
per (list, queries probing it), as :mod:`pipelines.search.ivf_blas` does on one node.

Shards are cut from an ordering of the lists in which nearby centroids are adjacent (recursive
bisection along the principal axis), so the few lists a query probes mostly fall in one or two
shards: fewer copies of each query travel. Every worker's memory is bounded by its shard plus
one block of queries, never by N.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.search.faiss_index import memory_bytes
from pipelines.search.knn import empty_topk

SEARCH_MODES = ("auto", "index", "routed")
SMALL_K = 4  # up to this k, the per-list top-k is k argmin passes
MAX_PROBE_FACTOR = 4  # a query whose own document fills its lists probes up to this x nprobe


def shard_bytes_per_vector(dim: int) -> int:
    """Memory a shard holds per vector: float32 values (BLAS' type), chunk id, squared norm."""
    return dim * 4 + 8 + 4


def check_search_mode(mode: str, shard_memory: str) -> None:
    """Validate ``--neighbors-search`` and ``--shard-memory`` (the build's config and the stage call this)."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"--neighbors-search must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    memory_bytes(shard_memory, "--shard-memory")


@dataclass(frozen=True)
class ShardPlan:
    """Which shard holds each inverted list (``-1``: an empty list, in no shard)."""

    list_shard: np.ndarray
    shard_bytes: np.ndarray

    @property
    def shards(self) -> int:
        return len(self.shard_bytes)


def spatial_list_order(centroids: np.ndarray, leaf: int = 8) -> np.ndarray:
    """List ids ordered so that nearby centroids are adjacent: split at the median along the
    principal axis, recursively (a k-d tree on principal axes, read leaf by leaf)."""
    order: list[np.ndarray] = []
    stack = [np.arange(len(centroids))]
    while stack:
        ids = stack.pop()
        if len(ids) <= leaf:
            order.append(ids)
            continue
        x = centroids[ids] - centroids[ids].mean(0)
        axis = np.linalg.svd(x[: min(len(x), 4096)], full_matrices=False)[2][0]
        proj = x @ axis
        half = np.argsort(proj, kind="stable")
        mid = len(ids) // 2
        stack.append(ids[half[mid:]])  # popped second: the low half comes first
        stack.append(ids[half[:mid]])
    return np.concatenate(order) if order else np.zeros(0, np.int64)


def plan_shards(list_sizes: np.ndarray, centroids: np.ndarray, dim: int, budget_bytes: int) -> ShardPlan:
    """Cut the lists, in spatial order, into shards of at most ``budget_bytes`` of vectors each.

    A single list larger than the budget is a shard of its own (and the caller is told by
    ``shard_bytes``): splitting a list would send its queries to several workers anyway."""
    per_vector = shard_bytes_per_vector(dim)
    list_shard = np.full(len(list_sizes), -1, np.int64)
    sizes: list[int] = []
    used = 0
    for lst in spatial_list_order(np.asarray(centroids, np.float32)).tolist():
        b = int(list_sizes[lst]) * per_vector
        if b == 0:
            continue
        if not sizes or used + b > budget_bytes:
            sizes.append(0)
            used = 0
        list_shard[lst] = len(sizes) - 1
        sizes[-1] += b
        used += b
    return ShardPlan(list_shard, np.asarray(sizes, np.int64))


def probes_needed(probes: np.ndarray, list_sizes: np.ndarray, nprobe: int, need: np.ndarray) -> np.ndarray:
    """``probes`` (nearest lists first, ``MAX_PROBE_FACTOR`` x nprobe wide) cut per query to the first
    nprobe lists, or more when those hold fewer than ``need`` vectors (its own document's length + k):
    then the probed lists always hold k vectors of other documents, which the index search gets by
    re-searching short rows with more probes. Lists past the cut become -1."""
    sizes = np.where(probes >= 0, list_sizes[np.maximum(probes, 0)], 0)
    enough = np.cumsum(sizes, axis=1) >= need[:, None]
    width = np.where(enough.any(1), enough.argmax(1) + 1, probes.shape[1])
    width = np.maximum(width, min(nprobe, probes.shape[1]))
    return np.where(np.arange(probes.shape[1])[None, :] < width[:, None], probes, -1)


@dataclass
class ShardVectors:
    """One shard's exact vectors, sorted by list: ``vecs[starts[i]:ends[i]]`` is list ``lists[i]``."""

    ids: np.ndarray
    vecs: np.ndarray  # float32, (rows, dim)
    norms: np.ndarray  # squared L2 norms (l2 metric)
    lists: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def from_rows(cls, ids: np.ndarray, lists: np.ndarray, vecs: np.ndarray) -> ShardVectors:
        return cls.from_pieces([(ids, lists, vecs)])

    @classmethod
    def from_pieces(cls, pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ShardVectors:
        """From (ids, lists, vectors) pieces (any float dtype), filling one float32 array in list
        order: memory is the shard plus one piece, not several copies of the shard."""
        ids = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
        lists = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
        dim = pieces[0][2].shape[1] if pieces else 0
        order = np.lexsort((ids, lists))  # by list, ids ascending within a list (own-document runs)
        where = np.empty(len(order), np.int64)
        where[order] = np.arange(len(order))  # row of each input vector in the sorted array
        vecs = np.empty((len(ids), dim), np.float32)
        start = 0
        for _, _, v in pieces:
            vecs[where[start:start + len(v)]] = v
            start += len(v)
        ids, lists = ids[order], lists[order]
        uniq, starts = np.unique(lists, return_index=True)
        ends = np.append(starts[1:], len(lists))
        return cls(ids, vecs, (vecs * vecs).sum(1), uniq, starts, ends)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.vecs.nbytes + self.norms.nbytes


def pairs_by_shard(probes: np.ndarray, list_shard: np.ndarray, shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each shard, (row, list) of every probe of ``probes`` (-1: none) whose list lives there, rows
    ascending: what the queries bring to that shard, compact whatever the probe width."""
    rows, cols = np.nonzero(probes >= 0)
    lists = probes[rows, cols]
    owner = list_shard[lists]
    order = np.argsort(owner, kind="stable")
    cuts = np.searchsorted(owner[order], np.arange(shards + 1))
    return [(rows[order[a:b]].astype(np.int32), lists[order[a:b]].astype(np.int32))
            for a, b in zip(cuts[:-1], cuts[1:])]


def scan_shard(shard: ShardVectors, queries: np.ndarray, query_ids: np.ndarray, pair_rows: np.ndarray,
               pair_lists: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query within the lists it probes in this shard (``pair_rows[i]`` probes
    ``pair_lists[i]``), never from its own document ``[lo, hi)`` (which holds the query itself).
    Returns (ids with -1 pads, scores: smaller is nearer: squared L2 or the negated inner product)."""
    n = len(query_ids)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if not len(shard.lists) or not len(pair_rows):
        return empty_topk(n, k)
    slot = np.searchsorted(shard.lists, pair_lists)
    known = (slot < len(shard.lists)) & (shard.lists[np.minimum(slot, len(shard.lists) - 1)] == pair_lists)
    order = np.argsort(slot[known], kind="stable")
    rows, slot = pair_rows[known][order], slot[known][order]
    qnorm = (queries * queries).sum(1) if metric == "l2" else None
    for group in np.split(np.arange(len(slot)), np.flatnonzero(np.diff(slot)) + 1):
        if not len(group):
            continue
        s = int(slot[group[0]])
        r = rows[group]
        a, b = int(shard.starts[s]), int(shard.ends[s])
        score = queries[r] @ shard.vecs[a:b].T  # becomes the score in place: row constants added at the end
        if metric == "l2":
            score *= -2
            score += shard.norms[None, a:b]
        else:
            score *= -1
        ids = shard.ids[a:b]
        _mask_own_documents(score, ids, lo[r], hi[r])
        i_k, s_k = _smallest(score, ids, k)
        if qnorm is not None:
            s_k += qnorm[r, None]
        found.append((np.repeat(r, i_k.shape[1]), i_k.ravel(), s_k.ravel()))
    return _top_k_per_row(found, n, k)


def _top_k_per_row(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Merge (row, id, score) candidates from every list into each row's k best (ties by id), -1 pads:
    one sort for the whole block instead of a merge per list."""
    ids, scores = empty_topk(n, k)
    if not found:
        return ids, scores
    rows = np.concatenate([f[0] for f in found])
    cand = np.concatenate([f[1] for f in found])
    score = np.concatenate([f[2] for f in found])
    keep = cand >= 0
    rows, cand, score = rows[keep], cand[keep], score[keep]
    order = np.lexsort((cand, score, rows))
    rows, cand, score = rows[order], cand[order], score[order]
    start = np.searchsorted(rows, rows, side="left")
    rank = np.arange(len(rows)) - start
    top = rank < k
    ids[rows[top], rank[top]] = cand[top]
    scores[rows[top], rank[top]] = score[top]
    return ids, scores


def _mask_own_documents(score: np.ndarray, ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Set +inf where a list vector (``ids`` ascending) lies in the row's document ``[lo, hi)``: a
    contiguous run of the list, so only the rows whose document meets the list are touched."""
    first, last = np.searchsorted(ids, lo), np.searchsorted(ids, hi)
    rows = np.nonzero(last > first)[0]
    if len(rows):
        cols = np.arange(len(ids))
        own = (cols[None, :] >= first[rows, None]) & (cols[None, :] < last[rows, None])
        score[rows] = np.where(own, np.inf, score[rows])


def _smallest(score: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest scores per row with their ids (-1 where +inf), unsorted; ``score`` is consumed.
    For small k, k passes of ``argmin`` (about 3x cheaper than ``argpartition`` at k = 2)."""
    n, width = score.shape
    take = min(k, width)
    if take <= SMALL_K:
        rows = np.arange(n)
        cols = np.empty((n, take), np.int64)
        s_k = np.empty((n, take), np.float32)
        for j in range(take):
            cols[:, j] = np.argmin(score, axis=1)
            s_k[:, j] = score[rows, cols[:, j]]
            score[rows, cols[:, j]] = np.inf
    else:
        cols = np.argpartition(score, take - 1, axis=1)[:, :take] if take < width else \
            np.broadcast_to(np.arange(width), score.shape)
        s_k = np.take_along_axis(score, cols, 1).astype(np.float32)
    i_k = np.where(np.isfinite(s_k), ids[cols], -1)
    if take < k:
        s_k = np.concatenate([s_k, np.full((n, k - take), np.inf, np.float32)], 1)
        i_k = np.concatenate([i_k, np.full((n, k - take), -1, np.int64)], 1)
    return i_k, s_k


def scores_to_distances(ids: np.ndarray, scores: np.ndarray, metric: str) -> np.ndarray:
    """What the neighbors table stores: squared L2 (>= 0) or the inner product; pads get the worst value."""
    if metric == "l2":
        return np.where(ids >= 0, np.maximum(scores, 0), np.inf).astype(np.float32)
    return np.where(ids >= 0, -scores, -np.inf).astype(np.float32)
