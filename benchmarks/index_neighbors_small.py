"""Index + neighbors at the seed's size (18,370 chunks, dim 384): ours vs the seed's path, same run.

    .venv/bin/python benchmarks/index_neighbors_small.py                 # synthetic clustered float16
    .venv/bin/python benchmarks/index_neighbors_small.py --build ./artifacts/demo   # a real embeddings folder
    .venv/bin/python benchmarks/index_neighbors_small.py --plays 5    # the README row: builds its own real input

``--plays N`` makes the real input itself (tokenize + embed, reused when complete, under ``--work``): the first
N play pairs of benchmarks/retro_bench_common.py's PAIRS (two editions each), chunk_size 16, seq_len 128; the
same build the training benchmarks use. Ray start-up is not counted in any figure (``ray_init_seconds`` is
reported apart); ``cold`` includes starting the Ray workers of the first run.

The seed's path, re-implemented minimally (RETRO-pytorch retrieval.py): autofaiss ``build_index``
with its arguments (metric l2, max_index_memory_usage 100m, current_memory_available 1G,
make_direct_map, not memory-mappable; autofaiss picks the key and tunes search parameters), then
``index.search`` in batches of 500 with k + extra + 1, dropping column 0 as "self" and same-document
hits. Ours: ``run_index`` + ``run_neighbors`` on a local Ray instance (started before timing;
the first run pays for starting the Ray workers, reported as ``cold``; a second build into a fresh
folder as ``warm``). Recall@k of both against exact search (own document excluded) on a sample.
Prints JSON and writes benchmarks/results/index_neighbors_small.json (synthetic) or
index_neighbors_small_real.json (with --build).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.artifacts.embeddings import DocBounds, gather_rows, load_embeddings_info, uniform_sample  # noqa: E402
from pipelines.artifacts.storage import open_location  # noqa: E402
from pipelines.search.knn import TIE_CANDIDATES, empty_topk, merge_topk, recall_at_k  # noqa: E402


def exact_sample(out, info, bounds, sample_ids, k):
    """Exact filtered ground truth for the sample, computed here (not by the code under test)."""
    from pipelines.search.tuning import exact_part

    q = gather_rows(out, info, sample_ids)
    lo, hi = bounds.range_of(sample_ids)
    m = k + TIE_CANDIDATES
    filt = empty_topk(len(sample_ids), m)
    for part in info.parts:
        _, f = exact_part(out, part, q, sample_ids, lo, hi, m, "l2")
        filt = merge_topk(filt, f, m)
    return filt


def seed_path(out, info, bounds, k: int, extra: int, work: str) -> dict:
    """autofaiss build_index with the seed's arguments, then batched search as the seed does it."""
    import logging

    import faiss
    from autofaiss import build_index

    x = np.concatenate([np.load(out.path(f"embeddings/{p.path}")) for p in info.parts]).astype(np.float32)
    t = time.perf_counter()
    build_index(embeddings=out.path("embeddings"), index_path=f"{work}/knn.index",
                index_infos_path=f"{work}/index_infos.json", metric_type="l2", max_index_memory_usage="100m",
                current_memory_available="1G", make_direct_map=True, should_be_memory_mappable=False,
                use_gpu=False, verbose=logging.WARNING)
    index = faiss.read_index(f"{work}/knn.index", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    index_s = time.perf_counter() - t
    infos = json.load(open(f"{work}/index_infos.json"))
    lo, hi = bounds.range_of(np.arange(info.n))
    doc = np.searchsorted(bounds.first, np.arange(info.n), side="right") - 1
    knn = np.empty((info.n, k), np.int64)
    t = time.perf_counter()
    for s in range(0, info.n, 500):
        sl = slice(s, min(s + 500, info.n))
        d, i = index.search(x[sl], k + extra + 1)
        d, i = d[:, 1:], i[:, 1:]
        same = doc[sl][:, None] == doc[np.maximum(i, 0)]
        i = np.where(same, -1, i)
        d = np.where(same, 1e3, d)
        i = np.take_along_axis(i, np.argsort(d, axis=1), axis=1)
        knn[sl] = i[:, :k]
    search_s = time.perf_counter() - t
    return {"index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
            "index_seconds": round(index_s, 2), "neighbors_seconds": round(search_s, 2),
            "total_seconds": round(index_s + search_s, 2), "knn": knn}


def ours(out, k: int, extra: int) -> dict:
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors

    t = time.perf_counter()
    s = run_index(out=out, k=k, extra_neighbors=extra)
    index_s = time.perf_counter() - t
    t = time.perf_counter()
    n = run_neighbors(out=out, index_version=s.version, k=k, extra_neighbors=extra)
    nb_s = time.perf_counter() - t
    return {"index_key": s.index_key, "index_param": s.index_param, "index_seconds": round(index_s, 2),
            "neighbors_seconds": round(nb_s, 2), "total_seconds": round(index_s + nb_s, 2),
            "index_recall_reported": round(s.neighbor_recall_at_k, 4), "rows_with_pads": n.rows_with_pads,
            "summary": s.lines() + n.lines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="", help="a build folder with embeddings/ and docs/ (default: synthetic)")
    ap.add_argument("--plays", type=int, default=0,
                    help="make the real input from this many play pairs (tokenize + embed) instead of --build")
    ap.add_argument("--work", default="/tmp/retroforge-bench", help="where --plays keeps its build (reused)")
    ap.add_argument("--chunks", type=int, default=18370)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--extra", type=int, default=10)
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--skip-seed", action="store_true")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    from pipelines.runtime.ray_session import init_ray

    tmp = tempfile.mkdtemp(prefix="bench-index-small-")
    if args.plays:
        from benchmarks.retro_bench_common import PAIRS, build

        init_ray(num_cpus=args.num_cpus)
        files = [f for pair in PAIRS[:args.plays] for f in pair]
        args.build = str(build(Path(args.work), files, chunk_size=16, seq_len=128, stages="tokenize,embed")[0])
    try:
        if args.build:
            src = open_location(args.build)
            data_desc = f"real embeddings from {args.build}"
        else:
            from tests.helpers_embeddings import write_synthetic_build

            write_synthetic_build(f"{tmp}/src", n_chunks=args.chunks, dim=args.dim, parts=5, mean_doc_chunks=300,
                                  tokens=False)
            src = open_location(f"{tmp}/src")
            data_desc = "synthetic clustered float16 (64 topics, ~60 documents)"
        info = load_embeddings_info(src)
        bounds = DocBounds(DocBounds.load(src, info.n).first, info.n)
        sample = uniform_sample(info.n, args.sample, "bench")
        gt = exact_sample(src, info, bounds, sample, args.k)

        t = time.perf_counter()
        init_ray(num_cpus=args.num_cpus)
        ray_start = time.perf_counter() - t
        result = {"data": data_desc, "chunks": info.n, "dim": info.dim, "k": args.k, "extra_neighbors": args.extra,
                  "recall_sample": len(sample), "ray_init_seconds": round(ray_start, 2), "cpus": os.cpu_count()}
        for label in ("cold", "warm"):
            dst = f"{tmp}/{label}"
            shutil.copytree(src.path("embeddings"), f"{dst}/embeddings")
            shutil.copytree(src.path("docs"), f"{dst}/docs")
            r = ours(open_location(dst), args.k, args.extra)
            from pipelines.artifacts.versions import NeighborsReader

            found, _ = NeighborsReader(dst).lookup(sample)
            r["recall_at_k"] = round(recall_at_k(found, *gt, args.k), 4)
            result[f"ours_{label}"] = r
        if not args.skip_seed:
            os.makedirs(f"{tmp}/seed", exist_ok=True)
            s = seed_path(src, info, bounds, args.k, args.extra, f"{tmp}/seed")
            s["recall_at_k"] = round(recall_at_k(s.pop("knn")[sample], *gt, args.k), 4)
            result["seed"] = s
            result["speedup_total_cold"] = round(s["total_seconds"] / result["ours_cold"]["total_seconds"], 1)
            result["speedup_total_warm"] = round(s["total_seconds"] / result["ours_warm"]["total_seconds"], 1)
        print(json.dumps(result, indent=2))
        res = ROOT / "benchmarks" / "results"
        res.mkdir(parents=True, exist_ok=True)
        name = "index_neighbors_small_real.json" if args.build else "index_neighbors_small.json"
        result["command"] = "python benchmarks/index_neighbors_small.py " + " ".join(sys.argv[1:])
        (res / name).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
