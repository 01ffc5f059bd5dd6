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
BEFORE_PATH = RESULTS / "index_scale_before.json"
REAL_PATH = RESULTS / "real_corpus_neighbors.json"


def run_size(n: int, *, dim: int, rows_per_part: int, index_key: str, max_index_memory: str, work: str,
             neighbor_rows: int, shard_memory: str, max_query_ms: float) -> dict:
    from pipelines.artifacts.embeddings import load_embeddings_info
    from pipelines.artifacts.storage import open_location
    from pipelines.runtime.procstats import peak_rss_mb
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors
    from tests.helpers_embeddings import write_synthetic_build

    folder = os.path.join(work, f"n{n}")
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_build(folder, n_chunks=n, dim=dim, parts=max(1, math.ceil(n / rows_per_part)),
                          mean_doc_chunks=300, tokens=False, seed=n)
    gen_s = time.perf_counter() - t
    out = open_location(folder)
    t = time.perf_counter()
    s = run_index(out=out, index_key=index_key, max_index_memory=max_index_memory, max_query_ms=max_query_ms,
                  distributed=True, concurrency=2)
    index_s = time.perf_counter() - t
    for line in s.lines():
        print(line, flush=True)
    info = load_embeddings_info(out)
    t = time.perf_counter()
    if n <= neighbor_rows:
        nb = run_neighbors(out=out, index_version=s.version, concurrency=2, search="routed", shard_memory=shard_memory)
        for line in nb.lines():
            print(line, flush=True)
        measured_rows, recall, how = n, nb.recall_at_k, nb.search
        nb_cpu, pads = nb.cpu_seconds, nb.rows_with_pads
    else:  # the neighbors of evenly spaced parts: every vector routed and scanned, a subset of the queries
        measured_rows, recall, how, nb_cpu, pads = _neighbors_of_some_parts(out, info, s, neighbor_rows, shard_memory)
    nb_s = time.perf_counter() - t
    emb_bytes = sum(os.path.getsize(os.path.join(folder, "embeddings", f)) for f in os.listdir(os.path.join(folder, "embeddings"))
                    if f.endswith(".npy"))
    nlist, nprobe = _ivf_params({"index_key": s.index_key, "index_param": s.index_param})
    result = {
        "n": n, "dim": dim, "parts": math.ceil(n / rows_per_part), "index_key": s.index_key, "key_reason": s.key_reason,
        "index_param": s.index_param, "rerank_candidates": s.rerank, "layout": s.layout, "nlist": nlist, "nprobe": nprobe,
        "generate_seconds": round(gen_s, 1), "index_seconds": round(index_s, 1),
        "index_build_seconds": round(s.build_seconds, 1), "index_tune_seconds": round(s.tune_seconds, 1),
        "index_build_cpu_seconds": round(s.build_cpu_seconds, 1),  # CPU time measured inside the workers
        "index_query_ms": round(s.query_ms, 4), "recall_at_2_index": round(s.recall_at_k, 4),
        "recall_at_2_index_tuned": round(s.neighbor_recall_at_k, 4),
        "max_query_ms": max_query_ms, "neighbors_search": "routed", "shard_memory": shard_memory, "shards": how["shards"],
        "shard_bytes_max": how["shard_bytes_max"], "shard_visits_per_chunk": round(how["query_copies"] / measured_rows, 2),
        "distances_per_chunk": how["distances_per_chunk"],
        "neighbors_measured_rows": measured_rows, "neighbors_measured_seconds": round(nb_s, 1),
        "neighbors_cpu_seconds_measured": round(nb_cpu, 1),
        "neighbors_scan_cpu_seconds_measured": round(how["scan_cpu_seconds"], 1),
        "neighbors_route_cpu_seconds": round(how["route_cpu_seconds"], 1),  # all N vectors, queries or not
        "neighbors_cpu_seconds": round(how["route_cpu_seconds"] + (nb_cpu - how["route_cpu_seconds"]) * n / measured_rows, 1),
        "recall_at_2_neighbors": None if recall is None else round(recall, 4), "rows_with_pads_measured": pads,
        "index_bytes": s.size_bytes, "embeddings_bytes": emb_bytes,
        "peak_rss_mb": {**s.peak_rss_mb, **how["peak_rss_mb"], "benchmark_driver": peak_rss_mb()},
        "cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _neighbors_of_some_parts(out, info, s, rows: int, shard_memory: str):
    """The routed search over every vector for the queries of evenly spaced parts holding about
    ``rows`` chunks, and the recall@2 of what it stored on 500 of those chunks against exact search."""
    import numpy as np

    from pipelines.artifacts.embeddings import DocBounds, uniform_sample
    from pipelines.artifacts.parquet import read_table
    from pipelines.search.knn import TIE_CANDIDATES, recall_at_k
    from pipelines.search.tuning import exact_sample
    from pipelines.stages.neighbors_routed import run_routed

    count = max(1, math.ceil(rows / info.parts[0].rows))
    step = max(1, len(info.parts) // count)
    subset = list(info.parts)[::step][:count]
    folder = "neighbors/_bench"
    run = run_routed(out, info, folder=folder, index_version=s.version, index_param=s.index_param, k=2, metric="l2",
                     shard_memory=shard_memory, concurrency=2, query_parts=subset)
    measured = sum(p.rows for p in subset)
    # exact neighbors of 500 of the searched chunks, over all N (own document excluded)
    picks = uniform_sample(measured, 500, "bench")
    offsets = np.cumsum([0] + [p.rows for p in subset])
    part_of = np.searchsorted(offsets, picks, side="right") - 1
    ids = np.sort(np.asarray([subset[j].offset + picks[i] - offsets[j] for i, j in enumerate(part_of)], np.int64))
    truth = exact_sample(out, info, DocBounds.load(out, info.n), ids, 2 + TIE_CANDIDATES, "l2", use_ray=False)
    found = np.empty((len(ids), 2), np.int64)
    for e in run.entries:
        sel = (ids >= e["first_chunk_id"]) & (ids < e["first_chunk_id"] + e["rows"])
        if sel.any():
            nb = read_table(out, f"{folder}/{e['path']}", columns=["neighbors"]).column(0).combine_chunks()
            found[sel] = nb.flatten().to_numpy().reshape(-1, 2)[ids[sel] - e["first_chunk_id"]]
    recall = recall_at_k(found, *truth.filtered, 2)
    pads = sum(e["pad_rows"] for e in run.entries)
    print(f"neighbors: {measured} of {info.n} chunks searched (routed, {run.shards} shards); recall@2 {recall:.4f} "
          f"on 500 of them vs exact search", flush=True)
    how = {"shards": run.shards, "shard_bytes_max": run.shard_bytes_max, "query_copies": run.query_copies,
           "distances_per_chunk": round(run.pairs / measured, 1), "scan_cpu_seconds": run.scan_cpu_seconds,
           "route_cpu_seconds": run.route_cpu_seconds, "peak_rss_mb": run.peak_rss_mb}
    return measured, recall, how, run.cpu_seconds, pads


def _stored_extras() -> dict:
    return {k: v for k, v in json.loads(JSON_PATH.read_text()).items() if k != "runs"} if JSON_PATH.exists() else {}


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


def measure_hnsw_quantizer(nlist: int = 131_072, dim: int = 384, queries: int = 20_000, ef: int = 128) -> dict:
    """CPU-ms per vector to find its nearest lists through an HNSW32 graph of ``nlist`` centroids
    (the coarse quantizer the automatic key gets beyond 65,536 lists): what assigning a vector
    costs at 10^9 chunks, where a flat quantizer would cost ``nlist`` distances per vector."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(nlist, dim)).astype(np.float32)
    q = faiss.IndexHNSWFlat(dim, 32)
    t = time.process_time()
    q.add(centroids)
    build_cpu = time.process_time() - t
    q.hnsw.efSearch = ef
    x = centroids[rng.choice(nlist, queries)] + rng.normal(scale=0.3, size=(queries, dim)).astype(np.float32)
    t = time.process_time()
    q.search(x, 64)
    return {"nlist": nlist, "dim": dim, "ef_search": ef, "probes": 64,
            "cpu_ms_per_vector": round((time.process_time() - t) * 1000 / queries, 4),
            "graph_build_cpu_seconds": round(build_cpu, 1)}


def extrapolate(runs: list[dict], quantizer: dict | None, real: dict | None, target: int = 10**9,
                dim: int = 384) -> dict:
    """Cost of the routed neighbors search and the build for ``target`` chunks, from measurements.

    Calibrated on the largest run: ns of CPU per exact distance in the shard scans, route CPU per
    vector (bucketing and writing, plus its flat assignment), build CPU per vector. At ``target``
    the automatic key has 131,072 lists behind an HNSW quantizer, whose assignment cost
    (``quantizer``) is measured and added to routing and building. The probes needed for the
    recall are the uncertain part, so two figures: the synthetic data's trend (nprobe against
    nlist, fitted across the runs: pessimistic, this data is built to be hard) and the real
    corpus' nprobe held at its measured value (``real``: MiniLM embeddings of real text)."""
    import numpy as np

    big = max(runs, key=lambda r: r["n"])
    nlist_t = 131_072
    ns_per_distance = big["neighbors_scan_cpu_seconds_measured"] * 1e9 / (big["distances_per_chunk"]
                                                                           * big["neighbors_measured_rows"])
    extra_probe_factor = big["distances_per_chunk"] / (big["nprobe"] * big["n"] / big["nlist"])
    assign_s = (quantizer or {}).get("cpu_ms_per_vector", 0) / 1000
    route_s = big["neighbors_route_cpu_seconds"] / big["n"] + assign_s
    build_s = big["index_build_cpu_seconds"] / big["n"] + assign_s
    logs = np.array([[math.log(r["nlist"]), math.log(r["nprobe"])] for r in runs])
    slope = float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0]) if len(runs) > 1 else 1.0
    nprobe_synthetic = int(min(nlist_t, big["nprobe"] * (nlist_t / big["nlist"]) ** slope))
    scenarios = {"synthetic data's trend": nprobe_synthetic}
    if real:
        scenarios["real text's nprobe"] = int(real["nprobe"])
    cores = CLUSTER_NODES * CORES_PER_NODE
    result = {"target_chunks": target, "calibrated_on_n": big["n"], "ns_per_exact_distance": round(ns_per_distance, 3),
              "extra_probe_factor": round(extra_probe_factor, 3), "route_core_seconds_per_vector": route_s,
              "build_core_seconds_per_vector": build_s, "nprobe_vs_nlist_slope": round(slope, 3), "nlist": nlist_t,
              "cluster": f"{CLUSTER_NODES} nodes x {CORES_PER_NODE} cores, {NODE_RAM_GB} GB RAM each",
              "shards": math.ceil(target * (dim * 4 + 12) / 2**31), "embeddings_bytes": target * dim * 2,
              "quantizer": quantizer, "scenarios": {}}
    for name, nprobe in scenarios.items():
        distances = nprobe * target / nlist_t * extra_probe_factor
        scan_core_h = target * distances * ns_per_distance * 1e-9 / 3600
        route_core_h = target * route_s / 3600
        build_core_h = target * build_s / 3600
        result["scenarios"][name] = {
            "nprobe": nprobe, "distances_per_chunk": round(distances), "scan_core_hours": round(scan_core_h),
            "route_core_hours": round(route_core_h), "build_core_hours": round(build_core_h),
            "wall_hours": round((scan_core_h + route_core_h + build_core_h) / cores, 1),
            "shuffle_tb": round(target * (dim * 2 + 16) * (1 + big["shard_visits_per_chunk"]) / 1e12, 1)}
    return result


CLUSTER_NODES, CORES_PER_NODE, NODE_RAM_GB = 64, 32, 128


def _missing_sizes(runs: list[dict]) -> str:
    if any(r["n"] >= 10**7 for r in runs):
        return ""
    return ("\n10^7 is not in the table yet: on the 2 shared cores of the session that measured it, the build alone\n"
            "(train, then 200 add tasks) did not finish in the time left; `--sizes 10000000 --neighbor-rows 100000`\n"
            "measures it (about an hour on a quiet 2-core machine).\n")


def write_readme(runs: list[dict], ex: dict, real: dict | None, before: list[dict]) -> None:
    rows = []
    for r in sorted(runs, key=lambda r: r["n"]):
        peaks = ", ".join(f"{k.replace('_task', '')} {v:,.0f}" for k, v in r["peak_rss_mb"].items()
                          if k != "benchmark_driver")
        scaled = "" if r["neighbors_measured_rows"] >= r["n"] else \
            f" (queries of {r['neighbors_measured_rows']:,} chunks searched, scaled)"
        rows.append(f"| {r['n']:,} | `{r['index_key']}` `{r['index_param']}` | {r['index_build_cpu_seconds']:,} | "
                    f"{r['neighbors_cpu_seconds']:,}{scaled} | {r['shards']} x <= {r['shard_bytes_max'] / 2**20:,.0f} MiB, "
                    f"{r['shard_visits_per_chunk']} per chunk | {r['recall_at_2_index']} | **{r['recall_at_2_neighbors']}** | "
                    f"{peaks} |")
    old = "\n".join(f"| {r['n']:,} | `{r['index_key']}` `{r['index_param']}` | {r['recall_at_2_neighbors']} | "
                    f"{r['neighbors_cpu_seconds']:,} |" for r in sorted(before, key=lambda r: r["n"]))
    real_rows = ""
    if real:
        real_rows = "\n".join(
            f"| {x['config']} | `{x['index_key']}` `{x['index_param']}` | {x['rerank_candidates'] or '-'} | "
            f"{x['recall_at_2_index']:.3f} | {x['recall_at_2_stored_held_out']:.3f} | "
            f"**{x['recall_at_2_stored_vs_brute_force']:.3f}** | {x['neighbors_cpu_ms_per_chunk']} | {x['shards'] or '-'} |"
            for x in real["runs"])
        real_intro = (f"{real['chunks']:,} chunks: the bundled Shakespeare plus {real['corpus']['kernel_bytes'] / 2**20:.0f} "
                      "MiB of the Linux kernel's documentation (Debian's linux-doc), embedded with the packaged "
                      "all-MiniLM-L6-v2. Recall@2 against brute force on 1,000 chunks drawn independently of the "
                      "tuner's sample.")
    else:
        real_intro = "Not measured yet."
    sc_rows = "\n".join(f"| {name} | {v['nprobe']:,} | {v['distances_per_chunk']:,} | {v['build_core_hours']:,} | "
                        f"{v['route_core_hours']:,} | {v['scan_core_hours']:,} | {v['wall_hours']} | {v['shuffle_tb']} |"
                        for name, v in ex["scenarios"].items())
    q = ex.get("quantizer") or {}
    text = f"""# Index and neighbors at scale

Commands: `.venv/bin/python benchmarks/index_scale.py --sizes 100000,1000000 --neighbor-rows 1000000`, then
`--sizes 10000000 --neighbor-rows 100000 --measure-quantizer` (each size is recorded on its own in
`benchmarks/results/index_scale.json`; plot `benchmarks/results/index_scale.png`), and
`.venv/bin/python benchmarks/real_corpus_neighbors.py` (`benchmarks/results/real_corpus_neighbors.json`).

Synthetic clustered embeddings (dim 384, float16, 50,000-row parts, documents of ~300 chunks whose chunks
crowd each other's neighbor lists, so that the true neighbors from *other* documents are spread over many
lists; `tests/helpers_embeddings.py`), the distributed build with the automatic key (default
`--max-index-memory 4G`), then the neighbors stage with the list-routed search (`--shard-memory 128M`, k=2).
Recall@2 of the **stored** neighbors against exact search (own document excluded), on the held-out half of
the index's sample, or, where only some parts' queries were searched, on 500 of the searched chunks.
CPU-seconds are measured inside the Ray workers (2 cores shared with other work: wall times are not comparable
between runs, CPU time is). Peak memory is each task's own high-water mark (VmHWM, reset when the task
starts), in MiB.

| chunks | index (key, search) | build CPU-s | neighbors CPU-s | shards, visits | recall@2 index | recall@2 stored | peak MiB per task |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

![scaling](results/index_scale.png)

Before this change (same data; `benchmarks/results/index_scale_before.json`), the stored neighbors were the
index's own answers, so a compressed key capped their recall:

| chunks | index | recall@2 stored | neighbors CPU-s |
| --- | --- | --- | --- |
{old}

What bounds each worker: an add task holds one part, a scan task one shard (at most `--shard-memory` of
float32 vectors, whatever N) plus one block of queries, a merge task one part's results. A route task holds
its part's query copies until it writes them, one per shard a query visits: on this data a query's 256 probes
reach almost every shard (11.9 of 12 at 10^6), which took the route task from 929 to 2,803 MiB. Writing the
copies block by block would bound it by the block; that is the next change. The training sample grows with
the number of lists (50 points per list, about 4 sqrt(N) lists): it is the one thing gathered on a node. The
on-disk merge and the tune task map the index file, so their resident pages grow with the index.
{_missing_sizes(runs)}
## Real embeddings of real text

{real_intro}

| configuration | index | re-ranked candidates | recall@2 index | recall@2 stored (held-out) | recall@2 stored (brute force) | neighbors CPU-ms per chunk | shards |
| --- | --- | --- | --- | --- | --- | --- | --- |
{real_rows}

## Estimate for 10^9 chunks

Model (`extrapolate()`, calibrated on the {ex['calibrated_on_n']:,}-chunk run): the shard scans cost
{ex['ns_per_exact_distance']} ns of CPU per exact distance (dim 384, BLAS); routing costs
{ex['route_core_seconds_per_vector'] * 1000:.3f} CPU-ms per vector (bucketing and writing, plus at 10^9 the HNSW
coarse quantizer over {ex['nlist']:,} lists: {q.get('cpu_ms_per_vector', 'n/a')} CPU-ms per vector, measured), and
building {ex['build_core_seconds_per_vector'] * 1000:.3f} CPU-ms per vector. Each query scans its nprobe lists plus,
when its own document fills them, a few more (x{ex['extra_probe_factor']} measured). The probes that the recall
needs decide the bill. They are extrapolated from the runs (fitted slope of log nprobe against log nlist:
{ex['nprobe_vs_nlist_slope']}; from two sizes only, so an assumption as much as a measurement); where a row for real
text is present, it holds that corpus' tuned nprobe at 10^9.

| scenario | nprobe | distances per chunk | build core-h | route core-h | scan core-h | wall hours on {ex['cluster']} | data moved (TB) |
| --- | --- | --- | --- | --- | --- | --- | --- |
{sc_rows}

{ex['shards']:,} shards of 2 GB (`--shard-memory 2G`) hold the {ex['embeddings_bytes'] / 1e12:.2f} TB of float16
vectors as float32; 32 scan workers per node use 64 GB of each node's {NODE_RAM_GB} GB. Anchors: autofaiss built
LAION-5B's 5.5B x 768 index in 6 h on 10 x 16 cores (index only, no neighbors); NVIDIA's InstructRetro database
(19B chunks) spent 192 CPU-hours adding and 1,736 node-hours querying, at recall 0.93.
"""
    (ROOT / "benchmarks" / "README_index_scale.md").write_text(text)


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(load_results(), key=lambda r: r["n"])
    if not runs:
        print("no runs recorded yet")
        return
    stored = json.loads(JSON_PATH.read_text())
    real = json.loads(REAL_PATH.read_text()) if REAL_PATH.exists() else None
    real_ivf = next((x for x in (real or {}).get("runs", []) if x["config"].startswith("IVF-Flat")), None)
    ex = extrapolate(runs, stored.get("quantizer"), {"nprobe": _ivf_params(real_ivf)[1]} if real_ivf else None)
    save_results(runs, {"extrapolation": ex, "quantizer": stored.get("quantizer")})
    before = json.loads(BEFORE_PATH.read_text())["runs"] if BEFORE_PATH.exists() else []
    write_readme(runs, ex, real, before)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ns = [r["n"] for r in runs]
    ax[0].loglog(ns, [r["index_build_cpu_seconds"] for r in runs], "o-", label="index build")
    ax[0].loglog(ns, [r["neighbors_cpu_seconds"] for r in runs], "s-", label="neighbors (all chunks)")
    ax[0].set_xlabel("chunks")
    ax[0].set_ylabel("CPU-seconds (measured in the workers)")
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
    ap.add_argument("--max-query-ms", type=float, default=100.0,
                    help="the tuner's CPU budget per query (the build's default is 10; this data needs more probes)")
    ap.add_argument("--shard-memory", default="128M", help="routed neighbors search: vectors one worker holds")
    ap.add_argument("--measure-quantizer", action="store_true",
                    help="also time an HNSW coarse quantizer of 131,072 lists (the 10^9 estimate's assignment cost)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        from pipelines.runtime.ray_session import init_ray

        work = args.work or tempfile.mkdtemp(prefix="bench-index-scale-")
        init_ray(num_cpus=2)
        try:
            for n in [int(float(x)) for x in args.sizes.split(",")]:
                r = run_size(n, dim=args.dim, rows_per_part=args.rows_per_part, index_key=args.index_key,
                             max_index_memory=args.max_index_memory, work=work, neighbor_rows=args.neighbor_rows,
                             shard_memory=args.shard_memory, max_query_ms=args.max_query_ms)
                print(json.dumps(r), flush=True)
                runs = [x for x in load_results() if x["n"] != n] + [r]
                save_results(runs, _stored_extras())
            if args.measure_quantizer:
                save_results(load_results(), _stored_extras() | {"quantizer": measure_hnsw_quantizer()})
        finally:
            import ray

            ray.shutdown()
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    report()


if __name__ == "__main__":
    main()
