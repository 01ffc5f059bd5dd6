"""The neighbors stage's list-routed search, for builds whose vectors do not fit one worker.

The single-node path (:class:`pipelines.stages.neighbors.NeighborsWorker`) gives every worker the
whole index, plus the embeddings to re-rank with. At 10^9 chunks (1.5 TB of float16 vectors at
dim 768) no node holds that. Here each worker holds one *shard* of the IVF's inverted lists with
their exact vectors, at most ``--shard-memory`` bytes (:mod:`pipelines.search.routing`):

1. route (one Ray task per embeddings part): the IVF's coarse quantizer (with the index's
   pre-transform, e.g. OPQ) gives each chunk its nearest list (where its vector lives) and the
   ``nprobe`` lists its query probes. The task writes, per shard, the vectors that live there and
   the queries that probe there (float16, ``_routed/sSSSSS/{db,q}-PPPPP.npz``).
2. scan (one task per shard): the shard's vectors sorted by list, then every part's queries for
   the shard, one matrix product per (list, queries probing it), exact distances, own document
   masked; the per-query top-k go to ``_routed/rPPPPP/sSSSSS.npz``.
3. merge (one task per part): each query's top-k over its shards, committed as the part's
   neighbors with the same sidecar as the single-node path (so a killed run resumes).
Each step leaves a sidecar per unit, so a rerun redoes only what is missing. The result equals an
IVF-Flat search at the same ``nprobe`` (exact distances within the probed lists), whatever the
index compresses to. ``_routed/`` is removed once the version's manifest is written.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray

from pipelines.artifacts.arrays import read_arrays, write_arrays
from pipelines.artifacts.embeddings import DocBounds, EmbeddingPart, EmbeddingsInfo, NpyPart, part_rel, read_part_ids
from pipelines.artifacts.manifest import part_name
from pipelines.artifacts.storage import Location, exists, open_location, read_bytes, write_bytes_atomic
from pipelines.artifacts.versions import open_index
from pipelines.runtime.procstats import peak_rss_mb, reset_peak_rss
from pipelines.runtime.ray_session import bounded_as_completed
from pipelines.search.faiss_index import memory_bytes, write_index_file
from pipelines.search.knn import empty_topk, merge_topk
from pipelines.search.routing import (
    MAX_PROBE_FACTOR,
    ShardVectors,
    pairs_by_shard,
    plan_shards,
    probes_needed,
    scan_shard,
    scores_to_distances,
    shard_bytes_per_vector,
)
from pipelines.search.routing_quantizer import read_routing_quantizer, routing_quantizer
from pipelines.search.tuning import parse_search_params
from pipelines.stages.neighbors_parts import commit_part, committed_part

SCAN_BLOCK_ROWS = 4096  # queries scanned at once in a shard
ROUTE_BLOCK_ROWS = 4096  # the probe matrices are rows x (4 x nprobe): keep them small
# A route task writes what it has routed once this much is buffered: a query goes to every shard its probes
# touch, so holding a whole part would cost (part rows x shards visited) vectors.
ROUTE_BUFFER_BYTES = 64 << 20
WORK = "_routed"


def wants_routed(mode: str, index_manifest: dict, info: EmbeddingsInfo, shard_memory: str) -> bool:
    """``routed`` when asked; on ``auto``, when the index is IVF and the exact vectors exceed one shard."""
    if mode != "auto":
        return mode == "routed"
    return "IVF" in index_manifest["index_key"] and info.n * shard_bytes_per_vector(info.dim) > memory_bytes(shard_memory)


@dataclass(frozen=True)
class RoutedJob:
    """What every routed task needs to know (small: sent to each task)."""

    out_url: str
    folder: str  # neighbors/vNNNN
    nprobe: int
    quantizer_ef: int
    k: int
    metric: str
    shards: int
    chunks: int

    @property
    def work(self) -> str:
        return f"{self.folder}/{WORK}"

    def quantizer_rel(self) -> str:
        return f"{self.work}/quantizer.index"

    def db_rel(self, shard: int, part: int, piece: int) -> str:
        return f"{self.work}/s{shard:05d}/db-{part:05d}-{piece:04d}.npz"

    def queries_rel(self, shard: int, part: int, piece: int) -> str:
        return f"{self.work}/s{shard:05d}/q-{part:05d}-{piece:04d}.npz"

    def result_rel(self, part: int, shard: int) -> str:
        return f"{self.work}/r{part:05d}/s{shard:05d}.npz"

    def done_rel(self, step: str, unit: int) -> str:
        return f"{self.work}/done/{step}-{unit:05d}.json"


def _cat(arrays: list[np.ndarray], dtype, dim: int = 0) -> np.ndarray:
    """Concatenate, or an empty array of the right shape when there is nothing."""
    if arrays:
        return np.concatenate(arrays).astype(dtype, copy=False)
    return np.zeros((0, dim) if dim else 0, dtype)


def _done(out: Location, job: RoutedJob, step: str, unit: int) -> dict | None:
    rel = job.done_rel(step, unit)
    return json.loads(read_bytes(out, rel)) if exists(out, rel) else None


def _mark_done(out: Location, job: RoutedJob, step: str, unit: int, record: dict) -> dict:
    write_bytes_atomic(out, job.done_rel(step, unit), json.dumps(record).encode())
    return record


def stage_quantizer(out: Location, index_version: str, rel: str, dim: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The coarse quantizer behind the index's pre-transform, as one small index file at ``rel``,
    plus the list sizes and centroids the shard plan needs. Returns (None, None) when not an IVF.
    Reads the routing files the index stage wrote beside the index (small); only a build older than
    them opens the index itself."""
    routing, data = read_routing_quantizer(out, f"index/{index_version}")
    if routing is not None:
        write_bytes_atomic(out, rel, data)
        return routing.list_sizes, routing.centroids
    routing = routing_quantizer(open_index(out, index_version, mmap=True), dim)
    if routing is None:
        return None, None
    write_index_file(out, rel, routing.quantizer)
    return routing.list_sizes, routing.centroids


def _open_quantizer(out: Location, job: RoutedJob):
    import faiss

    from pipelines.artifacts.versions import read_faiss

    if out.is_local:
        q = read_faiss(out.path(job.quantizer_rel()), mmap=False)
    else:
        with tempfile.TemporaryDirectory() as d:
            out.fs.get_file(out.path(job.quantizer_rel()), f"{d}/quantizer.index")
            q = read_faiss(f"{d}/quantizer.index", mmap=False)
    inner = faiss.downcast_index(q.index if isinstance(q, faiss.IndexPreTransform) else q)
    if job.quantizer_ef and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(job.quantizer_ef, job.nprobe)
    return q


def _probes(quantizer, x: np.ndarray, list_sizes: np.ndarray, nprobe: int, width: int, need: np.ndarray) -> np.ndarray:
    """Each row's nprobe nearest lists (``width`` columns, -1 padded); the rows whose lists hold fewer than
    ``need`` vectors (their own document fills them) are searched again ``width`` wide and given more.
    Asking every row for ``width`` lists would cost a heap of that size per row for the few that need it."""
    _, near = quantizer.search(x, nprobe)
    probes = np.full((len(x), width), -1, np.int64)
    probes[:, :near.shape[1]] = near
    sizes = np.where(near >= 0, list_sizes[np.maximum(near, 0)], 0).sum(1)
    short = np.nonzero(sizes < need)[0]
    if len(short) and width > nprobe:
        _, wide = quantizer.search(x[short], width)
        probes[short] = probes_needed(wide, list_sizes, nprobe, need[short])
    return probes


@ray.remote(num_cpus=1)
def route_part_task(job: RoutedJob, part: dict, list_shard: np.ndarray, list_sizes: np.ndarray,
                    with_queries: bool = True) -> dict:
    """Step 1 for one part: where its vectors live and (``with_queries``) where its queries go, per shard."""
    import faiss

    faiss.omp_set_num_threads(1)
    out, p = open_location(job.out_url), EmbeddingPart.from_dict(part)
    if (done := _done(out, job, "route", p.index)) is not None:
        return done
    reset_peak_rss()
    cpu = time.process_time()
    quantizer = _open_quantizer(out, job)
    bounds = DocBounds.load(out, job.chunks)
    width = min(len(list_sizes), job.nprobe * MAX_PROBE_FACTOR)
    buffers = _RouteBuffers(out, job, p.index)
    npy = NpyPart(out, part_rel(p))
    for start, block in npy.blocks(ROUTE_BLOCK_ROWS):
        ids = np.arange(p.offset + start, p.offset + start + len(block), dtype=np.int64)
        lo, hi = bounds.range_of(ids)
        probes = _probes(quantizer, block, list_sizes, job.nprobe, width, hi - lo + job.k)
        home = list_shard[np.maximum(probes[:, 0], 0)]
        half = block.astype(np.float16)
        pairs = pairs_by_shard(probes, list_shard, job.shards) if with_queries else []
        for s in range(job.shards):
            mine = home == s
            buffers.add_vectors(s, ids[mine], probes[mine, 0], half[mine])
            if with_queries:
                rows, lists = pairs[s]
                asks = np.unique(rows)
                buffers.add_queries(s, ids[asks], half[asks], np.searchsorted(asks, rows).astype(np.int32), lists)
        if buffers.held >= ROUTE_BUFFER_BYTES:
            buffers.flush()
    buffers.flush()
    return _mark_done(out, job, "route", p.index, {"query_copies": buffers.query_copies, "rows": p.rows,
                                                   "db_pieces": buffers.db_pieces, "query_pieces": buffers.query_pieces,
                                                   "cpu_seconds": round(time.process_time() - cpu, 3),
                                                   "peak_rss_mb": peak_rss_mb()})


class _RouteBuffers:
    """One route task's routed vectors and queries per shard, written as numbered pieces whenever
    ``ROUTE_BUFFER_BYTES`` are held, so the task's memory does not grow with its part."""

    def __init__(self, out: Location, job: RoutedJob, part: int):
        self.out, self.job, self.part = out, job, part
        self.db: dict[int, list] = {s: [] for s in range(job.shards)}
        self.queries: dict[int, list] = {s: [] for s in range(job.shards)}
        self.db_pieces = [0] * job.shards
        self.query_pieces = [0] * job.shards
        self.query_copies = 0
        self.held = 0  # bytes buffered

    def add_vectors(self, shard: int, ids: np.ndarray, lists: np.ndarray, vecs: np.ndarray) -> None:
        """Vectors whose home list is in ``shard`` (``lists``: that list for each)."""
        self.db[shard].append((ids, lists, vecs))
        self.held += ids.nbytes + lists.nbytes + vecs.nbytes

    def add_queries(self, shard: int, ids: np.ndarray, vecs: np.ndarray, pair_rows: np.ndarray,
                    pair_lists: np.ndarray) -> None:
        """Queries probing ``shard``, and their (row into ``ids``, list) pairs there."""
        self.queries[shard].append((ids, vecs, pair_rows, pair_lists))
        self.held += ids.nbytes + vecs.nbytes + pair_rows.nbytes + pair_lists.nbytes
        self.query_copies += len(ids)

    def flush(self) -> None:
        for s in range(self.job.shards):
            if db := self.db[s]:
                write_arrays(self.out, self.job.db_rel(s, self.part, self.db_pieces[s]),
                      ids=_cat([a[0] for a in db], np.int64), lists=_cat([a[1] for a in db], np.int64),
                      vecs=_cat([a[2] for a in db], np.float16, db[0][2].shape[1]))
                self.db_pieces[s] += 1
            if qs := self.queries[s]:
                offsets = np.cumsum([0] + [len(a[0]) for a in qs])
                write_arrays(self.out, self.job.queries_rel(s, self.part, self.query_pieces[s]),
                      ids=_cat([a[0] for a in qs], np.int64), vecs=_cat([a[1] for a in qs], np.float16, qs[0][1].shape[1]),
                      pair_rows=_cat([a[2] + o for a, o in zip(qs, offsets)], np.int32),
                      pair_lists=_cat([a[3] for a in qs], np.int32))
                self.query_pieces[s] += 1
            self.db[s], self.queries[s] = [], []
        self.held = 0


def _load_queries(out: Location, job: RoutedJob, shard: int, part: int, pieces: int) -> dict:
    """One part's queries for ``shard``, its pieces joined (row numbers of the pairs shifted to match)."""
    loaded = [read_arrays(out, job.queries_rel(shard, part, i)) for i in range(pieces)]
    if not loaded:
        return {"ids": np.zeros(0, np.int64), "vecs": np.zeros((0, 0), np.float16),
                "pair_rows": np.zeros(0, np.int32), "pair_lists": np.zeros(0, np.int32)}
    offsets = np.cumsum([0] + [len(q["ids"]) for q in loaded])
    return {"ids": np.concatenate([q["ids"] for q in loaded]), "vecs": np.concatenate([q["vecs"] for q in loaded]),
            "pair_rows": np.concatenate([q["pair_rows"] + o for q, o in zip(loaded, offsets)]).astype(np.int32),
            "pair_lists": np.concatenate([q["pair_lists"] for q in loaded])}


def _scan_in_blocks(vectors: ShardVectors, q: dict, bounds: DocBounds, job: RoutedJob) -> tuple[np.ndarray, np.ndarray]:
    """One part's queries for this shard, SCAN_BLOCK_ROWS at a time: the transient arrays (pairs, scores)
    are bounded by the block, not by the part."""
    n = len(q["ids"])
    ids, scores = np.empty((n, job.k), np.int64), np.empty((n, job.k), np.float32)
    cuts = np.searchsorted(q["pair_rows"], np.arange(0, n + SCAN_BLOCK_ROWS, SCAN_BLOCK_ROWS))
    for b, start in enumerate(range(0, n, SCAN_BLOCK_ROWS)):
        rows = slice(start, min(n, start + SCAN_BLOCK_ROWS))
        pairs = slice(cuts[b], cuts[b + 1])
        lo, hi = bounds.range_of(q["ids"][rows])
        ids[rows], scores[rows] = scan_shard(vectors, q["vecs"][rows].astype(np.float32), q["ids"][rows],
                                             q["pair_rows"][pairs] - start, q["pair_lists"][pairs], lo, hi, job.k,
                                             job.metric)
    return ids, scores


@ray.remote(num_cpus=1)
def scan_shard_task(job: RoutedJob, shard: int, db_pieces: dict[int, int], query_pieces: dict[int, int]) -> dict:
    """Step 2 for one shard: its vectors in memory, every part's queries for it scanned exactly.
    ``db_pieces`` and ``query_pieces`` map each part to the number of pieces its route task wrote here."""
    out = open_location(job.out_url)
    if (done := _done(out, job, "scan", shard)) is not None:
        return done
    reset_peak_rss()
    cpu = time.process_time()
    pieces = []
    for p, count in db_pieces.items():
        for i in range(count):
            piece = read_arrays(out, job.db_rel(shard, p, i))
            pieces.append((piece["ids"], piece["lists"], piece["vecs"]))
    vectors = ShardVectors.from_pieces(pieces)
    del pieces
    bounds = DocBounds.load(out, job.chunks)
    scanned = pairs = 0
    sizes = np.zeros(int(vectors.lists.max()) + 1 if len(vectors.lists) else 0, np.int64)
    sizes[vectors.lists] = vectors.ends - vectors.starts
    for p, count in query_pieces.items():
        q = _load_queries(out, job, shard, p, count)
        ids, scores = _scan_in_blocks(vectors, q, bounds, job)
        write_arrays(out, job.result_rel(p, shard), query_ids=q["ids"], ids=ids, scores=scores)
        scanned += len(q["ids"])
        pairs += int(sizes[q["pair_lists"][q["pair_lists"] < len(sizes)]].sum())
    return _mark_done(out, job, "scan", shard, {"vectors": int(len(vectors.ids)), "shard_bytes": vectors.nbytes,
                                               "queries": scanned, "pairs": pairs, "cpu_seconds": round(time.process_time() - cpu, 3),
                                               "peak_rss_mb": peak_rss_mb()})


@ray.remote(num_cpus=1)
def merge_part_task(job: RoutedJob, part: dict) -> dict:
    """Step 3 for one part: each query's top-k over the shards it went to, committed as neighbors."""
    out, p = open_location(job.out_url), EmbeddingPart.from_dict(part)
    kept = committed_part(out, job.folder, part_name(p.index), p.rows)
    if kept is not None:
        return kept
    reset_peak_rss()
    cpu = time.process_time()
    chunk_ids = read_part_ids(out, p)
    best = empty_topk(p.rows, job.k)
    for s in range(job.shards):
        r = read_arrays(out, job.result_rel(p.index, s))
        if not len(r["query_ids"]):
            continue
        rows = r["query_ids"] - p.offset
        best[0][rows], best[1][rows] = merge_topk((best[0][rows], best[1][rows]), (r["ids"], r["scores"]), job.k)
    ids = best[0]
    entry = commit_part(out, job.folder, p, chunk_ids, ids, scores_to_distances(ids, best[1], job.metric),
                        (ids < 0).any(1))
    return entry | {"kept": False, "cpu_seconds": round(time.process_time() - cpu, 3), "peak_rss_mb": peak_rss_mb()}


@dataclass
class RoutedRun:
    """What the routed search did: the stage's entries plus the figures its summary reports."""

    entries: list[dict]
    shards: int
    shard_bytes_max: int
    query_copies: int  # (query, shard) pairs routed: N x shards visited per query
    pairs: int  # (query, vector) distances computed
    scan_cpu_seconds: float
    route_cpu_seconds: float
    cpu_seconds: float
    peak_rss_mb: dict


def run_routed(out: Location, info: EmbeddingsInfo, *, folder: str, index_version: str, index_param: str, k: int,
               metric: str, shard_memory: str, concurrency: int,
               query_parts: list[EmbeddingPart] | None = None) -> RoutedRun:
    """Steps 1-3 over every part and shard; returns the parts' manifest entries (in part order).

    Args:
        out: the build. info: its embeddings. folder: the neighbors version's folder.
        index_version, index_param: the IVF whose quantizer and ``nprobe`` route the queries.
        k, metric: neighbors per chunk, distance. shard_memory: bytes of vectors per shard (e.g. "2G").
        concurrency: tasks in flight per step.
        query_parts: search the neighbors of these parts only (all by default; benchmarks time a subset).
    Returns:
        A :class:`RoutedRun`."""
    nprobe, ef = parse_search_params(index_param)
    probe_job = RoutedJob(out.url, folder, nprobe, ef, k, metric, 0, info.n)
    sizes, centroids = stage_quantizer(out, index_version, probe_job.quantizer_rel(), info.dim)
    if sizes is None:
        raise ValueError(f"index {index_version} is not an IVF index: the routed neighbors search needs inverted "
                         "lists (use --neighbors-search index)")
    plan = plan_shards(sizes, centroids, info.dim, memory_bytes(shard_memory))
    job = RoutedJob(out.url, folder, nprobe, ef, k, metric, plan.shards, info.n)
    print(f"neighbors: routed search, {len(sizes)} lists in {plan.shards} shard(s) of at most "
          f"{plan.shard_bytes.max() / 2**20:,.1f} MiB (--shard-memory {shard_memory}), nprobe {nprobe}", flush=True)
    parts = list(info.parts)
    list_shard, sizes_ref = ray.put(plan.list_shard), ray.put(sizes)
    cpu, peaks = 0.0, {}

    def step(label: str, submit, items: list) -> list[dict]:
        nonlocal cpu
        results: list = [None] * len(items)
        for done, (i, r) in enumerate(bounded_as_completed(submit, items, concurrency), 1):
            results[i] = r
            if done == len(items) or done % max(1, len(items) // 5) == 0:
                print(f"neighbors: routed {label} {done}/{len(items)}", flush=True)
        cpu += sum(r.get("cpu_seconds", 0.0) for r in results)
        peaks[f"neighbors_{label}_task"] = max(r.get("peak_rss_mb", 0.0) for r in results)
        return results

    queried = parts if query_parts is None else list(query_parts)
    asked = {p.index for p in queried}
    routes = step("route", lambda p: route_part_task.remote(job, p.to_dict(), list_shard, sizes_ref, p.index in asked),
                  parts)
    scans = step("scan", lambda s: scan_shard_task.remote(
        job, s, {p.index: r["db_pieces"][s] for p, r in zip(parts, routes)},
        {p.index: r["query_pieces"][s] for p, r in zip(parts, routes) if p.index in asked}), list(range(plan.shards)))
    entries = step("merge", lambda p: merge_part_task.remote(job, p.to_dict()), queried)
    for e in entries:
        e.pop("cpu_seconds", None)
        e.pop("peak_rss_mb", None)
    return RoutedRun(entries=entries, shards=plan.shards, shard_bytes_max=max(s["shard_bytes"] for s in scans),
                     query_copies=sum(r["query_copies"] for r in routes), pairs=sum(s["pairs"] for s in scans),
                     scan_cpu_seconds=sum(s["cpu_seconds"] for s in scans),
                     route_cpu_seconds=sum(r["cpu_seconds"] for r in routes), cpu_seconds=cpu, peak_rss_mb=peaks)
