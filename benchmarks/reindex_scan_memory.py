"""The re-index scan's driver memory at 10^4 and 10^5 documents (issue 14 §5): the peak of Python
allocations (tracemalloc) in the driver while the corpus diff runs, now and, with ``--before COMMIT``,
with the scan of that commit (its pipelines/reindex/scan.py loaded from git) in the same run.

    .venv/bin/python benchmarks/reindex_scan_memory.py [--sizes 10000,100000] [--before c2ad34c] \\
        [--json benchmarks/results/reindex_scan_memory.json]

The corpus and build come from tests/integration/reindex/test_scan_memory.py (jsonl files of 5,000
documents; some added, changed and removed). The scan runs its distributed path (no in-process
shortcut) on a local Ray instance of 2 CPUs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_util import write_result  # noqa: E402

# names the scan of earlier commits imported from the tokenize stage, now in pipelines.text.corpus
_OLD_IMPORT = "from pipelines.stages.tokenize import TokenizeSettings, _record_offsets, _source, auto_unit_bytes"
_NEW_IMPORT = ("from pipelines.stages.tokenize import TokenizeSettings, auto_unit_bytes\n"
               "from pipelines.text.corpus import record_offsets as _record_offsets, source_of as _source")


def old_scan(commit: str):
    """The scan module of ``commit``, importable beside today's."""
    text = subprocess.run(["git", "show", f"{commit}:pipelines/reindex/scan.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.replace(_OLD_IMPORT, _NEW_IMPORT)
    path = Path(tempfile.mkdtemp()) / "old_scan.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_scan", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_scan"] = module
    spec.loader.exec_module(module)
    return module


def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="documents per run, comma-separated")
    ap.add_argument("--before", default="", help="also measure the scan of this commit")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipelines.artifacts.tombstones import Tombstones
    from pipelines.reindex.scan import scan_corpus
    from pipelines.runtime.ray_session import init_ray
    from tests.integration.reindex.test_scan_memory import SETTINGS, make_build

    before = old_scan(args.before) if args.before else None
    init_ray(num_cpus=2)
    root = Path(tempfile.mkdtemp())
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        corpus, out = make_build(root / str(n), n)
        row = {"documents": n, "driver_peak_mib": peak_mib(
            lambda out=out, corpus=corpus: scan_corpus(out, [str(corpus)], SETTINGS, Tombstones.empty(), in_process_bytes=0))}
        if before:
            row[f"driver_peak_mib_{args.before}"] = peak_mib(
                lambda out=out, corpus=corpus: before.scan_corpus(out, [str(corpus)], SETTINGS, Tombstones.empty()))
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    write_result({"benchmark": "reindex_scan_memory", "rows": rows}, args.json)


if __name__ == "__main__":
    main()
