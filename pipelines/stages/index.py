"""The index stage: ``embeddings/`` -> ``index/vNNNN/`` (faiss files, ``index_infos.json``, manifest).

Choosing the index. autofaiss picks the index family that fits ``max_index_memory``; we ask it
for memory-mappable keys (IVF lists map from disk, so every neighbors worker on a node shares one
copy, and so does the training job). Departures from autofaiss' defaults, all for the neighbors
workload (every chunk queried once, in big batches):
- IVF-Flat (exact vectors) whenever it fits ``max_index_memory``; autofaiss moves to product
  quantization at 1M vectors whatever the memory bound, and the neighbors stage searches IVF-Flat
  list by list with BLAS (:mod:`pipelines.search.ivf_blas`);
- for IVF-Flat, about sqrt(N) lists, where the flat coarse assignment and the list scans cost
  about the same; autofaiss' 4-16 sqrt(N) is tuned for single-query latency and makes k-means
  training the slowest step at small N. Quantized keys keep autofaiss' list count (their coarse
  quantizer is an HNSW graph, so many lists are cheap to assign);
- search parameters (nprobe / efSearch) are tuned on a uniform sample against exact search, for
  the smallest value whose *filtered* neighbor recall@k reaches ``target_recall`` within
  ``max_query_ms`` of CPU time per query. autofaiss maximises recall under the latency bound instead, which
  gave the seed efSearch in the thousands and 80-90 s of neighbor search on 18k chunks.
Below ``FLAT_MAX_VECTORS`` an exact flat index is cheapest; up to ``FLAT_COMPARE_MAX`` the
single-node build measures exact search on the sample and keeps it unless the tuned index reaches
the target recall faster (at the seed's 18k chunks, exact search wins). ``index_key`` overrides.

Two build paths:
- single node (N <= ``single_node_max_vectors``): autofaiss builds in-process, reading the
  embeddings folder with embedding-reader; training (when the key needs it) uses a uniform sample
  across all parts, not autofaiss' first-N rows (chunk order follows documents, so those are biased);
- distributed (above the threshold, or ``distributed=True``): :mod:`pipelines.stages.index_distributed`.

Ground truth for the recall sample is computed part by part (in-process on the single-node path,
as Ray tasks on the distributed one). The version is published only after it validates (ntotal
equals the chunk count); ``LATEST`` is written by the neighbors stage once neighbors exist too.
A build that a re-index has changed (``tombstones/`` exists) is refused: this stage would index its
tombstoned chunks; ``jobs.reindex`` (``--full`` to rebuild) keeps such a build current.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field

import ray

from pipelines.artifacts.embeddings import DocBounds, EmbeddingsInfo, gather_rows, load_embeddings_info, uniform_sample
from pipelines.artifacts.manifest import read_manifest, write_manifest
from pipelines.artifacts.publish import refuse_reindexed
from pipelines.artifacts.storage import Location, remove_tree, write_bytes_atomic
from pipelines.artifacts.versions import file_entry, file_is_valid, find_complete, fingerprint_of, start_version
from pipelines.runtime.procstats import peak_rss_mb
from pipelines.search.faiss_index import (
    IndexSettings,
    autofaiss_version,
    check_index_key,
    explain_index_choice,
    faiss_version,
    flat_may_compete,
    train_index,
    train_size,
    write_index_file,
)
from pipelines.search.knn import use_blas_for_batches
from pipelines.search.rerank import ExactVectors
from pipelines.search.routing_quantizer import ROUTING_FILES, has_routing_files, write_routing_files
from pipelines.search.tuning import compute_recall_sample, evaluate, tune
from pipelines.stages.neighbors_torch import CoarseTrainer, search_device

APPROX_WORTH_S = 20.0  # exact neighbors for every chunk cheaper than this (CPU-seconds): no approximate index


# ----------------------------------------------------------------------------- single-node build


def build_and_tune_single(out: Location, info: EmbeddingsInfo, bounds: DocBounds, settings: IndexSettings, key: str,
                          auto: bool, seed: str, concurrency: int, trainer: CoarseTrainer | None = None,
                          notes: list | None = None):
    """Build in-process and tune. With an automatic key and a corpus small enough, exact search is
    measured first: the approximate index is only built when it could save real time (the whole
    neighbors job at exact cost is over ``APPROX_WORTH_S`` CPU-seconds) and only kept when it
    reaches the target recall faster per query than exact search."""
    t = time.perf_counter()
    sample = compute_recall_sample(out, info, bounds, settings, seed, use_ray=False, concurrency=concurrency)
    sample_seconds = time.perf_counter() - t
    build_seconds, tune_seconds, tried = 0.0, 0.0, []
    flat = flat_ev = None
    if auto and key != "Flat" and flat_may_compete(info, settings.max_index_memory):
        t = time.perf_counter()
        flat = build_single_node(out, info, "Flat", settings.metric, seed)
        build_seconds += time.perf_counter() - t
        t = time.perf_counter()
        flat_ev = {"index_key": "Flat", "index_param": "", **evaluate(flat, sample, settings)}
        tune_seconds += time.perf_counter() - t
        tried.append(flat_ev)
        if info.n * flat_ev["ms_per_query"] / 1000 <= APPROX_WORTH_S and flat_ev["ms_per_query"] <= settings.max_query_ms:
            print(f"index: exact search costs {flat_ev['ms_per_query']:.3f} ms/query, "
                  f"{info.n * flat_ev['ms_per_query'] / 1000:.1f} CPU-s for all chunks: using Flat", flush=True)
            return flat, "Flat", "", flat_ev, tried, build_seconds, tune_seconds + sample_seconds, sample
    t = time.perf_counter()
    index = build_single_node(out, info, key, settings.metric, seed, trainer, notes)
    build_seconds += time.perf_counter() - t
    t = time.perf_counter()
    param, chosen, more = tune(index, key, sample, settings, ms_cap=flat_ev["ms_per_query"] if flat_ev else None,
                               exact=ExactVectors(out, info))
    tune_seconds += time.perf_counter() - t + sample_seconds
    tried += more
    if flat_ev is not None:
        beats_flat = chosen["neighbor_recall"] >= settings.target_recall and chosen["ms_per_query"] < flat_ev["ms_per_query"]
        if not beats_flat and flat_ev["ms_per_query"] <= settings.max_query_ms:
            print(f"index: {key} does not reach recall {settings.target_recall} faster than exact search "
                  f"({flat_ev['ms_per_query']:.3f} ms/query): using Flat", flush=True)
            return flat, "Flat", "", flat_ev, tried, build_seconds, tune_seconds, sample
    return index, key, param, chosen, tried, build_seconds, tune_seconds, sample


def build_single_node(out: Location, info: EmbeddingsInfo, key: str, metric: str, seed: str,
                      trainer: CoarseTrainer | None = None, notes: list | None = None):
    """autofaiss builds the index in-process from the embeddings folder (embedding-reader); ``trainer``
    trains the coarse quantizer with torch k-means (on a GPU) instead of faiss (its note goes to ``notes``)."""
    from autofaiss.indices.build import add_embeddings_to_index_local
    from autofaiss.indices.training import create_empty_index
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(out.url_of("embeddings"), file_format="npy")
    if int(reader.count) != info.n or int(reader.dimension) != info.dim:
        raise ValueError(f"{out.url_of('embeddings')} holds {reader.count} rows of dim {reader.dimension} in .npy "
                         f"files, but its manifest lists {info.n} of dim {info.dim}: stray files in the folder?")
    index = create_empty_index(info.dim, key, metric)
    if not index.is_trained:
        sample = uniform_sample(info.n, train_size(info.n, key), f"train:{seed}")
        x = gather_rows(out, info, sample)
        if trainer is None:
            train_index(index, x)
        else:
            note = trainer.train(index, x)
            if notes is not None:
                notes.append(note)
    index, _ = add_embeddings_to_index_local(reader, index, memory_available_for_adding="1G",
                                             embedding_ids_df_handler=None, index_optimizer=None,
                                             add_embeddings_with_ids=False)
    return index


# ----------------------------------------------------------------------------- driver


@dataclass
class IndexSummary:
    version: str
    index_key: str
    index_param: str
    mode: str
    layout: str
    chunks: int
    ntotal: int
    size_bytes: int
    recall_at_k: float
    neighbor_recall_at_k: float
    query_ms: float
    k: int
    seconds: float
    build_seconds: float = 0.0
    tune_seconds: float = 0.0
    up_to_date: bool = False
    tried: list = field(default_factory=list)
    peak_rss_mb: dict = field(default_factory=dict)  # per worker role (or the driver), MiB
    build_cpu_seconds: float = 0.0  # CPU time of the workers that built it (the driver's on one node)
    key_reason: str = ""  # why this key (the automatic choice's rule, or --index-key)
    rerank: int = 0  # candidates re-ranked exactly per query (0: the index's distances are exact)
    trainer: str = ""  # what trained the coarse quantizer when not faiss on CPU (torch k-means, its device)

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"index: up to date ({self.version}: {self.index_key} {self.index_param}, {self.ntotal} vectors); "
                    "nothing to do"]
        return [
            f"index: {self.version} {self.index_key} ({self.mode} build, {self.layout}), {self.ntotal} of "
            f"{self.chunks} chunks, {self.size_bytes / 2**20:.1f} MiB, built in {self.build_seconds:.1f} s "
            f"({self.build_cpu_seconds:.1f} CPU-s); key: {self.key_reason}"
            + (f"; coarse quantizer: {self.trainer}" if self.trainer else ""),
            f"index: search {self.index_param or 'exact'}"
            + (f", {self.rerank} candidates re-ranked exactly" if self.rerank else "") + f": recall@{self.k} {self.recall_at_k:.3f} (index), "
            f"{self.neighbor_recall_at_k:.3f} (neighbors, own document excluded) vs exact search, "
            f"{self.query_ms:.3f} ms/query; tuned in {self.tune_seconds:.1f} s; total {self.seconds:.1f} s; peak memory "
            + ", ".join(f"{k} {v:,.0f} MiB" for k, v in self.peak_rss_mb.items()),
        ]


def _summary_from_manifest(m: dict, version: str) -> IndexSummary:
    return IndexSummary(version, m["index_key"], m.get("index_param", ""), m["mode"], m["layout"], m["totals"]["chunks"],
                        m["totals"]["ntotal"], m["totals"]["size_bytes"], m["recall_at_k"], m["neighbor_recall_at_k"],
                        m["query_ms"], m["k"], 0.0, up_to_date=True, key_reason=m.get("key_reason", ""),
                        rerank=int(m.get("rerank_candidates", 0)))


def index_fingerprint(info: EmbeddingsInfo, bounds: DocBounds, settings: IndexSettings, key: str, mode: str,
                      device: str = "") -> str:
    """``device``: the torch k-means' device ("" for faiss' own k-means): a differently trained index."""
    return fingerprint_of({"embeddings": info.fingerprint, "docs": bounds.fingerprint, "settings": asdict(settings),
                           "key": key, "mode": mode} | ({"kmeans": f"torch:{device}"} if device else {}))


def run_index(*, out: Location, index_key: str = "", max_index_memory: str = "4G", max_query_ms: float = 10.0,
              metric: str = "l2", single_node_max_vectors: int = 2_000_000, distributed: bool = False, k: int = 2,
              extra_neighbors: int = 10, target_recall: float = 0.97, recall_sample: int = 1000,
              concurrency: int = 0, gpus_per_worker: float = 0.0, torch_device: str = "",
              config: dict | None = None) -> IndexSummary:
    """Build, evaluate and commit one index version (or find the one these inputs already made).

    ``gpus_per_worker`` > 0 trains the coarse quantizer with torch k-means on CUDA in a Ray task holding that
    many GPUs; ``torch_device`` ("cpu" or "cuda") forces the torch k-means on that device (tests, benchmarks).

    Raises:
        ReindexedBuild: the build has been re-indexed (see the module docstring).
    """
    start = time.perf_counter()
    refuse_reindexed(out, "the index stage")
    use_blas_for_batches()
    settings = IndexSettings(index_key, max_index_memory, max_query_ms, metric, k, extra_neighbors,
                             target_recall, recall_sample)
    info = load_embeddings_info(out)
    bounds = DocBounds.load(out, info.n)
    mode = "distributed" if distributed or info.n > single_node_max_vectors else "single"
    choice = explain_index_choice(info.n, info.dim, max_index_memory) if not index_key else None
    key = index_key or choice.key
    key_reason = choice.reason if choice else "--index-key"
    check_index_key(key, info.dim, metric)
    device = search_device(gpus_per_worker, torch_device)
    fp = index_fingerprint(info, bounds, settings, key, mode, device)
    trainer = CoarseTrainer(device, gpus_per_worker, zlib.crc32(fp.encode())) if device else None
    notes: list[str] = []

    done = find_complete(out, "index", fp)
    if done and all(file_is_valid(out, f"index/{done}", e) for e in read_manifest(out, f"index/{done}")["parts"]):
        return _summary_from_manifest(read_manifest(out, f"index/{done}"), done)
    version, _ = start_version(out, "index", fp)
    folder = f"index/{version}"
    concurrency = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    how = key if index_key else f"autofaiss' choice {key}" + (" (or exact search where cheaper)" if mode == "single" else "")
    print(f"index: building {folder} ({mode}) over {info.n} chunks of dim {info.dim} with {how}", flush=True)

    if mode == "single":
        cpu = time.process_time()
        planned = key
        index, key, param, chosen, tried, build_seconds, tune_seconds, sample = build_and_tune_single(
            out, info, bounds, settings, key, not index_key, fp, concurrency, trainer, notes)
        if key != planned:
            key_reason = f"exact search measured cheaper than {planned} for the target recall at this size"
        build_cpu = time.process_time() - cpu  # the driver's, tuning included
        layout, files, ntotal = "single", ["knn.index"], int(index.ntotal)
        write_index_file(out, f"{folder}/knn.index", index)
        write_routing_files(out, folder, index, info.dim)
        del index
        peaks = {"driver": peak_rss_mb()}
    else:
        from pipelines.stages.index_distributed import build_distributed, tune_remote

        t = time.perf_counter()
        layout, files, ntotal, peaks, build_cpu = build_distributed(out, info, folder, key, metric, fp, concurrency,
                                                                    trainer, notes)
        build_seconds = time.perf_counter() - t
        t = time.perf_counter()
        sample = compute_recall_sample(out, info, bounds, settings, fp, use_ray=True, concurrency=concurrency)
        param, chosen, tried, ntotal, peaks["tune_task"] = tune_remote(out, folder, layout, files, info, key,
                                                                       sample, settings)
        tune_seconds = time.perf_counter() - t
    if ntotal != info.n:
        raise RuntimeError(f"{out.url_of(folder)}: the index holds {ntotal} vectors but there are {info.n} chunks; "
                           "not publishing it")

    write_bytes_atomic(out, f"{folder}/recall_sample.npz", sample.to_bytes())
    entries = [file_entry(out, f"{folder}/{f}", f) for f in files]
    size = sum(e["bytes"] for e in entries)
    infos = {
        "index_key": key, "index_param": param, "metric": metric, "layout": layout, "index_files": files,
        "mode": mode, "ntotal": ntotal, "dim": info.dim, "size_bytes": size, "k": k,
        "recall_at_k": chosen["recall"], "neighbor_recall_at_k": chosen["neighbor_recall"],
        "recall_sample": len(sample.ids), "query_ms": chosen["ms_per_query"], "max_query_ms": max_query_ms,
        "rerank_candidates": chosen["rerank"], "candidates": max(k + extra_neighbors + 1, chosen["rerank"]),
        "key_reason": key_reason, "trainer": "; ".join(notes), "target_recall": target_recall, "extra_neighbors": extra_neighbors, "tuning": tried,
        "build_seconds": round(build_seconds, 3), "tune_seconds": round(tune_seconds, 3),
        "build_cpu_seconds": round(build_cpu, 3), "peak_rss_mb": peaks,
        "faiss_version": faiss_version(), "autofaiss_version": autofaiss_version(),
    }
    write_bytes_atomic(out, f"{folder}/index_infos.json", json.dumps(infos, indent=2, sort_keys=True).encode())
    routing = list(ROUTING_FILES) if has_routing_files(out, folder) else []  # IVF indexes only
    entries += [file_entry(out, f"{folder}/{f}", f) for f in ("index_infos.json", "recall_sample.npz", *routing)]
    remove_tree(out, f"{folder}/_build")
    write_manifest(out, folder, stage="index", parts=entries,
                   totals={"chunks": info.n, "ntotal": ntotal, "dim": info.dim, "size_bytes": size},
                   config=config or {"settings": asdict(settings), "single_node_max_vectors": single_node_max_vectors,
                                     "distributed": distributed},
                   extra={"fingerprint": fp, "embeddings_fingerprint": info.fingerprint, "docs_fingerprint": bounds.fingerprint,
                          "index_key": key, "index_param": param, "metric": metric, "layout": layout,
                          "index_files": files, "mode": mode, "k": k, "extra_neighbors": extra_neighbors,
                          "rerank_candidates": chosen["rerank"], "key_reason": key_reason,
                          "recall_at_k": chosen["recall"],
                          "neighbor_recall_at_k": chosen["neighbor_recall"], "query_ms": chosen["ms_per_query"]})
    return IndexSummary(version, key, param, mode, layout, info.n, ntotal, size, chosen["recall"],
                        chosen["neighbor_recall"], chosen["ms_per_query"], k, time.perf_counter() - start,
                        build_seconds, tune_seconds, tried=tried, peak_rss_mb=peaks, build_cpu_seconds=build_cpu,
                        key_reason=key_reason, rerank=chosen["rerank"], trainer="; ".join(notes))
