"""Why retroforge imports torch before faiss: alternating torch and faiss calls, in either import order.

Command (from the repository root):

    .venv/bin/python benchmarks/import_order.py > benchmarks/results/import_order.json

Each order runs in a fresh interpreter: a 1024x1024 float32 matmul (torch), a faiss ``IndexFlatIP``
search of 4,096 queries over 1,024 vectors of dim 64, and the two alternating (what a kNN-memory search
inside a training step does). Both libraries use OpenMP; torch loads its runtime globally, so when torch
comes first faiss' OpenMP calls resolve to the same runtime and one thread pool serves both. With faiss
first, each keeps its own pool, and on a machine with few cores the idle threads of one spin while the
other works. The ratio of the alternating times is the figure to read.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import sys, time
for name in sys.argv[1].split(","):
    __import__(name)
import faiss, numpy as np, torch
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
rng = np.random.default_rng(0)
queries = rng.random((4096, 64), dtype=np.float32)
index = faiss.IndexFlatIP(64)
index.add(rng.random((1024, 64), dtype=np.float32))

def ms(fn, n=20):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000

print(ms(lambda: a @ b), ms(lambda: index.search(queries, 4)), ms(lambda: (a @ b, index.search(queries, 4))))
"""


def main() -> None:
    out = {"benchmark": "import_order", "unit": "ms per call (mean of 20)"}
    for order in ("torch,faiss", "faiss,torch"):
        line = subprocess.run([sys.executable, "-c", PROBE, order], check=True, capture_output=True, text=True)
        matmul, search, both = (float(x) for x in line.stdout.split())
        out[order] = {"torch_matmul": round(matmul, 2), "faiss_search": round(search, 2),
                      "alternating": round(both, 2)}
    out["alternating_slowdown_faiss_first"] = round(out["faiss,torch"]["alternating"] / out["torch,faiss"]["alternating"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
