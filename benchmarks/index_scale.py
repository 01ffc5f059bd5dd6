"""Index and neighbors at growing sizes: build time, neighbors time, recall, each worker's peak memory.

    .venv/bin/python benchmarks/index_scale.py --sizes 100000,1000000      # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/index_scale.py --report-only               # table + plot from the JSON

Synthetic clustered embeddings (dim 384, float16, parts of 50,000 rows, documents of ~300 chunks;
tests/helpers_embeddings.py), the distributed build (uniform-sample training in a Ray task, one add
task per part, on-disk IVF merge) with the automatic key, then the neighbors stage (k=2). Each size
is one entry of benchmarks/results/index_scale.json (re-running a size replaces its entry); the
report writes the table in benchmarks/README_index_scale.md and benchmarks/results/index_scale.png,
and an extrapolation to 10^9 chunks from the measured worker-seconds per vector.
Worker peak memory is ru_maxrss read inside the Ray workers (pipelines/procstats.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "index_scale.json"


def run_size(n: int, *, dim: int, rows_per_part: int, index_key: str, max_index_memory: str, work: str) -> dict:
    from pipelines.index import run_index
    from pipelines.neighbors import run_neighbors
    from pipelines.procstats import peak_rss_mb
    from pipelines.storage import open_location
    from tests.helpers_embeddings import write_synthetic_build

    folder = os.path.join(work, f"n{n}")
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_build(folder, n_chunks=n, dim=dim, parts=max(1, math.ceil(n / rows_per_part)),
                          mean_doc_chunks=300, tokens=False, seed=n)
    gen_s = time.perf_counter() - t
    out = open_location(folder)
    t = time.perf_counter()
    s = run_index(out=out, index_key=index_key, max_index_memory=max_index_memory, distributed=True, concurrency=2)
    index_s = time.perf_counter() - t
    t = time.perf_counter()
    nb = run_neighbors(out=out, index_version=s.version, concurrency=2)
    nb_s = time.perf_counter() - t
    for line in s.lines() + nb.lines():
        print(line, flush=True)
    emb_bytes = sum(os.path.getsize(os.path.join(folder, "embeddings", f)) for f in os.listdir(os.path.join(folder, "embeddings"))
                    if f.endswith(".npy"))
    result = {
        "n": n, "dim": dim, "parts": math.ceil(n / rows_per_part), "index_key": s.index_key,
        "index_param": s.index_param, "layout": s.layout, "generate_seconds": round(gen_s, 1),
        "index_seconds": round(index_s, 1), "index_build_seconds": round(s.build_seconds, 1),
        "index_tune_seconds": round(s.tune_seconds, 1), "neighbors_seconds": round(nb_s, 1),
        "neighbors_worker_seconds": round(nb.worker_seconds, 1), "neighbors_actors": nb.actors,
        "neighbors_cpu_seconds": round(nb.worker_seconds * nb.cpus_per_actor, 1),
        "index_build_cpu_seconds": round(s.build_seconds * 2, 1),  # the build keeps both CPUs busy
        "index_query_ms": round(s.query_ms, 4), "recall_at_2_index": round(s.recall_at_k, 4),
        "recall_at_2_neighbors": nb.recall_at_k, "rows_with_pads": nb.rows_with_pads,
        "index_bytes": s.size_bytes, "embeddings_bytes": emb_bytes,
        "peak_rss_mb": {**s.peak_rss_mb, "neighbors_actor": nb.actor_peak_rss_mb, "benchmark_driver": peak_rss_mb()},
        "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def load_results() -> list[dict]:
    return json.loads(JSON_PATH.read_text())["runs"] if JSON_PATH.exists() else []


def save_results(runs: list[dict], extra: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps({"runs": sorted(runs, key=lambda r: r["n"]), **extra}, indent=2) + "\n")


def extrapolate(runs: list[dict], target: int = 10**9) -> dict:
    """Worker-seconds per vector at the largest size, grown with a log-log fit across sizes."""
    runs = sorted(runs, key=lambda r: r["n"])
    big = runs[-1]

    def per_vector(r: dict, key: str) -> float:
        return r[key] / r["n"]

    est = {}
    for key in ("index_build_cpu_seconds", "neighbors_cpu_seconds"):
        pts = [(math.log(r["n"]), math.log(max(per_vector(r, key), 1e-12))) for r in runs]
        slope = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]) if len(pts) > 1 else 0.0
        cpu_s = per_vector(big, key) * (target / big["n"]) ** max(slope, 0.0) * target
        est[key] = {"cpu_seconds_per_vector_at_largest": per_vector(big, key), "growth_exponent": round(slope, 3),
                    "cpu_hours_at_target": round(cpu_s / 3600, 1)}
    return {"target_chunks": target, "from_n": big["n"], **est}


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(load_results(), key=lambda r: r["n"])
    if not runs:
        print("no runs recorded yet")
        return
    ex = extrapolate(runs)
    save_results(runs, {"extrapolation": ex})
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ns = [r["n"] for r in runs]
    ax[0].loglog(ns, [r["index_seconds"] for r in runs], "o-", label="index (build + tune)")
    ax[0].loglog(ns, [r["neighbors_seconds"] for r in runs], "s-", label="neighbors (all chunks)")
    ax[0].set_xlabel("chunks")
    ax[0].set_ylabel("seconds (2 cores, shared)")
    ax[0].legend()
    ax[0].grid(True, which="both", alpha=0.3)
    roles = sorted({k for r in runs for k in r["peak_rss_mb"] if k != "benchmark_driver"})
    for role in roles:
        ax[1].semilogx(ns, [r["peak_rss_mb"].get(role, float("nan")) for r in runs], "o-", label=role)
    ax[1].set_xlabel("chunks")
    ax[1].set_ylabel("peak RSS per worker (MiB)")
    ax[1].legend(fontsize=8)
    ax[1].grid(True, which="both", alpha=0.3)
    fig.suptitle("retroforge index + neighbors scaling (synthetic, dim 384, float16)")
    fig.tight_layout()
    fig.savefig(RESULTS / "index_scale.png", dpi=110)
    print(json.dumps({"runs": runs, "extrapolation": ex}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rows-per-part", type=int, default=50_000)
    ap.add_argument("--index-key", default="")
    ap.add_argument("--max-index-memory", default="4G")
    ap.add_argument("--work", default="")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        from pipelines.ray_session import init_ray

        work = args.work or tempfile.mkdtemp(prefix="bench-index-scale-")
        init_ray(num_cpus=2)
        try:
            for n in [int(float(x)) for x in args.sizes.split(",")]:
                r = run_size(n, dim=args.dim, rows_per_part=args.rows_per_part, index_key=args.index_key,
                             max_index_memory=args.max_index_memory, work=work)
                print(json.dumps(r), flush=True)
                runs = [x for x in load_results() if x["n"] != n] + [r]
                save_results(runs, {})
        finally:
            import ray

            ray.shutdown()
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    report()


if __name__ == "__main__":
    main()
