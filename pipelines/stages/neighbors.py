"""The neighbors stage: an index version + ``embeddings/`` -> ``neighbors/vNNNN/``, then ``LATEST``.

For every chunk, its k nearest chunks under the index's metric, never itself and never from its
own document (:func:`pipelines.search.knn.search_neighbors`; -1 pads when fewer exist). Work runs
over embeddings parts (contiguous chunk id ranges) in Ray actors (``NeighborsWorker``) that
load the index once, memory-mapped where the index allows, plus the documents' first chunk ids
(8 bytes per document). Each part is committed as ``part-NNNNN.parquet`` with a sidecar entry
in ``_parts/``; a killed run resumes with the parts whose sidecar still validates (size, sha256).

Publishing: when every part validates (one row per chunk), the manifest is written, and only then
``LATEST`` is replaced (atomically) to name this neighbors version and its index version, through
the one guarded publish (:func:`pipelines.artifacts.publish.publish_build`: under the ``--out`` lock,
never on a re-indexed build, never backwards).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from pipelines.artifacts.embeddings import DocBounds, EmbeddingPart, NpyPart, load_embeddings_info, part_rel, read_part_ids
from pipelines.artifacts.manifest import part_is_valid, part_name, read_manifest, write_manifest
from pipelines.artifacts.publish import publish_build
from pipelines.artifacts.storage import Location, open_location, remove_stale_temporaries, remove_tree
from pipelines.artifacts.versions import complete_versions, find_complete, fingerprint_of, open_index, start_version
from pipelines.runtime.procstats import peak_rss_mb
from pipelines.runtime.ray_session import max_node_cpus
from pipelines.search.knn import search_neighbors, use_blas_for_batches
from pipelines.search.rerank import ExactVectors
from pipelines.search.routing import check_search_mode
from pipelines.search.tuning import parse_search_params
from pipelines.stages.neighbors_parts import commit_part, committed_part, sample_recall
from pipelines.stages.neighbors_routed import WORK as ROUTED_WORK
from pipelines.stages.neighbors_routed import run_routed, wants_routed
from pipelines.stages.neighbors_torch import load_coarse, run_torch, search_device

QUERY_BLOCK_ROWS = 8192
MIN_ROWS_PER_ACTOR = 50_000  # fewer rows per actor cost more in process start-up than they save
ACTOR_RESTARTS = 3  # times a neighbors worker is restarted (and its part retried) after its process dies


class NeighborsWorker:
    """A Ray actor: the index (memory-mapped) and document bounds loaded once, then one embeddings
    part per call. (Plain actors rather than a Ray Data pool: Ray Data's first use in a process
    costs seconds, as much as the whole search at 20k chunks.)"""

    def __init__(self, out_url: str, index_version: str, folder: str, k: int, extra: int,
                 metric: str, threads: int, rerank: int = 0):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        use_blas_for_batches()
        t = time.perf_counter()
        self.out = open_location(out_url)
        self.index = open_index(self.out, index_version, mmap=True)
        self.bounds = DocBounds.load(self.out, int(self.index.ntotal))
        self.folder, self.k, self.extra, self.metric = folder, k, extra, metric
        self.rerank = rerank
        self.exact = ExactVectors(self.out, load_embeddings_info(self.out)) if rerank else None
        self.setup_seconds = time.perf_counter() - t

    def part(self, part: EmbeddingPart) -> dict:
        name = part_name(part.index)
        kept = committed_part(self.out, self.folder, name, part.rows)
        if kept is not None:
            return kept
        t, cpu = time.perf_counter(), time.process_time()
        chunk_ids = read_part_ids(self.out, part)
        npy = NpyPart(self.out, part_rel(part))
        ids = np.empty((part.rows, self.k), np.int64)
        dist = np.empty((part.rows, self.k), np.float32)
        short = np.zeros(part.rows, bool)
        for start, block in npy.blocks(QUERY_BLOCK_ROWS):
            q = chunk_ids[start:start + len(block)]
            lo, hi = self.bounds.range_of(q)
            sl = slice(start, start + len(block))
            ids[sl], dist[sl], short[sl] = search_neighbors(self.index, block, q, lo, hi, k=self.k, extra=self.extra,
                                                            metric=self.metric, exact=self.exact, rerank=self.rerank)
        entry = commit_part(self.out, self.folder, part, chunk_ids, ids, dist, short)
        return entry | {"kept": False, "seconds": round(time.perf_counter() - t, 3), "peak_rss_mb": peak_rss_mb(),
                        "cpu_seconds": round(time.process_time() - cpu, 3)}

    def run(self, part: dict) -> dict:
        return self.part(EmbeddingPart.from_dict(part))


def run_parts(out_url: str, parts: list[EmbeddingPart], *, n_actors: int, cpus: int, worker_cls: type | None = None,
              **worker_kw) -> list[dict]:
    """Feed parts to ``n_actors`` actors, one part in flight per actor; progress every few seconds.
    ``worker_cls``: the actor class (default :class:`NeighborsWorker`; the re-index job passes its own,
    with the same ``__init__(out_url, threads=..., **worker_kw)`` and ``run(part_dict)``)."""
    actor_cls = ray.remote(worker_cls or NeighborsWorker)
    # a worker that dies (killed, its node lost) is restarted and its part retried: a part is committed
    # atomically and a retry finds it done (committed_part), so a retry gives the same bytes
    actors = [actor_cls.options(num_cpus=cpus, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS).remote(
        out_url, threads=cpus, **worker_kw) for _ in range(n_actors)]
    pending = list(parts)
    running: dict = {}
    entries: list[dict] = []
    rows_done, total_rows, start, last = 0, sum(p.rows for p in parts), time.perf_counter(), 0.0
    try:
        for a in actors:
            if pending:
                p = pending.pop(0)
                running[a.run.remote(p.to_dict())] = (a, p)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            actor, p = running.pop(done[0])
            entries.append(ray.get(done[0]))
            rows_done += p.rows
            if pending:
                q = pending.pop(0)
                running[actor.run.remote(q.to_dict())] = (actor, q)
            now = time.perf_counter() - start
            if now - last > 5 or not running:
                last = now
                print(f"neighbors: {len(entries)}/{len(parts)} parts, {rows_done}/{total_rows} chunks, "
                      f"{rows_done / max(now, 1e-9):,.0f} chunks/s", flush=True)
    finally:
        for a in actors:
            ray.kill(a)
    return entries


@dataclass
class NeighborsSummary:
    version: str
    index_version: str
    chunks: int
    k: int
    rows_with_pads: int
    parts: int
    parts_kept: int
    recall_at_k: float | None
    seconds: float
    published: bool
    up_to_date: bool = False
    actors: int = 0
    cpus_per_actor: int = 0
    worker_seconds: float = 0.0
    actor_peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the workers searching (all their threads)
    search: dict = field(default_factory=dict)  # how: index (candidates, re-rank) or routed (shards, copies)

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"neighbors: up to date ({self.version} from index {self.index_version}, {self.chunks} chunks, "
                    f"k={self.k}); LATEST {'updated' if self.published else 'unchanged'}"]
        rate = self.chunks / self.seconds if self.seconds > 0 else 0.0
        recall = "n/a" if self.recall_at_k is None else f"{self.recall_at_k:.3f}"
        if self.search.get("search") == "torch":
            how = (f"torch list-major scan on {self.search['device']} ({self.search['dtype']}), nprobe "
                   f"{self.search['nprobe']}, {self.search['shards']} shard(s) of <= "
                   f"{self.search['shard_bytes_max'] / 2**20:,.1f} MiB in {self.search['tasks']} task(s), "
                   f"{self.search['scan_seconds']:.1f} device-task-s")
        elif self.search.get("search") == "routed":
            how = (f"routed over {self.search['shards']} shard(s) of <= {self.search['shard_bytes_max'] / 2**20:,.1f} MiB, "
                   f"{self.search['query_copies'] / max(self.chunks, 1):.2f} shard visits per chunk")
        else:
            how = (f"{self.actors} actor(s) x {self.cpus_per_actor} CPU, {self.search.get('candidates', 0)} candidates "
                   f"per chunk" + (" re-ranked exactly" if self.search.get("rerank_candidates") else ""))
        return [
            f"neighbors: {self.version} from index {self.index_version}: {self.chunks} chunks in, {self.chunks} rows out "
            f"(k={self.k}), {self.rows_with_pads} rows with -1 pads; {self.parts} parts "
            f"({self.parts_kept} kept from an earlier run)",
            f"neighbors: recall@{self.k} {recall} of the stored neighbors vs exact search (held-out sample); "
            f"{self.seconds:.1f} s ({rate:,.0f} chunks/s; {1000 * self.cpu_seconds / max(self.chunks, 1):.3f} CPU-ms per "
            f"chunk; {how}; peak {self.actor_peak_rss_mb:,.0f} MiB per worker); LATEST -> index {self.index_version}, "
            f"neighbors {self.version}",
        ]


def _newest_index_for(out: Location, embeddings_fp: str) -> str:
    for v in reversed(complete_versions(out, "index")):
        if read_manifest(out, f"index/{v}").get("embeddings_fingerprint") == embeddings_fp:
            return v
    raise FileNotFoundError(f"no complete index version under {out.url_of('index')} was built from the current "
                            "embeddings: run the index stage first")


def run_neighbors(*, out: Location, index_version: str | None = None, k: int = 2, extra_neighbors: int = 10,
                  concurrency: int = 0, publish: bool = True, search: str = "auto", shard_memory: str = "2G",
                  gpus_per_worker: float = 0.0, torch_device: str = "", config: dict | None = None) -> NeighborsSummary:
    """Compute (or resume, or find) the neighbors of every chunk and publish them with their index.

    ``gpus_per_worker`` > 0 searches with the torch list-major scan on CUDA (Ray tasks holding that many
    GPUs; :mod:`pipelines.stages.neighbors_torch`); ``torch_device`` ("cpu", "cuda") forces it on that device.
    An index the scan cannot use (no inverted lists, a non-linear pre-transform) is searched on CPUs.

    ``index_version`` defaults to the newest complete index built from the current embeddings;
    pass the version :func:`pipelines.stages.index.run_index` returned to pin it."""
    start = time.perf_counter()
    if k < 1 or extra_neighbors < 0:
        raise ValueError(f"--k must be >= 1 and --extra-neighbors >= 0, got {k} and {extra_neighbors}")
    info = load_embeddings_info(out, needed_by="the neighbors stage")
    index_version = index_version or _newest_index_for(out, info.fingerprint)
    index_folder = f"index/{index_version}"
    im = read_manifest(out, index_folder)
    if im is None:
        raise FileNotFoundError(f"{out.url_of(index_folder)} is not a complete index version")
    if im["embeddings_fingerprint"] != info.fingerprint or im["totals"]["ntotal"] != info.n:
        raise ValueError(f"index {index_version} was built from other embeddings than {out.url_of('embeddings')}: "
                         "rerun the index stage")
    check_search_mode(search, shard_memory)
    device = search_device(gpus_per_worker, torch_device)
    coarse, why_not = load_coarse(out, index_version, im["metric"]) if device else (None, "")
    if why_not:
        print(f"neighbors: not on {device}: {why_not}; searching on CPUs", flush=True)
        device = ""
    routed = not device and wants_routed(search, im, info, shard_memory)
    fp = fingerprint_of({"index": im["fingerprint"], "index_version": index_version, "k": k,
                         "extra": extra_neighbors} | ({"search": "routed"} if routed else {})
                        | ({"search": f"torch:{device}"} if device else {}))

    done = find_complete(out, "neighbors", fp)
    if done:
        m = read_manifest(out, f"neighbors/{done}")
        if all(part_is_valid(out, f"neighbors/{done}", e) for e in m["parts"]):
            published = publish_build(out, index_version=index_version, neighbors_version=done, index_manifest=im,
                                      k=k) if publish else False
            return NeighborsSummary(done, index_version, info.n, k, m["totals"]["rows_with_pads"], len(m["parts"]),
                                    len(m["parts"]), m.get("recall_at_k"), time.perf_counter() - start, published,
                                    up_to_date=True)
    version, _ = start_version(out, "neighbors", fp)
    folder = f"neighbors/{version}"
    remove_stale_temporaries(out, folder)

    parts = list(info.parts)
    if device:
        trun = run_torch(out, info, folder=folder, spec=coarse,
                         nprobe=parse_search_params(im.get("index_param", ""))[0], k=k, metric=im["metric"], device=device,
                         gpus=gpus_per_worker, shard_memory=shard_memory,
                         concurrency=concurrency or max(1, int(ray.cluster_resources().get("CPU", 1))))
        entries, n_actors, cpus, busy = trun.entries, trun.tasks, 0, trun.scan_seconds
        cpu_s, peak = trun.cpu_seconds, max(trun.peak_rss_mb.values())
        how = {"search": "torch", "device": device, "dtype": trun.dtype, "nprobe": trun.nprobe, "shards": trun.shards,
               "shard_bytes_max": trun.shard_bytes_max, "tasks": trun.tasks, "scan_seconds": round(trun.scan_seconds, 3),
               "peak_rss_mb": trun.peak_rss_mb}
    elif routed:
        run = run_routed(out, info, folder=folder, index_version=index_version, index_param=im.get("index_param", ""),
                         k=k, metric=im["metric"], shard_memory=shard_memory,
                         concurrency=concurrency or max(1, int(ray.cluster_resources().get("CPU", 1))))
        entries, n_actors, cpus, busy = run.entries, 0, 1, 0.0
        cpu_s, peak = run.cpu_seconds, max(run.peak_rss_mb.values())
        how = {"search": "routed", "shards": run.shards, "shard_bytes_max": run.shard_bytes_max,
               "query_copies": run.query_copies, "distances_per_chunk": round(run.pairs / max(info.n, 1), 1),
               "route_cpu_seconds": round(run.route_cpu_seconds, 3), "scan_cpu_seconds": round(run.scan_cpu_seconds, 3),
               "peak_rss_mb": run.peak_rss_mb}
    else:
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        n_actors = max(1, min(concurrency or cluster_cpus, len(parts), math.ceil(info.n / MIN_ROWS_PER_ACTOR)))
        cpus = max(1, min(cluster_cpus // n_actors, max_node_cpus()))
        rerank = int(im.get("rerank_candidates", 0))
        entries = run_parts(out.url, parts, n_actors=n_actors, cpus=cpus, index_version=index_version, folder=folder,
                            k=k, extra=extra_neighbors, metric=im["metric"], rerank=rerank)
        busy = sum(e.pop("seconds", 0.0) for e in entries)
        peak = max(e.pop("peak_rss_mb", 0.0) for e in entries)
        cpu_s = sum(e.pop("cpu_seconds", 0.0) for e in entries)
        how = {"search": "index", "candidates": max(k + extra_neighbors + 1, rerank), "rerank_candidates": rerank,
               "peak_rss_mb": {"neighbors_actor": peak}}
        print(f"neighbors: {sum(1 for e in entries if not e['kept'])} parts searched in {busy:.1f} worker-seconds by "
              f"{n_actors} actor(s) of {cpus} CPU(s); actor peak memory {peak:,.0f} MiB", flush=True)
    entries.sort(key=lambda e: e["first_chunk_id"])
    kept = sum(1 for e in entries if e.pop("kept"))
    for e in entries:
        e.pop("peak_rss_mb", None)

    # validate before publishing: one part per embeddings part, one row per chunk, all committed
    if [e["first_chunk_id"] for e in entries] != [p.offset for p in parts] or \
            [e["rows"] for e in entries] != [p.rows for p in parts] or \
            not all(part_is_valid(out, folder, e) for e in entries):
        raise RuntimeError(f"{out.url_of(folder)}: parts do not cover every chunk exactly once; not publishing")
    pads = sum(e["pad_rows"] for e in entries)
    recall = sample_recall(out, folder, index_folder, entries, k)
    write_manifest(out, folder, stage="neighbors", parts=entries,
                   totals={"rows": info.n, "k": k, "rows_with_pads": pads,
                           "rows_short_after_retries": sum(e["short_rows"] for e in entries)},
                   config=config or {"k": k, "extra_neighbors": extra_neighbors},
                   extra={"fingerprint": fp, "index_version": index_version, "metric": im["metric"],
                          "recall_at_k": recall, "cpu_seconds": round(cpu_s, 3),
                          "cpu_ms_per_chunk": round(1000 * cpu_s / max(info.n, 1), 4), **how})
    remove_tree(out, f"{folder}/{ROUTED_WORK}")
    published = publish_build(out, index_version=index_version, neighbors_version=version, index_manifest=im,
                              k=k) if publish else False
    return NeighborsSummary(version, index_version, info.n, k, pads, len(parts), kept, recall,
                            time.perf_counter() - start, published, actors=n_actors, cpus_per_actor=cpus,
                            worker_seconds=busy, actor_peak_rss_mb=peak, cpu_seconds=cpu_s, search=how)


@dataclass
class IndexNeighborsSummary:
    """Both stages of one build, as the job prints them."""

    index: object
    neighbors: NeighborsSummary

    def lines(self) -> list[str]:
        return self.index.lines() + self.neighbors.lines()


def run_index_and_neighbors(*, out: Location, index_key: str = "", max_index_memory: str = "4G",
                            max_query_ms: float = 10.0, metric: str = "l2", single_node_max_vectors: int = 2_000_000,
                            distributed: bool = False, k: int = 2, extra_neighbors: int = 10,
                            target_recall: float = 0.97, recall_sample: int = 1000, concurrency: int = 0,
                            search: str = "auto", shard_memory: str = "2G", gpus_per_worker: float = 0.0,
                            torch_device: str = "", config: dict | None = None) -> IndexNeighborsSummary:
    """The index stage, then the neighbors stage pinned to the version it produced, then LATEST."""
    from pipelines.stages.index import run_index

    s = run_index(out=out, index_key=index_key, max_index_memory=max_index_memory, max_query_ms=max_query_ms,
                  metric=metric, single_node_max_vectors=single_node_max_vectors, distributed=distributed, k=k,
                  extra_neighbors=extra_neighbors, target_recall=target_recall, recall_sample=recall_sample,
                  concurrency=concurrency, gpus_per_worker=gpus_per_worker, torch_device=torch_device, config=config)
    n = run_neighbors(out=out, index_version=s.version, k=k, extra_neighbors=extra_neighbors,
                      concurrency=concurrency, search=search, shard_memory=shard_memory,
                      gpus_per_worker=gpus_per_worker, torch_device=torch_device, config=config)
    return IndexNeighborsSummary(s, n)
