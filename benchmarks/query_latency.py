"""Latency of `jobs.query` once a build is loaded: one text query = tokenize + one encoder pass + one index search +
reading the hits' chunks and sources. The load itself (encoder, index, manifests) is timed apart.

    .venv/bin/python benchmarks/query_latency.py --data artifacts/demo     # after `make demo`

Queries are the first lines of documents of the build (real text), run one at a time as a user would; the
median and the 95th percentile over --queries are reported. Writes benchmarks/results/query_latency.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a published build (jobs.build_index)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()

    import torch

    from pipelines.inference.query import BuildSearcher

    torch.set_num_threads(2)
    start = time.perf_counter()
    searcher = BuildSearcher(args.data)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    ids = rng.choice(searcher.reader.n_chunks, args.queries, replace=False)
    tokens, _ = searcher.reader.gather(ids)
    texts = [searcher.text_of(t[: searcher.reader.chunk_size]) for t in tokens]
    searcher.search_text(texts[0], args.k)  # warm-up: first encoder call
    times = []
    for text in texts:
        t = time.perf_counter()
        searcher.search_text(text, args.k)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1000
    result = {"benchmark": "query_latency", "command": "python benchmarks/query_latency.py " + " ".join(sys.argv[1:]),
              "chunks": searcher.reader.n_chunks, "index": searcher.latest["index"], "queries": args.queries,
              "k": args.k, "load_seconds": round(load_s, 2), "query_ms_median": round(float(np.median(ms)), 1),
              "query_ms_p95": round(float(np.percentile(ms, 95)), 1)}
    out = ROOT / "benchmarks" / "results" / "query_latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
