"""The all-chunks neighbor search as a list-major IVF scan in PyTorch (GPU, or the CPU device in tests).

Every chunk is a query, so each inverted list is probed by many queries of a batch. The batch is
grouped by list: the queries probing a list are gathered into one row of a batched matrix product
against that list's vectors (:func:`models.topk_matmul.matmul_topk`, which keeps the running top-k on
chip on CUDA and skips keys of the query's own document), lists of similar size go in the same batch
so padding stays small, and each query's per-list top-k are merged into its top-k over all its lists.

- Distances are exact within the probed lists: the lists hold the exact vectors (float16 stored
  embeddings are exact in float16), and when the product runs in bfloat16/float16 the scan keeps
  ``RERANK_MARGIN`` more candidates per query and ranks them again in float32.
- Own document excluded by group (the document's first chunk id), so no retries; a query whose own
  document fills its nprobe lists probes further lists until they hold k others (as the CPU routed
  search does), up to ``MAX_PROBE_FACTOR`` x nprobe.
- Vectors resident on the device, one shard of lists at a time: :func:`plan_shards` cuts the lists so
  each shard fits a byte budget; per-shard top-k merge with :func:`merge_topk`.

No Ray and no faiss here (the GPU benchmark runs where neither is installed). Scores returned are
"smaller is nearer" (squared L2, or the negated inner product), as :mod:`pipelines.search.knn` uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.topk_matmul import EXCLUDED_SCORE, NO_KEY, matmul_topk

RERANK_MARGIN = 8  # extra candidates per query re-ranked in float32 after a half-precision scan
MAX_PROBE_FACTOR = 4  # a query whose own document fills its lists probes up to this x nprobe
SCORE_BUDGET = 1 << 24  # padded (queries x keys) elements per batched product; bounds the transient memory
METRICS = ("l2", "ip")


def device_bytes_per_vector(dim: int, dtype: torch.dtype) -> int:
    """Device memory per resident vector: the vector, its chunk id, its group, its squared norm."""
    return dim * torch.empty(0, dtype=dtype).element_size() + 8 + 8 + 4


@dataclass
class Coarse:
    """The coarse quantizer on the device: centroids in the (optionally linearly transformed) space the
    IVF assigns in, ``x -> x @ transform.T + bias`` (faiss' OPQ/PCA pre-transforms are linear)."""

    centroids: torch.Tensor  # (nlist, d') float32
    metric: str
    transform: torch.Tensor | None = None  # (d', d)
    bias: torch.Tensor | None = None  # (d',)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        self._key_bias = -0.5 * (self.centroids * self.centroids).sum(1) if self.metric == "l2" else None

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.transform is not None:
            x = x @ self.transform.T
        if self.bias is not None:
            x = x + self.bias
        return x

    def probes(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """(n, width) nearest lists of each row, nearest first (width is capped at nlist)."""
        return matmul_topk(self.project(x), self.centroids, min(width, self.nlist), key_bias=self._key_bias).ids


def widen_probes(probes: torch.Tensor, list_sizes: torch.Tensor, nprobe: int, need: torch.Tensor) -> torch.Tensor:
    """``probes`` (nearest first) cut per row to its first ``nprobe`` lists, or more when those hold fewer
    than ``need`` vectors (its own document's length + k): the lists then hold k vectors of other
    documents. Lists past the cut become -1."""
    sizes = torch.where(probes >= 0, list_sizes[probes.clamp(min=0)], 0)
    enough = sizes.cumsum(1) >= need[:, None]
    width = torch.where(enough.any(1), enough.int().argmax(1) + 1, probes.shape[1])
    width = width.clamp(min=min(nprobe, probes.shape[1]))
    return torch.where(torch.arange(probes.shape[1], device=probes.device)[None, :] < width[:, None], probes, -1)


@dataclass
class DeviceLists:
    """One shard's vectors on the device, sorted by list: rows ``starts[s]:starts[s] + sizes[s]`` are
    list ``lists[s]``; ``slot_of[list]`` is its slot here (-1: not in this shard or empty)."""

    vecs: torch.Tensor  # (n, d) compute dtype
    ids: torch.Tensor  # (n,) chunk ids
    groups: torch.Tensor  # (n,) document of each vector (its first chunk id)
    norms: torch.Tensor  # (n,) float32 squared norms
    lists: torch.Tensor
    starts: torch.Tensor
    sizes: torch.Tensor
    slot_of: torch.Tensor  # (nlist,)

    @classmethod
    def build(cls, ids: torch.Tensor, groups: torch.Tensor, lists: torch.Tensor, vecs: torch.Tensor, nlist: int,
              dtype: torch.dtype) -> DeviceLists:
        """From unsorted rows (any float dtype) on the device; vectors are stored in ``dtype``."""
        order = torch.argsort(lists * (int(ids.max()) + 1 if len(ids) else 1) + ids)  # by list, ids ascending
        lists, ids, groups = lists[order], ids[order], groups[order]
        v = vecs[order]
        norms = (v.float() * v.float()).sum(1)
        uniq, sizes = torch.unique_consecutive(lists, return_counts=True)
        starts = torch.cumsum(sizes, 0) - sizes
        slot_of = torch.full((nlist,), -1, dtype=torch.long, device=vecs.device)
        slot_of[uniq] = torch.arange(len(uniq), device=vecs.device)
        return cls(v.to(dtype), ids, groups, norms, uniq, starts, sizes, slot_of)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.vecs, self.ids, self.groups, self.norms))


def plan_shards(list_sizes: np.ndarray, bytes_per_vector: int, budget_bytes: int) -> np.ndarray:
    """Shard of every list (-1: empty), lists in order, each shard at most ``budget_bytes`` of vectors
    (a list larger than the budget is a shard of its own)."""
    shard = np.full(len(list_sizes), -1, np.int64)
    current, used = -1, 0
    for lst, size in enumerate(np.asarray(list_sizes).tolist()):
        b = int(size) * bytes_per_vector
        if b == 0:
            continue
        if current < 0 or used + b > budget_bytes:
            current, used = current + 1, 0
        shard[lst] = current
        used += b
    return shard


def _blocks(sizes: torch.Tensor, pairs: torch.Tensor, dim: int, budget: int) -> list[torch.Tensor]:
    """Slots with queries, grouped into batches of similar list size whose padded scores (lists x queries
    x keys) and gathered vectors ((queries + keys) x dim per list) stay within ``budget`` elements."""
    active = torch.nonzero(pairs > 0).flatten()
    if not len(active):
        return []
    key = sizes[active] * (int(pairs.max()) + 1) + pairs[active]
    order = active[torch.argsort(key, descending=True)].tolist()
    s, p = sizes.tolist(), pairs.tolist()
    out, cur, max_l, max_m = [], [], 0, 0
    for slot in order:
        l2, m2 = max(max_l, s[slot]), max(max_m, p[slot])
        n = len(cur) + 1
        if cur and (n * l2 * m2 > budget or n * (l2 + m2) * dim > budget):
            out.append(cur)
            cur, l2, m2 = [], s[slot], p[slot]
        cur.append(slot)
        max_l, max_m = l2, m2
    if cur:
        out.append(cur)
    return [torch.tensor(b, dtype=torch.long, device=sizes.device) for b in out]


def scan(lists: DeviceLists, queries: torch.Tensor, query_groups: torch.Tensor, probes: torch.Tensor, k: int,
         metric: str, *, score_budget: int = SCORE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest vectors of each query within the lists it probes that this shard holds, never of its
    own group.

    Args:
        lists: the shard. queries: (M, d) float32. query_groups: (M,) int64 (document first chunk ids).
        probes: (M, P) list ids, -1 for none. k: results per query. metric: "l2" or "ip".
        score_budget: padded score elements per batched product (tests pass a small one).
    Returns:
        (scores (M, k) float32, smaller is nearer, +inf pads; chunk ids (M, k) int64, -1 pads).
    """
    dev = queries.device
    M, P = probes.shape
    exact = lists.vecs.dtype == torch.float32
    kk = k if exact else k + RERANK_MARGIN
    cand_s = torch.full((M, P, kk), EXCLUDED_SCORE, dtype=torch.float32, device=dev)
    cand_r = torch.full((M, P, kk), NO_KEY, dtype=torch.long, device=dev)  # rows of lists.vecs
    slot = torch.where(probes >= 0, lists.slot_of[probes.clamp(min=0)], -1)
    rows, cols = torch.nonzero(slot >= 0, as_tuple=True)
    if len(rows):
        pslot = slot[rows, cols]
        order = torch.argsort(pslot, stable=True)
        rows, cols, pslot = rows[order], cols[order], pslot[order]
        pair_count = torch.bincount(pslot, minlength=len(lists.lists))
        pair_start = torch.cumsum(pair_count, 0) - pair_count
        qv = queries.to(lists.vecs.dtype)
        key_bias_all = -0.5 * lists.norms if metric == "l2" else None
        for block in _blocks(lists.sizes, pair_count, queries.shape[1], score_budget):
            m, L = int(pair_count[block].max()), int(lists.sizes[block].max())
            qpos = (pair_start[block][:, None] + torch.arange(m, device=dev)[None, :])  # (B, m) pair positions
            qvalid = torch.arange(m, device=dev)[None, :] < pair_count[block][:, None]
            qpos = torch.where(qvalid, qpos, pair_start[block][:, None]).clamp(max=len(rows) - 1)
            qrow = rows[qpos]
            krow = (lists.starts[block][:, None] + torch.arange(L, device=dev)[None, :]).clamp(max=len(lists.ids) - 1)
            got = matmul_topk(qv[qrow], lists.vecs[krow], kk, key_count=lists.sizes[block],
                              key_bias=None if key_bias_all is None else key_bias_all[krow],
                              query_groups=query_groups[qrow], key_groups=lists.groups[krow])
            vec_rows = torch.where(got.ids >= 0, lists.starts[block][:, None, None] + got.ids, NO_KEY)
            r, c = qrow[qvalid], cols[qpos[qvalid]]
            cand_s[r, c] = got.scores[qvalid]
            cand_r[r, c] = vec_rows[qvalid]
    best_s, at = cand_s.reshape(M, P * kk).topk(min(kk, P * kk), dim=1)
    best_r = cand_r.reshape(M, P * kk).gather(1, at)
    best_r = torch.where(best_s > EXCLUDED_SCORE, best_r, NO_KEY)
    if not exact:  # ranked again in float32 from the resident vectors
        v = lists.vecs[best_r.clamp(min=0)].float()
        dots = torch.einsum("md,mkd->mk", queries.float(), v)
        best_s = dots - 0.5 * lists.norms[best_r.clamp(min=0)] if metric == "l2" else dots
        best_s = torch.where(best_r >= 0, best_s, EXCLUDED_SCORE)
        best_s, at = best_s.topk(min(k, best_s.shape[1]), dim=1)
        best_r = best_r.gather(1, at)
    best_s, best_r = best_s[:, :k], best_r[:, :k]
    ids = torch.where(best_r >= 0, lists.ids[best_r.clamp(min=0)], NO_KEY)
    if metric == "l2":  # |q - x|^2 = |q|^2 - 2 (q.x - |x|^2 / 2)
        score = (queries.float() * queries.float()).sum(1, keepdim=True) - 2 * best_s
        score = score.clamp(min=0)
    else:
        score = -best_s
    score = torch.where(ids >= 0, score, float("inf"))
    if score.shape[1] < k:
        pad = k - score.shape[1]
        score = torch.cat([score, torch.full((M, pad), float("inf"), device=dev)], 1)
        ids = torch.cat([ids, torch.full((M, pad), NO_KEY, dtype=torch.long, device=dev)], 1)
    return score, ids


def merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row k smallest of two (scores, ids) results (per-shard results of the same queries)."""
    s = torch.cat([a[0], b[0]], 1)
    i = torch.cat([a[1], b[1]], 1)
    s, at = s.topk(k, dim=1, largest=False)
    return s, i.gather(1, at)


def search(shards: list[DeviceLists], coarse: Coarse, queries: torch.Tensor, query_groups: torch.Tensor,
           need: torch.Tensor, list_sizes: torch.Tensor, *, nprobe: int, k: int,
           score_budget: int = SCORE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe, then scan every shard and merge: the whole search of one query block.

    Args:
        shards: resident lists (one shard per entry; all on the queries' device).
        coarse: the quantizer. queries: (M, d). query_groups: (M,) own-document ids.
        need: (M,) vectors a query's lists must hold (own document length + k). list_sizes: (nlist,) all shards.
        nprobe: lists probed per query (more where ``need`` asks). k: neighbors.
    Returns:
        (scores smaller-is-nearer, ids) of shape (M, k).
    """
    width = min(coarse.nlist, max(nprobe, 1) * MAX_PROBE_FACTOR)
    probes = widen_probes(coarse.probes(queries, width), list_sizes, nprobe, need)
    best = (torch.full((len(queries), k), float("inf"), device=queries.device),
            torch.full((len(queries), k), NO_KEY, dtype=torch.long, device=queries.device))
    for lists in shards:
        best = merge_topk(best, scan(lists, queries, query_groups, probes, k, coarse.metric, score_budget=score_budget), k)
    return best
