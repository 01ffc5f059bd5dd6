"""numba kernels for the kNN memory's inverted-file (IVF) search on CPU, scanned list by list.

Why list-major: a query-major IVF scan (faiss' CPU search) reads each probed list once *per query*, so
4,096 queries x 2 lists x 64 keys x 64 floats pull about 130 MB per memory row through the caches, and
the scan is bound by memory traffic, not arithmetic. Here every list is loaded once per search into a
small scratch block (it stays in L1) and scored against all the queries that probe it; each (query,
list) pair keeps its own top-k, and a second pass merges a query's pairs. The traffic drops to one read
of the row's keys, and the search becomes compute-bound.

Lists are not stored as copies: ``assign[row, slot]`` names the list of each ring-buffer slot (-1 for
empty slots), and :func:`build_lists` turns it into a CSR of slots per list by a counting sort (well
under a millisecond per 64k-entry row), so adding and evicting entries is just overwriting ``assign``.

Keys may be float32 or bfloat16; bfloat16 keys are passed as their raw ``uint16`` bits and widened
on load (a bfloat16 is the upper half of a float32).
"""

from __future__ import annotations

import os

import numpy as np
import torch

# numba starts its thread pool at its full size on the first parallel call, and the threads it does not
# use still spin; a pool larger than this process's share of the CPUs (Ray gives each worker a few) slowed
# a 2-worker training step 2.5x. So, unless the user set it, the pool matches torch's thread count, which
# Ray sets from the worker's CPUs. (numba reads NUMBA_NUM_THREADS once, when it is first imported.)
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, torch.get_num_threads())))

from numba import njit, prange, types  # noqa: E402
from numba.extending import overload  # noqa: E402

__all__ = ["build_lists", "ivf_search"]


@njit(inline="always")
def _bucket(labels: np.ndarray, nlist: int, offsets: np.ndarray, rank: np.ndarray) -> None:
    """Counting sort of ``labels`` (N,) into ``nlist`` buckets (label -1: none): fills ``offsets``
    (nlist + 1,) with the bucket boundaries and ``rank`` (N,) with each item's position in bucket order
    (items keep their order within a bucket; -1 for unlabelled items)."""
    offsets[:] = 0
    for j in range(labels.shape[0]):
        if labels[j] >= 0:
            offsets[labels[j] + 1] += 1
    for lst in range(nlist):
        offsets[lst + 1] += offsets[lst]
    pos = offsets[:nlist].copy()
    for j in range(labels.shape[0]):
        lab = labels[j]
        if lab >= 0:
            rank[j] = pos[lab]
            pos[lab] += 1
        else:
            rank[j] = -1


@njit(cache=True, nogil=True)
def build_lists(assign: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of slots per list: ``offsets`` (R, nlist + 1) int64 and ``members`` (R, C) int32.

    List ``l`` of row ``r`` holds slots ``members[r, offsets[r, l]:offsets[r, l + 1]]`` in slot order;
    slots assigned -1 belong to no list.
    """
    R, C = assign.shape
    offsets = np.zeros((R, nlist + 1), dtype=np.int64)
    members = np.empty((R, C), dtype=np.int32)
    rank = np.empty(C, dtype=np.int64)
    for r in range(R):
        _bucket(assign[r], nlist, offsets[r], rank)
        for s in range(C):
            if rank[s] >= 0:
                members[r, rank[s]] = s
    return offsets, members


@njit(cache=True, nogil=True)
def group_pairs(probes: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the (query, probed list) pairs of each row by list.

    ``probes`` (R, Q, P) int64 list ids (-1: none). Returns ``pair_offsets`` (R, nlist + 1): the pairs of
    list ``l`` are ``pair_query[r, pair_offsets[r, l]:pair_offsets[r, l + 1]]`` (query indices), and
    ``pair_pos`` (R, Q, P): where pair (query, p) landed in that order (-1 for no list).
    """
    R, Q, P = probes.shape
    pair_offsets = np.zeros((R, nlist + 1), dtype=np.int64)
    pair_query = np.empty((R, Q * P), dtype=np.int32)
    pair_pos = np.empty((R, Q * P), dtype=np.int64)
    for r in range(R):
        _bucket(probes[r].reshape(Q * P), nlist, pair_offsets[r], pair_pos[r])
        for j in range(Q * P):
            if pair_pos[r, j] >= 0:
                pair_query[r, pair_pos[r, j]] = j // P
    return pair_offsets, pair_query, pair_pos.reshape(R, Q, P)


@njit(cache=True, nogil=True)
def pair_starts(pair_offsets: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(R, pairs + 1) where each pair's scores start in :func:`scan_lists`' output (a prefix sum of the
    probed lists' lengths, in pair order)."""
    R = pair_offsets.shape[0]
    nlist = pair_offsets.shape[1] - 1
    npairs = 0
    for r in range(R):
        npairs = max(npairs, pair_offsets[r, nlist])
    start = np.zeros((R, npairs + 1), dtype=np.int64)
    for r in range(R):
        pos = 0
        for lst in range(nlist):
            n = offsets[r, lst + 1] - offsets[r, lst]
            for pp in range(pair_offsets[r, lst], pair_offsets[r, lst + 1]):
                start[r, pp] = pos
                pos += n
        for pp in range(pair_offsets[r, nlist], npairs + 1):
            start[r, pp] = pos
    return start


@njit(inline="always")
def _heap_push(hs: np.ndarray, hi: np.ndarray, score: float, slot: int) -> None:
    """Offer (score, slot) to a min-heap of the k best so far (hs[0] is the worst kept)."""
    k = hs.shape[0]
    if score <= hs[0]:
        return
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        if c + 1 < k and hs[c + 1] < hs[c]:
            c += 1
        if hs[c] >= score:
            break
        hs[pos] = hs[c]
        hi[pos] = hi[c]
        pos = c
    hs[pos] = score
    hi[pos] = slot


def _load_list(keys: np.ndarray, members: np.ndarray, r: int, o0: int, o1: int, out: np.ndarray) -> None:
    """Copy the keys of row ``r``'s list slots ``members[r, o0:o1]`` into ``out`` (n, d) float32,
    widening bfloat16 bits (uint16 keys). Only callable from compiled code (see the overload below)."""
    raise NotImplementedError


@overload(_load_list, inline="always")
def _load_list_impl(keys, members, r, o0, o1, out):  # noqa: ANN001 - numba types
    if keys.dtype == types.uint16:
        def load_bf16(keys, members, r, o0, o1, out):  # noqa: ANN001
            bits = out.view(np.uint32)
            for j in range(o1 - o0):
                s = members[r, o0 + j]
                for e in range(out.shape[1]):
                    bits[j, e] = np.uint32(keys[r, s, e]) << 16
        return load_bf16

    def load_float(keys, members, r, o0, o1, out):  # noqa: ANN001
        for j in range(o1 - o0):
            s = members[r, o0 + j]
            for e in range(out.shape[1]):
                out[j, e] = keys[r, s, e]
    return load_float


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def scan_lists(queries: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
               members: np.ndarray, pair_offsets: np.ndarray, pair_query: np.ndarray, pair_start: np.ndarray
               ) -> np.ndarray:
    """Score every (query, list) pair against all keys of the list, list by list.

    ``queries`` (R, Q, d) float32; ``keys`` (R, C, d) float32 or uint16 (bfloat16 bits);
    ``offsets``/``members`` from :func:`build_lists`; ``pair_offsets``/``pair_query`` from
    :func:`group_pairs`; ``pair_start`` (R, Q*P + 1) where each pair's scores start in the output.
    Returns (R, max pair_start) float32 scores: pair ``pp`` of list ``l`` holds the scores of the list's
    entries in member order at ``pair_start[r, pp]``.
    """
    R, _, d = queries.shape
    nlist = offsets.shape[1] - 1
    total = 0
    for r in range(R):
        total = max(total, pair_start[r, -1])
    out = np.empty((R, total), dtype=np.float32)
    for t in prange(R * nlist):
        r = t // nlist
        lst = t - r * nlist
        p0, p1 = pair_offsets[r, lst], pair_offsets[r, lst + 1]
        o0, o1 = offsets[r, lst], offsets[r, lst + 1]
        n = o1 - o0
        if p1 == p0 or n == 0:
            continue
        block = np.empty((n, d), dtype=np.float32)
        _load_list(keys, members, r, o0, o1, block)
        # four queries per pass over the block: each loaded key vector feeds four dot products
        pp = p0
        while pp + 4 <= p1:
            q0, q1 = queries[r, pair_query[r, pp]], queries[r, pair_query[r, pp + 1]]
            q2, q3 = queries[r, pair_query[r, pp + 2]], queries[r, pair_query[r, pp + 3]]
            s0, s1, s2, s3 = pair_start[r, pp], pair_start[r, pp + 1], pair_start[r, pp + 2], pair_start[r, pp + 3]
            for j in range(n):
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for e in range(d):
                    b = block[j, e]
                    a0 += q0[e] * b
                    a1 += q1[e] * b
                    a2 += q2[e] * b
                    a3 += q3[e] * b
                out[r, s0 + j] = a0
                out[r, s1 + j] = a1
                out[r, s2 + j] = a2
                out[r, s3 + j] = a3
            pp += 4
        for pp in range(pp, p1):
            q0, s0 = queries[r, pair_query[r, pp]], pair_start[r, pp]
            for j in range(n):
                a0 = np.float32(0.0)
                for e in range(d):
                    a0 += q0[e] * block[j, e]
                out[r, s0 + j] = a0
    return out


@njit(parallel=True, cache=True, nogil=True)
def merge_pairs(pair_scores: np.ndarray, pair_start: np.ndarray, pair_pos: np.ndarray, probes: np.ndarray,
                offsets: np.ndarray, members: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-``k`` over all its probed lists, best first: ``(scores, slots)`` (R, Q, k);
    -inf / -1 past the entries found."""
    R, Q, P = pair_pos.shape
    scores = np.empty((R, Q, k), dtype=np.float32)
    slots = np.empty((R, Q, k), dtype=np.int64)
    for t in prange(R * Q):
        r = t // Q
        i = t - r * Q
        hs = np.full(k, -np.inf, dtype=np.float32)
        hi = np.full(k, -1, dtype=np.int64)
        for p in range(P):
            pp = pair_pos[r, i, p]
            if pp < 0:
                continue
            lst = probes[r, i, p]
            o0 = offsets[r, lst]
            base = pair_start[r, pp]
            for j in range(offsets[r, lst + 1] - o0):
                _heap_push(hs, hi, pair_scores[r, base + j], members[r, o0 + j])
        # heap -> descending order (insertion sort; k is small)
        for a in range(1, k):
            vs, vi = hs[a], hi[a]
            b = a - 1
            while b >= 0 and hs[b] < vs:
                hs[b + 1] = hs[b]
                hi[b + 1] = hi[b]
                b -= 1
            hs[b + 1] = vs
            hi[b + 1] = vi
        scores[r, i] = hs
        slots[r, i] = hi
    return scores, slots




def ivf_search(queries: np.ndarray, probes: np.ndarray, offsets: np.ndarray, members: np.ndarray,
               keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` slots by inner product among each query's probed lists, best first.

    ``queries`` (R, Q, d) float32; ``probes`` (R, Q, P) int64 list ids, distinct per query (-1: none);
    ``offsets``/``members`` from :func:`build_lists`; ``keys`` (R, C, d) float32 or uint16 (bfloat16 bits).
    Returns ``(scores, slots)`` (R, Q, k): float32 and int64, -inf / -1 past the entries found.
    """
    nlist = offsets.shape[1] - 1
    pair_offsets, pair_query, pair_pos = group_pairs(probes, nlist)
    start = pair_starts(pair_offsets, offsets)
    pair_scores = scan_lists(queries, keys, offsets, members, pair_offsets, pair_query, start)
    return merge_pairs(pair_scores, start, pair_pos, probes, offsets, members, k)
