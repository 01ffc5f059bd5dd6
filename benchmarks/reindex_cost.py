"""The cost of a re-index that adds 1% to the corpus, against a full rebuild of the same corpus.

    .venv/bin/python benchmarks/reindex_cost.py                        # 12 plays x 60 KB, then 24 x 120 KB
    .venv/bin/python benchmarks/reindex_cost.py --sizes 12x60          # one size

One local Ray instance (started before timing) serves every step, in-process, so both sides pay
the same start-up costs. First a full build of the corpus (every stage of jobs.build_index, which
also warms Ray's workers up), then documents worth 1% of the corpus bytes are added (slices of
plays not in it) and, timed on the same machine in the same run:
- ``reindex``: ``pipelines.reindex.run.run_reindex`` on a copy of the published build (scan, tokenize
  and embed the new documents, index update, neighbors update, LATEST swap);
- ``full_rebuild``: every stage of jobs.build_index on the changed corpus, into a fresh folder.
The figure is ``ratio`` = reindex seconds / full rebuild seconds. Both use the same index key
(--index-key, default the build's automatic choice). Prints JSON and writes
benchmarks/results/reindex_cost.json.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def full_build(corpus: Path, out: Path, index_key: str, cpus: int) -> float:
    from pipelines.artifacts.storage import open_location
    from pipelines.stages.build import STAGES
    from pipelines.stages.build_config import BuildConfig

    cfg = BuildConfig(corpus=[str(corpus)], out=str(out), index_key=index_key, concurrency=cpus)
    loc = open_location(str(out))
    start = time.perf_counter()
    for name in ("tokenize", "embed", "index", "neighbors"):
        STAGES[name](cfg, loc, [str(corpus)], cpus)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="12x60,24x120", help="corpora to measure: PLAYSxKB (KB of text per play), comma-separated")
    ap.add_argument("--added", type=float, default=0.01, help="fraction of the corpus bytes to add")
    ap.add_argument("--index-key", default="", help="faiss key for both builds (default: automatic)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reindex_cost.json"))
    args = ap.parse_args()

    import ray

    from pipelines.runtime.ray_session import init_ray

    init_ray(num_cpus=args.cpus)
    runs = []
    try:
        for spec in args.sizes.split(","):
            plays, kb = (int(x) for x in spec.lower().split("x"))
            runs.append(run_size(plays, kb, args))
    finally:
        ray.shutdown()
    result = {"runs": runs, "ratio": {f"{r['corpus']['plays']}x{r['corpus']['kb']}KB": r["ratio"] for r in runs},
              "cpus": args.cpus, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def run_size(plays: int, kb: int, args) -> dict:
    from pipelines.artifacts.manifest import read_manifest
    from pipelines.artifacts.storage import open_location
    from pipelines.reindex.run import run_reindex
    from pipelines.stages.build_config import bundled_corpus

    texts = sorted(Path(bundled_corpus()).glob("*.txt"))
    work = Path(tempfile.mkdtemp(prefix="reindex-cost-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        size = kb * 1000
        for p in texts[:plays]:
            (corpus / p.name).write_text(p.read_text()[:size])
        total = sum(f.stat().st_size for f in corpus.iterdir())
        first_build = full_build(corpus, work / "base", args.index_key, args.cpus)

        want = int(total * args.added)  # 1% more text, as new documents cut from plays not in the corpus
        extra, added = texts[plays:], 0
        for i, p in enumerate(extra):
            piece = p.read_text()[: min(size, want - added)]
            (corpus / f"new_{i}_{p.name}").write_text(piece)
            added += len(piece.encode())
            if added >= want:
                break

        shutil.copytree(work / "base", work / "reindexed")
        t = time.perf_counter()
        s = run_reindex(corpus=[str(corpus)], out=open_location(str(work / "reindexed")), concurrency=args.cpus)
        reindex_s = time.perf_counter() - t
        full_s = full_build(corpus, work / "rebuilt", args.index_key, args.cpus)
        chunks = read_manifest(open_location(str(work / "rebuilt")), "chunks")["totals"]["chunks"]
        n = s.neighbors
        print("\n".join(s.lines()), flush=True)
        return {
            "corpus": {"plays": plays, "kb": kb, "bytes": total, "added_bytes": added,
                       "added_fraction": round(added / total, 4), "chunks_after": chunks, "chunks_added": s.append.chunks},
            "first_full_build_s": round(first_build, 2),
            "reindex_s": round(reindex_s, 2),
            "full_rebuild_s": round(full_s, 2),
            "ratio": round(reindex_s / full_s, 3),
            "reindex": {"action": s.action, "reason": s.reason, "index": s.index_version,
                        "scan_s": round(s.delta.seconds, 2), "append_s": round(s.append.seconds, 2),
                        "neighbors_s": round(n.seconds, 2) if n else None,
                        "neighbors": {c: getattr(n, c) for c in ("rows_new", "rows_researched", "rows_checked",
                                                                 "rows_updated", "rows_dropped")} if n else {}},
            "index_key": read_manifest(open_location(str(work / "rebuilt")), "index/v0001")["index_key"],
            "load_average_1m": round(os.getloadavg()[0], 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
