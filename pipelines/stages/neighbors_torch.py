"""The index and neighbors stages on GPUs: PyTorch k-means for the coarse quantizer, and the all-chunks
neighbor search as a list-major IVF scan (:mod:`pipelines.search.torch_scan`) in Ray tasks with ``num_gpus``.

Which device: ``gpus_per_worker`` > 0 (``--gpus-per-worker``, ``auto`` = 1 when the cluster has GPUs)
runs both on CUDA; ``torch_device="cpu"`` runs the same torch code on CPUs (how the tests check it
against the faiss path). The index file stays a faiss index (the torch centroids fill its quantizer;
PQ/OPQ codebooks, when the key has them, are still trained by faiss on CPU).

The search needs only the coarse quantizer (centroids, and a linear pre-transform such as OPQ), the
tuned ``nprobe`` and the stored embeddings: each task holds one shard of the lists with their exact
vectors on its device (``DeviceLists``, at most the shard budget: half the device's memory on CUDA,
``--shard-memory`` on CPU), assigning every vector to its nearest centroid as faiss' add does, and scans
its query parts. One shard: the parts are split among the GPUs, each holding every list. Several
shards: one task per shard scans every part; per-shard top-k are merged per part by the routed search's
merge task (same files, ``_routed/rPPPPP/sSSSSS.npz``), so a killed run resumes the same way.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import ray

from pipelines.artifacts.arrays import write_arrays
from pipelines.artifacts.embeddings import DocBounds, EmbeddingPart, EmbeddingsInfo, NpyPart, part_rel
from pipelines.artifacts.storage import Location, exists, open_location, read_bytes, write_bytes_atomic
from pipelines.artifacts.versions import open_index
from pipelines.runtime.procstats import peak_rss_mb, reset_peak_rss
from pipelines.runtime.ray_session import bounded_as_completed, cluster_gpus
from pipelines.search.faiss_index import memory_bytes, train_with_centroids
from pipelines.search.knn import ivf_of
from pipelines.search.routing_quantizer import RoutingQuantizer, read_routing_quantizer, routing_quantizer
from pipelines.stages.neighbors_routed import RoutedJob, merge_part_task

QUERY_BLOCK_ROWS = {"cuda": 65536, "cpu": 4096}  # queries probed and scanned at once
LOAD_BLOCK_ROWS = 65536
DEVICE_MEMORY_SHARE = 0.5  # of a GPU's memory for resident vectors; the rest for query blocks and scores
DEVICES = ("cpu", "cuda")


def search_device(gpus_per_worker: float, forced: str = "") -> str:
    """The torch device of the index training and neighbor search: "" (faiss on CPUs), "cuda" or "cpu".

    Raises:
        ValueError: an unknown forced device, or GPUs asked of a cluster without them.
    """
    if forced:
        if forced not in DEVICES:
            raise ValueError(f"torch device must be one of {', '.join(DEVICES)}, got {forced!r}")
        return forced
    if gpus_per_worker <= 0:
        return ""
    if cluster_gpus() < gpus_per_worker:
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g} but the Ray cluster has {cluster_gpus():g} GPU(s)")
    return "cuda"


def _scan_dtype(device: str):
    import torch

    # float16, not bfloat16: stored float16 embeddings are exact in it, so the float32 re-rank is exact too
    return torch.float16 if device == "cuda" else torch.float32


# ----------------------------------------------------------------------------- index training


@ray.remote(num_cpus=1)
def kmeans_task(x: np.ndarray, nlist: int, spherical: bool, seed: int, device: str) -> tuple[np.ndarray, float]:
    import torch

    from pipelines.search.torch_kmeans import kmeans

    r = kmeans(torch.from_numpy(x).to(device), nlist, spherical=spherical, seed=seed)
    return r.centroids.cpu().numpy(), r.seconds


@dataclass(frozen=True)
class CoarseTrainer:
    """Trains an index's coarse quantizer with torch k-means on ``device`` (a Ray task holding ``gpus``
    GPUs on CUDA); pre-transforms and codebooks train in faiss on CPU, as before."""

    device: str
    gpus: float
    seed: int

    def train(self, index, x: np.ndarray) -> str:
        """Train ``index`` on the sample ``x``; returns what trained what (for the index summary)."""
        ivf = ivf_of(index)
        if ivf is None or ivf.is_trained:
            index.train(x)
            return "faiss on CPU (no coarse quantizer to train)"
        task = kmeans_task.options(num_gpus=self.gpus, num_cpus=0) if self.device == "cuda" else kmeans_task
        took: list[float] = []

        def torch_centroids(xt: np.ndarray, nlist: int, spherical: bool) -> np.ndarray:
            centroids, seconds = ray.get(task.remote(np.ascontiguousarray(xt, np.float32), nlist, spherical,
                                                     self.seed & 0x7FFFFFFF, self.device))
            took.append(seconds)
            return centroids

        train_with_centroids(index, x, torch_centroids)
        return f"k-means of {ivf.nlist} lists on {len(x):,} points in torch on {self.device} ({took[0]:.1f} s)"


# ----------------------------------------------------------------------------- the search


@dataclass
class CoarseSpec:
    """The index's coarse quantizer as arrays (sent to every task): centroids, the pre-transform
    composed into one linear map (or None), the size of every list."""

    centroids: np.ndarray
    transform: np.ndarray | None
    bias: np.ndarray | None
    list_sizes: np.ndarray
    metric: str


def coarse_of(index, metric: str) -> tuple[CoarseSpec | None, str]:
    """The spec of an IVF (after a linear pre-transform) or flat index; (None, why) for anything else."""
    import faiss

    routing = routing_quantizer(index, index.d)
    if routing is not None:
        return _spec_of(routing, metric)
    top = faiss.downcast_index(index)
    inner = top.at(0) if isinstance(top, faiss.IndexShards) and top.count() else top
    if isinstance(faiss.downcast_index(inner), faiss.IndexFlat):  # exact: one list holding everything
        return CoarseSpec(np.zeros((1, index.d), np.float32), None, None, np.array([index.ntotal]), metric), ""
    return None, f"{type(top).__name__} has no inverted lists"


def _spec_of(routing: RoutingQuantizer, metric: str) -> tuple[CoarseSpec | None, str]:
    """The spec of an IVF's routing view: its pre-transforms composed into one linear map."""
    import faiss

    transform = bias = None
    if isinstance(routing.quantizer, faiss.IndexPreTransform):
        chain = routing.quantizer.chain
        for i in range(chain.size()):
            vt = faiss.downcast_VectorTransform(chain.at(i))
            if not isinstance(vt, faiss.LinearTransform):
                return None, f"its pre-transform {type(vt).__name__} is not linear"
            a = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
            b = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(vt.d_out, np.float32)
            transform, bias = (a, b) if transform is None else (a @ transform, a @ bias + b)
    return CoarseSpec(routing.centroids, transform, bias, routing.list_sizes, metric), ""


def load_coarse(out: Location, index_version: str, metric: str) -> tuple[CoarseSpec | None, str]:
    """The coarse spec of an index version, or (None, why the torch scan cannot search it). Reads the
    small routing files the index stage wrote; only an index without them (flat, or older) is opened."""
    routing, _ = read_routing_quantizer(out, f"index/{index_version}")
    if routing is not None:
        return _spec_of(routing, metric)
    return coarse_of(open_index(out, index_version, mmap=True), metric)


@dataclass(frozen=True)
class TorchJob:
    """What every scan task needs (small; the coarse spec and the list plan travel as object refs)."""

    routed: RoutedJob  # the output folder, k, metric, shard count, and where partial results go
    device: str
    nprobe: int
    score_budget: int


def _device_tensors(spec: CoarseSpec, device: str):
    import torch

    from pipelines.search.torch_scan import Coarse

    def t(a):
        return None if a is None else torch.from_numpy(np.array(a, np.float32)).to(device)  # a writable copy

    return Coarse(t(spec.centroids), spec.metric, t(spec.transform), t(spec.bias)), \
        torch.from_numpy(spec.list_sizes).to(device)


def _load_shard(out: Location, info: EmbeddingsInfo, bounds: DocBounds, coarse, list_shard, shard: int, device: str):
    """This shard's vectors on the device: every part read block by block, each vector assigned to its
    nearest list (as faiss' add does) and kept when the list is this shard's."""
    import torch

    from pipelines.search.torch_scan import DeviceLists

    owner = torch.from_numpy(list_shard).to(device)
    pieces = []
    for p in info.parts:
        for start, block in NpyPart(out, part_rel(p)).blocks(LOAD_BLOCK_ROWS):
            x = torch.from_numpy(block).to(device)
            lists = coarse.probes(x, 1)[:, 0]
            mine = owner[lists] == shard
            ids = np.arange(p.offset + start, p.offset + start + len(block), dtype=np.int64)
            lo, _ = bounds.range_of(ids)
            keep = mine.cpu().numpy()
            pieces.append((torch.from_numpy(ids[keep]), torch.from_numpy(lo[keep]), lists[mine],
                           x[mine].to(_scan_dtype(device))))
    cat = [torch.cat([pc[i].to(device) for pc in pieces]) for i in range(4)]
    return DeviceLists.build(*cat, nlist=len(list_shard), dtype=_scan_dtype(device))


@ray.remote
def scan_task(job: TorchJob, shard: int, group: int, parts: list[dict], spec: CoarseSpec, list_shard: np.ndarray,
              info: EmbeddingsInfo) -> dict:
    """One shard resident on the device, the given query parts scanned against it; each part's top-k
    written where the routed merge reads it."""
    import torch

    from pipelines.search.torch_scan import search

    r = job.routed
    out = open_location(r.out_url)
    marker = r.done_rel(f"torch-s{shard:05d}-g", group)
    if exists(out, marker):
        return json.loads(read_bytes(out, marker)) | {"cpu_seconds": 0.0, "peak_rss_mb": 0.0, "kept": True}
    reset_peak_rss()
    t, cpu = time.perf_counter(), time.process_time()
    dev = job.device
    bounds = DocBounds.load(out, r.chunks)
    coarse, sizes = _device_tensors(spec, dev)
    lists = _load_shard(out, info, bounds, coarse, list_shard, shard, dev)
    load_s = time.perf_counter() - t
    rows = 0
    for d in parts:
        p = EmbeddingPart.from_dict(d)
        got_s, got_i = [], []
        for start, block in NpyPart(out, part_rel(p)).blocks(QUERY_BLOCK_ROWS[dev]):
            ids = np.arange(p.offset + start, p.offset + start + len(block), dtype=np.int64)
            lo, hi = bounds.range_of(ids)
            s, i = search([lists], coarse, torch.from_numpy(block).to(dev), torch.from_numpy(lo).to(dev),
                          torch.from_numpy(hi - lo + r.k).to(dev), sizes, nprobe=job.nprobe, k=r.k,
                          score_budget=job.score_budget)
            got_s.append(s.cpu().numpy())
            got_i.append(i.cpu().numpy())
        write_arrays(out, r.result_rel(p.index, shard), query_ids=np.arange(p.offset, p.offset + p.rows, dtype=np.int64),
              ids=np.concatenate(got_i), scores=np.concatenate(got_s).astype(np.float32))
        rows += p.rows
    if dev == "cuda":
        torch.cuda.synchronize()
    record = {"shard": shard, "vectors": int(len(lists.ids)), "shard_bytes": lists.nbytes, "queries": rows,
              "load_seconds": round(load_s, 3), "seconds": round(time.perf_counter() - t, 3),
              "device_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev == "cuda" else 0.0}
    write_bytes_atomic(out, marker, json.dumps(record).encode())
    return record | {"cpu_seconds": round(time.process_time() - cpu, 3), "peak_rss_mb": peak_rss_mb(), "kept": False}


@dataclass
class TorchRun:
    """What the torch search did: the parts' manifest entries and the figures the summary reports."""

    entries: list[dict]
    device: str
    dtype: str
    shards: int
    tasks: int
    nprobe: int
    shard_bytes_max: int
    scan_seconds: float  # summed over tasks (device time, load included)
    cpu_seconds: float
    peak_rss_mb: dict


def device_budget(device: str, gpus: float, shard_memory: str) -> int:
    """Bytes of resident vectors per task: a share of one GPU's memory, or ``--shard-memory`` on CPU."""
    if device != "cuda":
        return memory_bytes(shard_memory, "--shard-memory")

    @ray.remote(num_gpus=gpus, num_cpus=0)
    def total_memory() -> int:
        import torch

        return int(torch.cuda.mem_get_info()[1])

    return int(ray.get(total_memory.remote()) * DEVICE_MEMORY_SHARE)


def run_torch(out: Location, info: EmbeddingsInfo, *, folder: str, spec: CoarseSpec, nprobe: int, k: int,
              metric: str, device: str, gpus: float, shard_memory: str, concurrency: int,
              score_budget: int = 0) -> TorchRun:
    """The neighbors of every part by the torch list-major scan; returns the parts' entries (part order).

    Args:
        out, info: the build and its embeddings. folder: the neighbors version's folder.
        spec: the coarse quantizer that routes the queries (:func:`load_coarse`). nprobe: lists per query.
        k, metric: neighbors per chunk, distance. device: "cuda" or "cpu". gpus: GPUs per task (CUDA).
        shard_memory: the CPU device's shard budget. concurrency: tasks at once on CPU.
        score_budget: padded scores per batched product (0: the module default).
    """
    from pipelines.search.torch_scan import SCORE_BUDGET, device_bytes_per_vector, plan_shards

    dtype = _scan_dtype(device)
    budget = device_budget(device, gpus, shard_memory)
    list_shard = plan_shards(spec.list_sizes, device_bytes_per_vector(info.dim, dtype), budget)
    shards = int(list_shard.max()) + 1 if (list_shard >= 0).any() else 1
    workers = max(1, int(cluster_gpus() // gpus)) if device == "cuda" else max(1, concurrency)
    parts = list(info.parts)
    groups = min(len(parts), workers) if shards == 1 else 1
    units = [(s, g) for s in range(shards) for g in range(groups)]
    job = TorchJob(RoutedJob(out.url, folder, nprobe, 0, k, metric, shards, info.n), device, nprobe,
                   score_budget or SCORE_BUDGET)
    print(f"neighbors: torch scan on {device} ({str(dtype).removeprefix('torch.')}), {len(spec.list_sizes)} lists in "
          f"{shards} shard(s) of at most {budget / 2**20:,.1f} MiB, nprobe {nprobe}, {len(units)} task(s)", flush=True)
    refs = [ray.put(spec), ray.put(list_shard), ray.put(info)]
    task = scan_task.options(num_gpus=gpus if device == "cuda" else 0, num_cpus=0 if device == "cuda" else 1)
    cpu, peaks = 0.0, {}
    scans: list = [None] * len(units)
    for i, rec in bounded_as_completed(
            lambda u: task.remote(job, u[0], u[1], [p.to_dict() for p in parts[u[1]::groups]], *refs),
            units, workers):
        scans[i] = rec
    cpu += sum(s["cpu_seconds"] for s in scans)
    peaks["neighbors_torch_task"] = max(s["peak_rss_mb"] for s in scans)
    merged: list = [None] * len(parts)
    for i, e in bounded_as_completed(lambda p: merge_part_task.remote(job.routed, p.to_dict()), parts,
                                     max(1, concurrency)):
        merged[i] = e
    cpu += sum(e.pop("cpu_seconds", 0.0) for e in merged)
    peaks["neighbors_merge_task"] = max(e.pop("peak_rss_mb", 0.0) for e in merged)
    return TorchRun(merged, device, str(dtype).removeprefix("torch."), shards, len(units), nprobe,
                    max(s.get("shard_bytes", 0) for s in scans), sum(s.get("seconds", 0.0) for s in scans), cpu, peaks)
