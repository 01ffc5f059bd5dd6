"""The distributed index build: for embeddings that do not fit one machine (docs/design.md, scale rules).

1. Train (keys that need it): a uniform random sample across all parts, as many rows as the key
   needs (:func:`pipelines.search.faiss_index.train_size`), gathered by Ray tasks part by part and trained in
   one Ray task. The trained, empty index is staged in ``index/vNNNN/_build/trained.index``.
2. Add: one Ray task per embeddings part reads its rows block by block and adds them with their
   chunk ids to a copy of the trained index: a shard per part, staged with a sidecar (bytes,
   sha256, ntotal) so a killed build resumes with the shards it already has.
3. Merge: IVF shards are merged with faiss' on-disk inverted-list merge into ``knn.index`` +
   ``knn.ivfdata`` (memory-mappable: a reader maps the lists instead of loading them). Keys without
   inverted lists (Flat, HNSW) are published as ``shards/`` searched together (faiss.IndexShards
   with successive ids: parts hold consecutive chunk id ranges).
Each task's memory is bounded by its part, not by the corpus; only the merge writes one file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid

import numpy as np
import ray

from pipelines.artifacts.embeddings import EmbeddingPart, EmbeddingsInfo, NpyPart, part_rel, uniform_sample
from pipelines.artifacts.storage import Location, exists, open_location, read_bytes, write_bytes_atomic
from pipelines.artifacts.versions import fetch_files, file_entry, file_is_valid, load_index_files, put_file
from pipelines.runtime.procstats import peak_rss_mb, reset_peak_rss
from pipelines.runtime.ray_session import bounded_as_completed, max_node_cpus
from pipelines.search.faiss_index import faiss_metric, train_index, train_size, write_index_file
from pipelines.search.knn import ivf_of, use_blas_for_batches
from pipelines.search.rerank import ExactVectors
from pipelines.search.routing_quantizer import write_routing_files
from pipelines.search.tuning import tune
from pipelines.stages.neighbors_torch import CoarseTrainer

ADD_BLOCK_ROWS = 65536


def _set_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, n))


def _local_path(out: Location, rel: str, tmpdir: str) -> str:
    """A local copy of ``rel`` (the file itself on a local ``--out``)."""
    if out.is_local:
        return out.path(rel)
    dst = os.path.join(tmpdir, rel.replace("/", "_"))
    out.fs.get_file(out.path(rel), dst)
    return dst


@ray.remote(num_cpus=1)
def gather_part_task(out_url: str, part: dict, local_rows: np.ndarray) -> np.ndarray:
    p = EmbeddingPart.from_dict(part)
    return NpyPart(open_location(out_url), part_rel(p)).take(local_rows)


@ray.remote
def train_task(out_url: str, rel: str, key: str, dim: int, metric: str, sample_refs: list,
               threads: int, trainer: CoarseTrainer | None = None) -> tuple[float, float, str]:
    """Train the empty index on the gathered sample (the coarse k-means by ``trainer`` in torch when given)."""
    import faiss

    _set_threads(threads)
    reset_peak_rss()
    cpu = time.process_time()
    x = np.concatenate(ray.get(sample_refs))
    index = faiss.index_factory(dim, key, faiss_metric(metric))
    note = ""
    if trainer is None:
        train_index(index, x)
    else:
        note = trainer.train(index, x)
    write_index_file(open_location(out_url), rel, index)
    return peak_rss_mb(), time.process_time() - cpu, note


@ray.remote(num_cpus=1)
def add_part_task(out_url: str, part: dict, key: str, dim: int, metric: str, trained_rel: str | None,
                  shard_rel: str, with_ids: bool) -> dict:
    """Add one part's rows (with their chunk ids for IVF) to a fresh copy of the trained index."""
    import faiss


    _set_threads(1)
    reset_peak_rss()
    cpu = time.process_time()
    out = open_location(out_url)
    p = EmbeddingPart.from_dict(part)
    with tempfile.TemporaryDirectory() as d:
        index = faiss.read_index(_local_path(out, trained_rel, d)) if trained_rel else \
            faiss.index_factory(dim, key, faiss_metric(metric))
    for start, block in NpyPart(out, part_rel(p)).blocks(ADD_BLOCK_ROWS):
        if with_ids:
            index.add_with_ids(block, np.arange(p.offset + start, p.offset + start + len(block), dtype=np.int64))
        else:
            index.add(block)
    if index.ntotal != p.rows:
        raise RuntimeError(f"part {p.path}: added {index.ntotal} of {p.rows} rows")
    write_index_file(out, shard_rel, index)
    return file_entry(out, shard_rel, shard_rel.rsplit("/", 1)[-1], ntotal=int(index.ntotal), peak_rss_mb=peak_rss_mb(),
                      cpu_seconds=round(time.process_time() - cpu, 3))


@ray.remote(num_cpus=1)
def merge_task(out_url: str, folder: str, trained_rel: str, shard_rels: list[str]) -> tuple[int, float, float]:
    """Merge the IVF shards' inverted lists into one on-disk ``knn.ivfdata`` next to ``knn.index``."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    reset_peak_rss()
    cpu = time.process_time()
    out = open_location(out_url)
    work = out.path(f"{folder}/_build/merge-{uuid.uuid4().hex}") if out.is_local else tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    try:
        shards = [_local_path(out, r, work) for r in shard_rels]
        trained = faiss.read_index(_local_path(out, trained_rel, work))
        # Locally the lists go straight to their final path (the index file records it; the version
        # is not complete before its manifest). Remotely, readers find them by name beside knn.index.
        ivfdata = out.path(f"{folder}/knn.ivfdata") if out.is_local else os.path.join(work, "knn.ivfdata")
        if os.path.exists(ivfdata):
            os.remove(ivfdata)  # a killed merge's leftovers: OnDiskInvertedLists would append to them
        merge_ondisk(trained, shards, ivfdata)
        ntotal = int(trained.ntotal)
        local_index = os.path.join(work, "knn.index")
        faiss.write_index(trained, local_index)
        write_routing_files(out, folder, trained, trained.d)
        del trained
        if not out.is_local:
            put_file(out, f"{folder}/knn.ivfdata", ivfdata, move=True)
        put_file(out, f"{folder}/knn.index", local_index, move=True)
        return ntotal, peak_rss_mb(), time.process_time() - cpu
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sidecar_valid(out: Location, build: str, name: str) -> dict | None:
    rel = f"{build}/{name}.json"
    if not exists(out, rel):
        return None
    entry = json.loads(read_bytes(out, rel))
    return entry if file_is_valid(out, build, entry) else None


def train_distributed(out: Location, info: EmbeddingsInfo, build: str, key: str, metric: str, seed: str,
                      concurrency: int, trainer: CoarseTrainer | None = None, notes: list | None = None) -> str:

    rel = f"{build}/trained.index"
    if _sidecar_valid(out, build, "trained.index"):
        return rel
    ids = uniform_sample(info.n, train_size(info.n, key), f"train:{seed}")
    owner = info.part_of(ids)
    refs = []
    for p in np.unique(owner).tolist():
        part = info.parts[p]
        refs.append(gather_part_task.remote(out.url, part.to_dict(), ids[owner == p] - part.offset))
    threads = min(concurrency, max_node_cpus())
    peak, cpu, note = ray.get(train_task.options(num_cpus=threads).remote(out.url, rel, key, info.dim, metric, refs,
                                                                          threads, trainer))
    if note and notes is not None:
        notes.append(note)
    entry = file_entry(out, rel, "trained.index", peak_rss_mb=peak, cpu_seconds=round(cpu, 3))
    write_bytes_atomic(out, f"{build}/trained.index.json", json.dumps(entry).encode())
    return rel


def build_distributed(out: Location, info: EmbeddingsInfo, folder: str, key: str, metric: str, seed: str,
                      concurrency: int, trainer: CoarseTrainer | None = None,
                      notes: list | None = None) -> tuple[str, list[str], int, dict, float]:
    """Returns (layout, index files relative to ``folder``, ntotal, peak RSS MiB per worker role,
    CPU-seconds the workers spent). ``trainer``: torch k-means for the coarse quantizer (its note goes
    to ``notes``)."""
    import faiss


    build = f"{folder}/_build"
    empty = faiss.index_factory(info.dim, key, faiss_metric(metric))
    is_ivf = ivf_of(empty) is not None
    trained_rel = train_distributed(out, info, build, key, metric, seed, concurrency, trainer, notes) \
        if not empty.is_trained else None
    if is_ivf and trained_rel is None:  # an IVF that needs no training (e.g. a given quantizer): stage it as is
        trained_rel = f"{build}/trained.index"

        write_index_file(out, trained_rel, empty)

    parts = [p for p in info.parts if p.rows > 0]
    names = {p.index: f"shard-{p.index:05d}.index" for p in parts}
    entries: dict[int, dict] = {}
    pending = []
    for p in parts:
        e = _sidecar_valid(out, build, names[p.index])
        if e:
            entries[p.index] = e
        else:
            pending.append(p)
    if len(entries):
        print(f"index: resuming, {len(entries)} of {len(parts)} shards kept", flush=True)
    def submit(p):
        return add_part_task.remote(out.url, p.to_dict(), key, info.dim, metric, trained_rel,
                                    f"{build}/{names[p.index]}", is_ivf)

    for i, e in bounded_as_completed(submit, pending, concurrency):
        p = pending[i]
        write_bytes_atomic(out, f"{build}/{names[p.index]}.json", json.dumps(e).encode())
        entries[p.index] = e
    ntotal = sum(int(entries[p.index]["ntotal"]) for p in parts)
    peaks = {"add_task": max(float(e.get("peak_rss_mb", 0)) for e in entries.values())}
    cpu = sum(float(e.get("cpu_seconds", 0)) for e in entries.values())
    trained = _sidecar_valid(out, build, "trained.index") if trained_rel else None
    if trained:
        peaks["train_task"] = float(trained.get("peak_rss_mb", 0))
        cpu += float(trained.get("cpu_seconds", 0))
    shard_rels = [f"{build}/{names[p.index]}" for p in parts]
    if is_ivf:
        merged, peaks["merge_task"], merge_cpu = ray.get(merge_task.remote(out.url, folder, trained_rel, shard_rels))
        cpu += merge_cpu
        if merged != ntotal:
            raise RuntimeError(f"on-disk merge produced {merged} vectors, the shards hold {ntotal}")
        return "ondisk", ["knn.index", "knn.ivfdata"], ntotal, peaks, cpu
    files = []
    for p, rel in zip(parts, shard_rels):
        name = f"shards/{names[p.index]}"
        if out.is_local:
            put_file(out, f"{folder}/{name}", out.path(rel), move=True)
        else:
            out.fs.copy(out.path(rel), out.path(f"{folder}/{name}"))
        files.append(name)
    return "shards", files, ntotal, peaks, cpu


@ray.remote(num_cpus=1)
def tune_task(out_url: str, folder: str, layout: str, files: list[str], info: EmbeddingsInfo, key: str, sample,
              settings):
    _set_threads(1)
    use_blas_for_batches()
    reset_peak_rss()
    out = open_location(out_url)
    with tempfile.TemporaryDirectory() as d:
        local = fetch_files(out, folder, [{"path": f} for f in files], cache_dir=d)
        index = load_index_files(local, layout, files, info.dim)
        param, chosen, tried = tune(index, key, sample, settings, exact=ExactVectors(out, info))
        return param, chosen, tried, int(index.ntotal), peak_rss_mb()


def tune_remote(out: Location, folder: str, layout: str, files: list[str], info: EmbeddingsInfo, key: str, sample,
                settings):
    """Tune search parameters (and re-ranking, for a lossy key) where the index files are, not on the driver."""
    return ray.get(tune_task.remote(out.url, folder, layout, files, info, key, sample, settings))
