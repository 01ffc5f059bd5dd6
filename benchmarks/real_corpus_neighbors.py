"""Stored-neighbor recall on real MiniLM embeddings of a real corpus of >= 10^5 chunks.

    apt-get install linux-doc-6.1                         # the Linux kernel's documentation (reST)
    .venv/bin/python benchmarks/real_corpus_neighbors.py  # ~15 min on 2 cores, most of it embedding

The corpus: the bundled Shakespeare plays plus the kernel's Documentation/ (Debian's linux-doc
package, decompressed), tokenized and embedded by `jobs.build_index` with the packaged
all-MiniLM-L6-v2 (the build is kept in --work and reused). Then, on the same embeddings, each
configuration builds an index version and a neighbors version:
- the automatic key (IVF-Flat here) with the single-node index search;
- a lossy key forced (`IVF1024,PQ16`: 16-byte codes of 384-dim vectors), whose candidates the
  neighbors stage re-ranks with the stored embeddings;
- the same lossy index with the list-routed search (each worker holds one shard of the lists,
  --shard-memory 64M here so that there are several);
- an IVF-Flat key forced (`IVF2048,Flat`) with the routed search: the nprobe real text needs (the
  10^9 estimate in README_index_scale.md uses it).
For each: recall@2 of the stored neighbors against brute force (own document excluded) on 1,000
chunks drawn independently of the tuner's sample, the tuner's own held-out figure, the raw index
recall, and the CPU-seconds of the index and neighbors workers. Results:
benchmarks/results/real_corpus_neighbors.json.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "real_corpus_neighbors.json"
KERNEL_DOCS = "/usr/share/doc/linux-doc-*/Documentation"


def prepare_corpus(dst: str, kernel_mb: float) -> dict:
    """Shakespeare plus the first ``kernel_mb`` MiB (by path) of the kernel's reST documentation."""
    from pipelines.stages.build_config import bundled_corpus

    marker = Path(f"{dst}.done")  # beside the corpus, not in it
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(bundled_corpus(), os.path.join(dst, "shakespeare"))
    roots = glob.glob(KERNEL_DOCS)
    if not roots:
        raise SystemExit(f"no {KERNEL_DOCS}: apt-get install linux-doc-6.1 (Debian) first")
    files, total = 0, 0
    for src in sorted(glob.glob(os.path.join(roots[0], "**", "*.rst.gz"), recursive=True)):
        text = gzip.open(src).read()
        rel = os.path.relpath(src, roots[0])[: -len(".gz")]
        target = os.path.join(dst, "kernel", rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).write_bytes(text)
        files, total = files + 1, total + len(text)
        if total >= kernel_mb * 2**20:
            break
    facts = {"kernel_files": files, "kernel_bytes": total, "kernel_docs": roots[0]}
    marker.write_text(json.dumps(facts))
    return facts


def exact_recall(out, version: str, sample_ids) -> float:
    """recall@2 of neighbors version ``version`` on ``sample_ids`` against brute force over all chunks."""
    from pipelines.artifacts.embeddings import DocBounds, load_embeddings_info
    from pipelines.artifacts.versions import NeighborsReader
    from pipelines.search.knn import TIE_CANDIDATES, recall_at_k
    from pipelines.search.tuning import exact_sample

    info = load_embeddings_info(out)
    truth = exact_sample(out, info, DocBounds.load(out, info.n), sample_ids, 2 + TIE_CANDIDATES, "l2", use_ray=False)
    found, _ = NeighborsReader(out, version).lookup(sample_ids)
    return recall_at_k(found, *truth.filtered, 2)


def run_config(out, name: str, index_key: str, search: str, sample_ids) -> dict:
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors

    t = time.perf_counter()
    s = run_index(out=out, index_key=index_key, concurrency=2)
    n = run_neighbors(out=out, index_version=s.version, concurrency=2, search=search, shard_memory="64M")
    for line in s.lines() + n.lines():
        print(line, flush=True)
    return {"config": name, "index_key": s.index_key, "index_param": s.index_param, "key_reason": s.key_reason,
            "rerank_candidates": s.rerank, "search": search, "recall_at_2_index": s.recall_at_k,
            "recall_at_2_stored_held_out": n.recall_at_k,
            "recall_at_2_stored_vs_brute_force": round(exact_recall(out, n.version, sample_ids), 4),
            "index_cpu_seconds": round(s.build_cpu_seconds, 1), "neighbors_cpu_seconds": round(n.cpu_seconds, 1),
            "neighbors_cpu_ms_per_chunk": round(1000 * n.cpu_seconds / n.chunks, 3),
            "shards": n.search.get("shards", 0), "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/retroforge-real-corpus", help="corpus and build folder (kept, reused)")
    ap.add_argument("--kernel-mb", type=float, default=16.0, help="MiB of kernel documentation to add to Shakespeare")
    ap.add_argument("--lossy-key", default="IVF1024,PQ16")
    ap.add_argument("--ivf-key", default="IVF2048,Flat", help="the IVF-Flat key whose tuned nprobe real text needs")
    ap.add_argument("--configs", default="auto,lossy,lossy-routed,ivf-routed",
                    help="which configurations to run (results of the others are kept)")
    args = ap.parse_args()
    import numpy as np

    from pipelines.artifacts.embeddings import load_embeddings_info
    from pipelines.artifacts.storage import open_location
    from pipelines.runtime.ray_session import init_ray
    from pipelines.stages.build import run_build
    from pipelines.stages.build_config import BuildConfig

    facts = prepare_corpus(os.path.join(args.work, "corpus"), args.kernel_mb)
    out_url = os.path.join(args.work, "build")
    t = time.perf_counter()
    cfg = BuildConfig(corpus=[os.path.join(args.work, "corpus")], out=out_url, stages="tokenize,embed", num_cpus=2)
    if run_build(cfg) != 0:
        raise SystemExit("the build quarantined too much input")
    embed_s = time.perf_counter() - t
    out = open_location(out_url)
    info = load_embeddings_info(out)
    print(f"real corpus: {info.n:,} chunks of dim {info.dim}", flush=True)
    init_ray(num_cpus=2)
    sample = np.sort(np.random.default_rng(7).choice(info.n, 1000, replace=False)).astype(np.int64)
    configs = {"auto": ("automatic key, index search", "", "index"),
               "lossy": ("lossy key re-ranked, index search", args.lossy_key, "index"),
               "lossy-routed": ("lossy key, routed search", args.lossy_key, "routed"),
               "ivf-routed": ("IVF-Flat key, routed search", args.ivf_key, "routed")}
    runs = [run_config(out, *configs[name], sample) for name in args.configs.split(",")]
    done = {r["config"]: r for r in (json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else [])}
    done |= {r["config"]: r for r in runs}  # a rerun of some configurations keeps the others
    order = [c[0] for c in configs.values()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"chunks": info.n, "dim": info.dim, "encoder": "packaged all-MiniLM-L6-v2",
                                   "corpus": {"shakespeare": "bundled", **facts},
                                   "tokenize_embed_seconds": round(embed_s, 1),
                                   "runs": sorted(done.values(), key=lambda r: order.index(r["config"]))},
                                  indent=2) + "\n")
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
