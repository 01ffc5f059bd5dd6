"""All-chunks neighbors on one device with the torch path: k-means time, search queries/s, recall@2 against
exact search on a sample, and the fraction of the bf16 matrix peak the scan reaches (issue 17).

    .venv/bin/python benchmarks/gpu_neighbors_speed.py --small            # toy size, any device (CPU here)
    python benchmarks/gpu_neighbors_speed.py --device cuda                # 10^7 and 10^8 on a GPU

Synthetic clustered data generated on the device block by block from per-block seeds (the hard kind
tests/helpers_embeddings.py writes for benchmarks/index_scale.py: topic centers, a per-document offset,
low-rank per-document noise; float16 like the stored embeddings), documents of ``DOC_CHUNKS`` chunks,
k=2, each chunk's own document excluded. The lists are filled in list order by generating the data twice
(assign, then write each vector at its list's place), so the device holds the vectors once. Above
``TIMED_QUERIES`` chunks the scan is timed on that many queries (uniform blocks) and queries/s is scaled.
Imports only torch, numpy, models/ and pipelines.search.torch_* (no Ray, no faiss: the GPU machine has neither).
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_timing import device_main, sync  # noqa: E402
from models.topk_matmul import matmul_topk  # noqa: E402
from pipelines.search.torch_kmeans import kmeans  # noqa: E402
from pipelines.search.torch_scan import Coarse, DeviceLists, search  # noqa: E402

BF16_PEAK_TFLOPS = 775.0  # H200 dense bf16 (and fp16) tensor-core peak
DOC_CHUNKS = 64
MAX_TOPICS = 4096  # topics: one per ~100 documents (so a chunk has same-topic chunks of other documents)
NOISE_RANK = 32
GEN_BLOCK = 1 << 20
QUERY_BLOCK = 1 << 16
TIMED_QUERIES = 1 << 21
RECALL_SAMPLE = 1000
TRAIN_PER_LIST = 50
K = 2


class Synthetic:
    """Chunk i's vector is a pure function of (seed, i's block): blocks can be generated again in any order."""

    def __init__(self, n: int, dim: int, dev: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.n, self.dim, self.dev, self.seed = n, dim, dev, seed
        self.n_topics = int(min(MAX_TOPICS, max(16, n // (DOC_CHUNKS * 100))))
        self.topics = (torch.randn(self.n_topics, dim, generator=g) / math.sqrt(dim)).to(dev)
        self.basis = (torch.randn(NOISE_RANK, dim, generator=g) / math.sqrt(NOISE_RANK)).to(dev)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (start a multiple of GEN_BLOCK and of DOC_CHUNKS) as float16."""
        g = torch.Generator(device=self.dev).manual_seed(self.seed * 1_000_003 + start // GEN_BLOCK + 1)
        rows, docs = stop - start, (stop - start + DOC_CHUNKS - 1) // DOC_CHUNKS
        topic = torch.randint(0, self.n_topics, (docs,), generator=g, device=self.dev)
        center = self.topics[topic] + 0.5 * torch.randn(docs, self.dim, generator=g, device=self.dev) / math.sqrt(self.dim)
        scale = 0.2 + 0.8 * torch.rand(docs, 1, generator=g, device=self.dev)
        x = center.repeat_interleave(DOC_CHUNKS, 0)[:rows]
        noise = torch.randn(rows, NOISE_RANK, generator=g, device=self.dev) @ self.basis / math.sqrt(NOISE_RANK)
        return (x + scale.repeat_interleave(DOC_CHUNKS, 0)[:rows] * noise).half()

    def blocks(self):
        for start in range(0, self.n, GEN_BLOCK):
            yield start, self.block(start, min(self.n, start + GEN_BLOCK))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows at sorted ``ids`` (regenerating the blocks they fall in)."""
        out = torch.empty(len(ids), self.dim, dtype=torch.float16, device=self.dev)
        blk = ids // GEN_BLOCK
        for b in torch.unique(blk).tolist():
            sel = blk == b
            start = b * GEN_BLOCK
            out[sel] = self.block(start, min(self.n, start + GEN_BLOCK))[ids[sel] - start]
        return out


def nlist_for(n: int) -> int:
    """The project's rule (pipelines/search/faiss_index.ivf_nlist): a power of two >= 4 sqrt(N), <= N / 39."""
    want = 1 << max(4, math.ceil(math.log2(4 * math.sqrt(n))))
    return int(min(want, 1 << max(4, int(math.log2(max(n // 39, 16))))))


def build_lists(data: Synthetic, coarse: Coarse, dtype: torch.dtype) -> DeviceLists:
    """Every vector in list order on the device, held once: assign all, then regenerate and place."""
    dev = data.dev
    lists = torch.empty(data.n, dtype=torch.long, device=dev)
    for start, x in data.blocks():
        lists[start:start + len(x)] = coarse.probes(x, 1)[:, 0]
    order = torch.argsort(lists, stable=True)
    where = torch.empty_like(order)
    where[order] = torch.arange(data.n, device=dev)
    del order
    vecs = torch.empty(data.n, data.dim, dtype=dtype, device=dev)
    norms = torch.empty(data.n, dtype=torch.float32, device=dev)
    for start, x in data.blocks():
        at = where[start:start + len(x)]
        vecs[at] = x.to(dtype)
        norms[at] = (x.float() ** 2).sum(1)
    ids = torch.empty(data.n, dtype=torch.long, device=dev)
    ids[where] = torch.arange(data.n, device=dev)
    del where
    sizes_all = torch.bincount(lists, minlength=coarse.nlist)
    del lists
    uniq = torch.nonzero(sizes_all).flatten()
    sizes = sizes_all[uniq]
    slot_of = torch.full((coarse.nlist,), -1, dtype=torch.long, device=dev)
    slot_of[uniq] = torch.arange(len(uniq), device=dev)
    return DeviceLists(vecs, ids, ids // DOC_CHUNKS, norms, uniq, torch.cumsum(sizes, 0) - sizes, sizes, slot_of)


def exact_top2(data: Synthetic, queries: torch.Tensor, qids: torch.Tensor) -> torch.Tensor:
    """Exact k nearest (L2, own document excluded) of a query sample over every vector, block by block."""
    best_s = torch.full((len(qids), K), float("-inf"), device=data.dev)
    best_i = torch.full((len(qids), K), -1, dtype=torch.long, device=data.dev)
    qf = queries.float()
    for start, x in data.blocks():
        xf = x.float()
        ids = torch.arange(start, start + len(x), device=data.dev)
        got = matmul_topk(qf, xf, K, key_bias=-0.5 * (xf * xf).sum(1), query_groups=qids // DOC_CHUNKS,
                          key_groups=ids // DOC_CHUNKS)
        s = torch.cat([best_s, got.scores], 1)
        i = torch.cat([best_i, torch.where(got.ids >= 0, got.ids + start, -1)], 1)
        best_s, at = s.topk(K, dim=1)
        best_i = i.gather(1, at)
    return best_i


def run_size(n: int, dim: int, dev: torch.device, nprobe: int, timed: int, query_block: int) -> dict:
    data = Synthetic(n, dim, dev)
    nlist = nlist_for(n)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    train_ids = torch.sort(torch.randperm(n, generator=gen)[:min(n, nlist * TRAIN_PER_LIST)]).values.to(dev)
    sample = data.rows(train_ids).float()
    sync(dev)
    km = kmeans(sample, nlist, iterations=10, seed=0, dtype=torch.bfloat16 if dev.type == "cuda" else None)
    del sample
    coarse = Coarse(km.centroids, "l2")
    t = time.perf_counter()
    lists = build_lists(data, coarse, dtype)
    sync(dev)
    build_s = time.perf_counter() - t
    sizes_all = torch.zeros(nlist, dtype=torch.long, device=dev)
    sizes_all[lists.lists] = lists.sizes
    # timed scan: uniform query blocks; flops counted from the vectors in each query's probed lists
    step = max(1, n // max(timed, 1))
    starts = list(range(0, n, max(query_block, step * query_block)))[: max(1, timed // query_block)]
    searched, scan_s, pairs = 0, 0.0, 0
    for start in starts:
        qids = torch.arange(start, min(n, start + query_block), device=dev)
        q = data.rows(qids)
        need = torch.full((len(qids),), DOC_CHUNKS + K, device=dev)
        sync(dev)
        t = time.perf_counter()
        search([lists], coarse, q.float(), qids // DOC_CHUNKS, need, sizes_all, nprobe=nprobe, k=K)
        sync(dev)
        scan_s += time.perf_counter() - t
        searched += len(qids)
        probes = coarse.probes(q.float(), nprobe)
        pairs += int(sizes_all[probes].sum())
    # recall@2 against exact search on a sample
    sample_ids = torch.sort(torch.randperm(n, generator=gen)[:RECALL_SAMPLE]).values.to(dev)
    qs = data.rows(sample_ids)
    _, found = search([lists], coarse, qs.float(), sample_ids // DOC_CHUNKS,
                      torch.full((len(sample_ids),), DOC_CHUNKS + K, device=dev), sizes_all, nprobe=nprobe, k=K)
    want = exact_top2(data, qs, sample_ids)
    hits = (found[:, :, None] == want[:, None, :]).any(2).sum().item()
    recall = hits / max(1, int((want >= 0).sum()))
    qps = searched / max(scan_s, 1e-9)
    flops = 2.0 * dim * pairs
    return {"n": n, "dim": dim, "nlist": nlist, "nprobe": nprobe, "device": str(dev), "scan_dtype": str(dtype),
            "kmeans_seconds": round(km.seconds, 3), "kmeans_points": len(train_ids),
            "build_lists_seconds": round(build_s, 3), "queries_timed": searched,
            "queries_per_second": round(qps, 1), "all_chunks_seconds_estimate": round(n / qps, 1),
            "recall_at_2": round(recall, 4), "scan_tflops": round(flops / max(scan_s, 1e-9) / 1e12, 3),
            "fraction_of_bf16_peak": round(flops / max(scan_s, 1e-9) / (BF16_PEAK_TFLOPS * 1e12), 5)}


def run(device: str, small: bool) -> dict:
    """Args: device: "cuda" or "cpu". small: toy sizes (seconds on a CPU). Returns the figures per size."""
    dev = torch.device(device)
    if small:
        cases = [(20_000, 384, 8), (20_000, 768, 8)]
        timed = 8192
    else:
        cases = [(10**7, 384, 16), (10**7, 768, 16), (10**8, 384, 16)]  # 10^8 x 768 fp16 (154 GB) needs 2 shards
        timed = TIMED_QUERIES
    query_block = 4096 if small else QUERY_BLOCK
    runs = [run_size(n, dim, dev, nprobe, timed, query_block) for n, dim, nprobe in cases]
    return {"device": device, "small": small, "k": K, "doc_chunks": DOC_CHUNKS,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "", "runs": runs}


def main() -> None:
    device_main(run, __doc__.splitlines()[0], "benchmarks/results/gpu_neighbors_speed.json")


if __name__ == "__main__":
    main()
