"""kNN memory speed: models/knn_memory.py (best CPU path) vs the seed's approach, measured in one run.

Command (from the repository root):

    .venv/bin/python benchmarks/knn_memory_speed.py > benchmarks/results/knn_memory_speed.json

Setting (the readme preset's memory): 4 batch rows, 65,536 entries per row, dim 64 (the seed's dim_head),
4,096 queries per row (8 heads x 512 tokens), top 32, adds of 512 entries per row (one segment).

The seed approach, re-implemented minimally: one ``faiss.IndexHNSWFlat(dim, 15, METRIC_INNER_PRODUCT)``
per row (the seed's KNN class), ``add`` 512 keys per row, ``search`` per row, then fetch the (key, value)
pairs of the hits from a float32 array (the seed uses a numpy memmap; an in-memory array is kinder to it).
Ours: ``KNNMemory`` with its default CPU path (faiss IVF-flat per row for large rows, ring buffer in torch,
FIFO eviction on every add since the memory is full).

Data: cosine-normalised keys and queries drawn from a mixture of Gaussian clusters (attention keys are
clustered; on uniform random vectors in 64 dimensions no index finds neighbours cheaply, the seed's HNSW
included). ``--clusters``/``--spread`` change it. Recall@32 is measured against exact float32 search.
Ratios (seed time / our time) are the figures to read: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.knn_memory import KNNMemory, KNNMemoryConfig  # noqa: E402


class SeedKNNMemory:
    """The seed's per-row memory: an HNSW index per row plus a (rows, max, 2, dim) array of pairs."""

    def __init__(self, rows: int, dim: int, max_memories: int):
        self.indexes = [faiss.IndexHNSWFlat(dim, 15, faiss.METRIC_INNER_PRODUCT) for _ in range(rows)]
        self.db = np.zeros((rows, max_memories, 2, dim), dtype=np.float32)
        self.offsets = np.zeros(rows, dtype=np.int64)
        self.max_memories = max_memories

    def add(self, kv: np.ndarray) -> None:  # kv (rows, n, 2, dim)
        n = kv.shape[1]
        for r, index in enumerate(self.indexes):
            index.add(np.ascontiguousarray(kv[r, :, 0]))
            pos = (self.offsets[r] + np.arange(n)) % self.max_memories
            self.db[r, pos] = kv[r]
        self.offsets += n

    def search(self, q: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        kvs, masks, all_ids = [], [], []
        for r, index in enumerate(self.indexes):
            _, ids = index.search(np.ascontiguousarray(q[r]), k)
            mask = ids != -1
            kv = self.db[r, np.where(mask, ids, 0) % self.max_memories]
            kvs.append(torch.from_numpy(kv))
            masks.append(torch.from_numpy(mask))
            all_ids.append(ids)
        kv = torch.stack(kvs).masked_fill(~torch.stack(masks)[..., None, None], 0.0)
        return kv, torch.stack(masks), np.stack(all_ids)


def make_data(rng: np.random.Generator, rows: int, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
    out = np.empty((rows, n, dim), dtype=np.float32)
    for r in range(rows):
        centers = rng.standard_normal((clusters, dim)).astype(np.float32)
        x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
        out[r] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for f, t in zip(found.reshape(-1, found.shape[-1]), truth.reshape(-1, truth.shape[-1])):
        hits += len(set(f.tolist()) & set(t.tolist()))
    return hits / truth.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--add", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nprobe", type=int, default=None, help="override KNNMemoryConfig.nprobe")
    args = ap.parse_args()
    R, C, d, Qn, k, A = args.rows, args.capacity, args.dim, args.queries, args.topk, args.add
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    # the stream: enough keys to fill the memory, then the timed adds; queries from the same mixture
    extra = A * (args.repeats + 2)
    data = make_data(rng, R, C + extra + Qn, d, args.clusters, args.spread)
    keys_all, queries = data[:, : C + extra], data[:, C + extra :]
    vals_all = rng.standard_normal((R, C + extra, d)).astype(np.float32)

    cfg_kw = {} if args.nprobe is None else {"nprobe": args.nprobe}
    cfg = KNNMemoryConfig(dim=d, capacity=C, **cfg_kw)
    ours = KNNMemory(R, cfg)
    seed = SeedKNNMemory(R, d, C)

    t0 = time.perf_counter()
    for s in range(0, C, A):
        ours.add(torch.from_numpy(keys_all[:, s : s + A]), torch.from_numpy(vals_all[:, s : s + A]))
    ours_fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, C, A):
        seed.add(np.stack([keys_all[:, s : s + A], vals_all[:, s : s + A]], axis=2))
    seed_fill_s = time.perf_counter() - t0

    q_t = torch.from_numpy(queries)
    times: dict[str, list[float]] = {"ours_search": [], "seed_search": [], "ours_add": [], "seed_add": []}
    pos = C
    rec_ours, rec_seed = [], []
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        res = ours.search(q_t, k)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, seed_ids = seed.search(queries, k)
        t_seed = time.perf_counter() - t0
        # ground truth: exact float32 search over each row's live entries (ids = stream positions)
        if rep in (0, args.repeats):
            lo = pos - C
            truth = np.empty((R, Qn, k), dtype=np.int64)
            for r in range(R):
                flat = faiss.IndexFlatIP(d)
                flat.add(np.ascontiguousarray(keys_all[r, lo:pos]))
                truth[r] = flat.search(np.ascontiguousarray(queries[r]), k)[1] + lo
            rec_ours.append(recall(res.ids.numpy(), truth))
            # the seed's HNSW ids are stream positions as well (it never evicts)
            rec_seed.append(recall(seed_ids, truth))
        if rep > 0:  # first round is warm-up
            times["ours_search"].append(t_ours * 1000)
            times["seed_search"].append(t_seed * 1000)
        if rep == args.repeats:
            break
        kk, vv = keys_all[:, pos : pos + A], vals_all[:, pos : pos + A]
        t0 = time.perf_counter()
        ours.add(torch.from_numpy(kk), torch.from_numpy(vv))
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        seed.add(np.stack([kk, vv], axis=2))
        t_seed = time.perf_counter() - t0
        pos += A
        if rep > 0:
            times["ours_add"].append(t_ours * 1000)
            times["seed_add"].append(t_seed * 1000)

    # for reference: our exact path on the same full memory (what "auto" avoids on CPU at this size)
    exact_ms = {}
    for dt in ("bfloat16",):
        ex = KNNMemory(R, KNNMemoryConfig(dim=d, capacity=C, backend="exact", exact_dtype=dt))
        ex.keys.copy_(ours.keys)
        ex.values.copy_(ours.values)
        ex.counts = ours.counts.copy()
        t0 = time.perf_counter()
        ex.search(q_t, k)
        exact_ms[dt] = round((time.perf_counter() - t0) * 1000, 1)

    med = {key: statistics.median(v) for key, v in times.items()}
    step_ours = med["ours_search"] + med["ours_add"]
    step_seed = med["seed_search"] + med["seed_add"]
    print(
        json.dumps(
            {
                "benchmark": "knn_memory_speed",
                "setting": {"rows": R, "entries_per_row": C, "dim": d, "queries_per_row": Qn, "topk": k,
                            "add_per_row": A, "data": f"normalised mixture of {args.clusters} Gaussian clusters, "
                            f"spread {args.spread}", "repeats": args.repeats},
                "ours": {"path": "faiss IndexIVFFlat per row (auto backend, CPU)", "nlist": cfg.full_nlist,
                         "nprobe": cfg.nprobe, "search_ms": round(med["ours_search"], 1),
                         "add_512_per_row_ms": round(med["ours_add"], 2), "recall_at_k": [round(x, 4) for x in rec_ours],
                         "fill_64k_s": round(ours_fill_s, 2)},
                "seed": {"path": "faiss IndexHNSWFlat(M=15) per row + array fetch", "search_ms": round(med["seed_search"], 1),
                         "add_512_per_row_ms": round(med["seed_add"], 2), "recall_at_k": [round(x, 4) for x in rec_seed],
                         "fill_64k_s": round(seed_fill_s, 2)},
                "speedup_search": round(med["seed_search"] / med["ours_search"], 2),
                "speedup_add": round(med["seed_add"] / med["ours_add"], 2),
                "speedup_step_search_plus_add": round(step_seed / step_ours, 2),
                "ours_exact_torch_search_ms_for_reference": exact_ms,
                "all_ms": {key: [round(x, 1) for x in v] for key, v in times.items()},
                "notes": "search = top-k ids plus fetching the (key, value) pairs for all rows; recall vs exact "
                         "float32 search over the live entries, first and last round",
                "torch": torch.__version__, "faiss": faiss.__version__, "threads": torch.get_num_threads(),
                "faiss_threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
