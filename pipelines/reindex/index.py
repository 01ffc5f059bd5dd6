"""Re-index, step 4: a new index version, by updating a copy of the published one or rebuilding.

Incremental (the default): the published ``knn.index`` is read into a Ray task, the chunks of
newly tombstoned documents are removed (``remove_ids``), the new live chunks are added with their
chunk ids (``add_with_ids``), all with the published index's trained quantizers (no training).
A flat index gets an id map (``IndexIDMap2``) on its first update, because ``IndexFlat.remove_ids``
renumbers. The task also writes ``delta.index``: the added vectors alone, in an index with the
same quantizers, which the neighbors step searches to check old chunks against the new ones.
The search parameters are tuned again (:func:`pipelines.search.tuning.tune`) on a fresh sample; if even
the tuned index stays below ``--min-recall``, the quantizers no longer fit the data (drift) and the
driver rebuilds instead.

Full rebuild: a new index of the same family (or ``--index-key``), trained on a uniform sample of
the live chunks, with every live chunk added by id; tuned the same way. It runs distributed like the
build's (:mod:`pipelines.stages.index_distributed`): the sample is gathered part by part and trained in
one task, one task per embeddings part adds its live rows to a copy of the trained index (a shard in
``_build/``), and one task merges the shards in part order (``merge_from``: the same lists, in the same
order, as adding them one after another) into the single ``knn.index`` that later runs update, then
tunes it. Only that last task holds the whole index, as the single-file layout needs. A key whose index
cannot merge (HNSW) is still built in one task.

Either way the version is written like the index stage's (``knn.index``, ``index_infos.json``,
``recall_sample.npz``, manifest) so :func:`pipelines.artifacts.versions.open_index` opens it; its manifest's
``reindex`` entry records what it covers (see :mod:`pipelines.reindex.state`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import ray

from pipelines.artifacts.embeddings import EmbeddingPart, NpyPart, gather_rows, load_embeddings_info, part_rel
from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import Location, open_location, remove_tree
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import fetch_files, file_entry
from pipelines.reindex.sample import live_sample_ids
from pipelines.reindex.state import UPDATABLE, updatable
from pipelines.runtime.procstats import peak_rss_mb, reset_peak_rss
from pipelines.runtime.ray_session import bounded_as_completed
from pipelines.search.faiss_index import IndexSettings, faiss_metric, train_index, train_size, write_index_file
from pipelines.search.knn import ivf_of, use_blas_for_batches
from pipelines.search.rerank import ExactVectors
from pipelines.search.tuning import RecallSample, tune

ADD_BLOCK_ROWS = 65536


@dataclass(frozen=True)
class IndexJob:
    """What an index task needs (small: it travels to a Ray worker)."""

    out_url: str
    folder: str  # the new version, index/vNNNN
    index_key: str
    metric: str
    dim: int
    settings: IndexSettings
    min_recall: float
    threads: int
    tombstone_parts: int  # all tombstones to apply
    base_folder: str = ""  # incremental: the published version
    base_files: tuple = ()
    base_param: str = ""
    base_tombstone_parts: int = 0
    chunks_covered: int = 0  # incremental: ids below this are already in the base index
    seed: str = ""


def _live_blocks(out: Location, part: EmbeddingPart, tomb: Tombstones, start_id: int = 0):
    """(vectors, chunk ids) of the live rows of a part with ids >= ``start_id``, block by block."""
    npy = NpyPart(out, part_rel(part))
    first = max(0, start_id - part.offset)
    for start in range(first, part.rows, ADD_BLOCK_ROWS):
        x = npy.read(start, start + ADD_BLOCK_ROWS)
        ids = np.arange(part.offset + start, part.offset + start + len(x), dtype=np.int64)
        live = ~tomb.dead(ids)
        if live.any():
            yield x[live], ids[live]


def empty_like(index):
    """An empty copy of an IVF index with the same trained quantizer (no copy of its lists)."""
    import faiss

    ivf = ivf_of(index)
    saved, own, n_ivf, n_top = ivf.invlists, ivf.own_invlists, ivf.ntotal, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    ivf.ntotal, index.ntotal = 0, 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(saved, own)
        ivf.ntotal, index.ntotal = n_ivf, n_top


def with_id_map(index, metric: str):
    """A flat index whose ids are its positions, as an ``IndexIDMap2`` (copied in blocks)."""
    import faiss

    mapped = faiss.IndexIDMap2(faiss.IndexFlat(index.d, faiss_metric(metric)))
    for start in range(0, index.ntotal, ADD_BLOCK_ROWS):
        n = min(ADD_BLOCK_ROWS, index.ntotal - start)
        mapped.add_with_ids(index.reconstruct_n(start, n), np.arange(start, start + n, dtype=np.int64))
    return mapped


def _finish(job: IndexJob, out: Location, index, delta, sample: RecallSample, key: str, start: float,
            **counts) -> dict:
    """Tune on the fresh sample, check recall, write the index file(s); returns what the driver records."""
    t = time.perf_counter()
    param, chosen, tried = tune(index, key, sample, job.settings,
                                exact=ExactVectors(out, load_embeddings_info(out, needed_by="the re-index job")))
    tune_seconds = time.perf_counter() - t
    result = {"index_param": param, "chosen": chosen, "tried": tried, "ntotal": int(index.ntotal),
              "tune_seconds": round(tune_seconds, 3), "peak_rss_mb": peak_rss_mb(), **counts}
    if chosen["neighbor_recall"] < job.min_recall and job.base_folder:
        return result | {"drift": f"neighbor recall@{job.settings.k} {chosen['neighbor_recall']:.3f} on a fresh sample "
                                   f"of {len(sample.ids)} chunks is below --min-recall {job.min_recall} with the "
                                   f"quantizers of {job.base_folder} ({param or 'exact'})"}
    write_index_file(out, f"{job.folder}/knn.index", index)
    files = ["knn.index"]
    if delta is not None:
        write_index_file(out, f"{job.folder}/delta.index", delta)
        files.append("delta.index")
    return result | {"files": files, "build_seconds": round(t - start, 3)}


@ray.remote
def update_index_task(job: IndexJob, sample: RecallSample) -> dict:
    """Copy of the published index: remove newly tombstoned chunks, add new live chunks."""
    import faiss

    start = time.perf_counter()
    faiss.omp_set_num_threads(job.threads)
    use_blas_for_batches()
    out = open_location(job.out_url)
    with tempfile.TemporaryDirectory() as d:
        entries = [e for e in read_manifest(out, job.base_folder)["parts"] if e["path"] in job.base_files]
        local = fetch_files(out, job.base_folder, entries, cache_dir=d)  # checked against the manifest's sha256
        index = faiss.read_index(os.path.join(local, job.base_files[0]))
    why = updatable(index)
    if why != UPDATABLE:
        return {"drift": why}
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexFlat):
        index = with_id_map(idx, job.metric)
        del idx
    delta = empty_like(index) if ivf_of(index) is not None else faiss.IndexIDMap2(faiss.IndexFlat(job.dim, faiss_metric(job.metric)))
    tomb = Tombstones.load(out, job.tombstone_parts)
    gone = tomb.since(job.base_tombstone_parts, out).chunk_ids(0, job.chunks_covered)
    removed = int(index.remove_ids(gone)) if len(gone) else 0
    if removed != len(gone):
        raise RuntimeError(f"{job.base_folder}: removed {removed} of the {len(gone)} newly tombstoned chunks; "
                           "the published index does not hold the ids its manifest says it covers")
    added = 0
    info = load_embeddings_info(out, needed_by="the re-index job")
    for part in info.parts:
        if part.offset + part.rows <= job.chunks_covered:
            continue
        for x, ids in _live_blocks(out, part, tomb, job.chunks_covered):
            index.add_with_ids(x, ids)
            delta.add_with_ids(x, ids)
            added += len(ids)
    if job.base_param:
        faiss.ParameterSpace().set_index_parameters(index, job.base_param)
        faiss.ParameterSpace().set_index_parameters(delta, job.base_param)
    result = _finish(job, out, index, delta, sample, job.index_key, start, removed=removed, added=added)
    if "drift" not in result and result["index_param"]:
        faiss.ParameterSpace().set_index_parameters(delta, result["index_param"])
        write_index_file(out, f"{job.folder}/delta.index", delta)  # with the tuned parameters too
    return result


def _with_ids(index):
    """IVF indices take ids themselves; any other gets an id map (so the chunk ids survive)."""
    import faiss

    return index if ivf_of(index) is not None else faiss.IndexIDMap2(index)


def mergeable(index) -> bool:
    """Whether shards of this (empty) index can be merged: IVF families and flat indices."""
    import faiss

    return ivf_of(index) is not None or isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _read_local(out: Location, rel: str):
    import faiss

    from pipelines.stages.index_distributed import _local_path

    with tempfile.TemporaryDirectory() as d:
        return faiss.read_index(_local_path(out, rel, d))


@ray.remote(num_cpus=1)
def add_live_part_task(job: IndexJob, part: dict, trained_rel: str, shard_rel: str) -> dict:
    """One shard: a part's live rows, with their chunk ids, added to a copy of the trained index."""
    import faiss

    faiss.omp_set_num_threads(1)
    reset_peak_rss()
    out = open_location(job.out_url)
    index = _with_ids(_read_local(out, trained_rel))
    for x, ids in _live_blocks(out, EmbeddingPart.from_dict(part), Tombstones.load(out, job.tombstone_parts)):
        index.add_with_ids(x, ids)
    write_index_file(out, shard_rel, index)
    return {"ntotal": int(index.ntotal), "peak_rss_mb": peak_rss_mb()}


@ray.remote
def merge_shards_task(job: IndexJob, sample: RecallSample, trained_rel: str, shard_rels: list[str], added: int) -> dict:
    """The shards merged in part order into one index, tuned and written (``_finish``)."""
    import faiss

    start = time.perf_counter()
    faiss.omp_set_num_threads(job.threads)
    use_blas_for_batches()
    out = open_location(job.out_url)
    index = _with_ids(_read_local(out, trained_rel))
    for rel in shard_rels:
        index.merge_from(_read_local(out, rel), 0)
    if int(index.ntotal) != added:
        raise RuntimeError(f"{job.folder}: the merged index holds {index.ntotal} vectors, its shards {added}")
    return _finish(job, out, index, None, sample, job.index_key, start, removed=0, added=added)


def full_rebuild(job: IndexJob, sample_ref, concurrency: int) -> dict:
    """The distributed full rebuild (see the module docstring); returns what ``_finish`` returns, plus
    ``distributed``: the training rows, add tasks and their peak memory."""
    import faiss

    from pipelines.stages.index_distributed import gather_part_task, train_task

    out = open_location(job.out_url)
    info = load_embeddings_info(out, needed_by="the re-index job")
    tomb = Tombstones.load(out, job.tombstone_parts)
    empty = faiss.index_factory(job.dim, job.index_key, faiss_metric(job.metric))
    if not mergeable(empty):
        return ray.get(full_index_task.options(num_cpus=job.threads).remote(job, sample_ref))
    build = f"{job.folder}/_build"
    trained_rel = f"{build}/trained.index"
    train_rows = 0
    if empty.is_trained:
        write_index_file(out, trained_rel, empty)
    else:
        ids = live_sample_ids(info.n, info.n, train_size(info.n - tomb.chunks, job.index_key), tomb, f"train:{job.seed}")
        owner = info.part_of(ids)
        refs = [gather_part_task.remote(job.out_url, info.parts[p].to_dict(), ids[owner == p] - info.parts[p].offset)
                for p in np.unique(owner).tolist()]
        ray.get(train_task.options(num_cpus=job.threads).remote(job.out_url, trained_rel, job.index_key, job.dim,
                                                                job.metric, refs, job.threads))
        train_rows = len(ids)
    parts = [p for p in info.parts if p.rows > 0]
    shard_rels = [f"{build}/shard-{p.index:05d}.index" for p in parts]
    shards = dict(bounded_as_completed(lambda i: add_live_part_task.remote(job, parts[i].to_dict(), trained_rel,
                                                                           shard_rels[i]),
                                       list(range(len(parts))), concurrency))
    added = sum(shards[i]["ntotal"] for i in range(len(parts)))
    result = ray.get(merge_shards_task.options(num_cpus=job.threads).remote(job, sample_ref, trained_rel, shard_rels,
                                                                            added))
    remove_tree(out, build)
    return result | {"distributed": {"train_rows": train_rows, "add_tasks": len(parts),
                                     "add_task_peak_rss_mb": max((v["peak_rss_mb"] for v in shards.values()), default=0)}}


@ray.remote
def full_index_task(job: IndexJob, sample: RecallSample) -> dict:
    """A new index over the live chunks in one task (keys whose shards cannot merge): trained on a uniform
    sample of them, every live chunk added by id."""
    import faiss

    start = time.perf_counter()
    faiss.omp_set_num_threads(job.threads)
    use_blas_for_batches()
    out = open_location(job.out_url)
    info = load_embeddings_info(out, needed_by="the re-index job")
    tomb = Tombstones.load(out, job.tombstone_parts)
    live_n = info.n - tomb.chunks
    index = faiss.index_factory(job.dim, job.index_key, faiss_metric(job.metric))
    if ivf_of(index) is None:
        index = faiss.IndexIDMap2(index)
    if not index.is_trained:
        ids = live_sample_ids(info.n, info.n, train_size(live_n, job.index_key), tomb, f"train:{job.seed}")
        train_index(index, gather_rows(out, info, ids))
    added = 0
    for part in info.parts:
        for x, ids in _live_blocks(out, part, tomb):
            index.add_with_ids(x, ids)
            added += len(ids)
    return _finish(job, out, index, None, sample, job.index_key, start, removed=0, added=added)


def write_version(out: Location, job: IndexJob, result: dict, sample: RecallSample, *, fingerprint: str,
                  embeddings_fp: str, docs_fp: str, chunks_total: int, k: int, extra_neighbors: int,
                  reindex: dict, config: dict) -> dict:
    """index_infos.json, recall_sample.npz and the manifest (written last) of the new version."""
    from pipelines.artifacts.manifest import write_manifest
    from pipelines.artifacts.storage import write_bytes_atomic
    from pipelines.search.faiss_index import autofaiss_version, faiss_version

    folder = job.folder
    write_bytes_atomic(out, f"{folder}/recall_sample.npz", sample.to_bytes())
    files = result["files"]
    entries = [file_entry(out, f"{folder}/{f}", f) for f in files]
    size = sum(e["bytes"] for e in entries if e["path"] == "knn.index")
    chosen = result["chosen"]
    infos = {
        "index_key": job.index_key, "index_param": result["index_param"], "metric": job.metric, "layout": "single",
        "index_files": ["knn.index"], "mode": "single", "ntotal": result["ntotal"], "dim": job.dim,
        "size_bytes": size, "k": k, "recall_at_k": chosen["recall"], "neighbor_recall_at_k": chosen["neighbor_recall"],
        "recall_sample": len(sample.ids), "query_ms": chosen["ms_per_query"], "rerank_candidates": chosen["rerank"],
        "max_query_ms": job.settings.max_query_ms, "target_recall": job.settings.target_recall,
        "extra_neighbors": extra_neighbors, "tuning": result["tried"], "build_seconds": result.get("build_seconds", 0),
        "tune_seconds": result["tune_seconds"], "peak_rss_mb": {"index_task": result["peak_rss_mb"]},
        "faiss_version": faiss_version(), "autofaiss_version": autofaiss_version(), "reindex": reindex,
    }
    write_bytes_atomic(out, f"{folder}/index_infos.json", json.dumps(infos, indent=2, sort_keys=True).encode())
    entries += [file_entry(out, f"{folder}/{f}", f) for f in ("index_infos.json", "recall_sample.npz")]
    return write_manifest(out, folder, stage="reindex", parts=entries,
                          totals={"chunks": chunks_total, "ntotal": result["ntotal"], "dim": job.dim, "size_bytes": size},
                          config=config,
                          extra={"fingerprint": fingerprint, "embeddings_fingerprint": embeddings_fp,
                                 "docs_fingerprint": docs_fp, "index_key": job.index_key,
                                 "index_param": result["index_param"], "metric": job.metric, "layout": "single",
                                 "index_files": ["knn.index"], "mode": "single", "k": k,
                                 "extra_neighbors": extra_neighbors, "recall_at_k": chosen["recall"],
                                 "neighbor_recall_at_k": chosen["neighbor_recall"], "query_ms": chosen["ms_per_query"],
                                 "rerank_candidates": chosen["rerank"], "settings": asdict(job.settings), "reindex": reindex})
