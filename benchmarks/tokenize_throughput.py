"""Tokenize-stage throughput: chunks/s with 1 and 2 Ray CPUs, against the seed's single-process loop.

    .venv/bin/python benchmarks/tokenize_throughput.py [--copies 2] [--json benchmarks/results/tokenize_throughput.json]

The corpus is the bundled Shakespeare plays (9.3 MB), repeated ``--copies`` times in separate folders
(so >= 10 MB of real text). The seed baseline re-implements RETRO-pytorch's text_folder_to_chunks_
minimally: one process, the transformers tokenizer called per document, torch padding and reshaping.
Ray's start-up (ray.init and starting one worker per CPU) is excluded, as the issue asks; everything
the stage does (listing, planning, both passes, manifests) is included. Prints JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_util import run_in_fresh_ray, write_result  # noqa: E402


def make_corpus(dest: str, copies: int) -> int:
    from pipelines.stages.build_config import bundled_corpus

    for i in range(copies):
        shutil.copytree(bundled_corpus(), os.path.join(dest, f"copy{i}"))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)


def seed_baseline(corpus: str, chunk_size: int = 64) -> dict:
    """RETRO-pytorch's loop: per-file tokenizer call, F.pad, rearrange, concat (no writing cost counted)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from pipelines.text.tokenizer import default_encoder_path

    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    tok.model_max_length = 10**9  # the seed ran without truncation; silence the 512 warning
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(corpus) for f in fs)
    start = time.perf_counter()
    total = 0
    for p in paths:
        ids = tok([open(p, encoding="utf-8").read()], add_special_tokens=True, padding=True,
                                    return_tensors="pt").input_ids[0]
        padding = chunk_size - ((ids.shape[-1] - 1) % chunk_size)
        ids = F.pad(ids, (0, padding))
        ids, last = ids[:-1], ids[-1:]
        ids = ids.reshape(-1, chunk_size)
        last_tokens = torch.cat((ids[1:, 0], last)).reshape(-1, 1)
        total += torch.cat((ids, last_tokens), dim=-1).shape[0]
    secs = time.perf_counter() - start
    return {"chunks": total, "seconds": round(secs, 2), "chunks_per_s": round(total / secs)}


def ours(corpus: str, cpus: int) -> dict:
    """Run the stage in a fresh process with a local Ray instance of ``cpus`` CPUs."""
    body = f"""
import tempfile
from pipelines.stages.tokenize import run_tokenize
out = open_location(tempfile.mkdtemp(prefix="rf-bench-"))
s = run_tokenize(corpus=[{corpus!r}], out=out, chunk_size=64, seq_len=2048, text_field="text",
                 tokenizer="packaged:all-MiniLM-L6-v2", unit_bytes=0, concurrency={cpus}, config={{}})
print("RESULT", json.dumps({{"chunks": s.chunks, "seconds": round(s.seconds, 2), "chunks_per_s": round(s.chunks / s.seconds)}}))
"""
    return run_in_fresh_ray(body, cpus, "pipelines.stages.tokenize, pipelines.text.tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        size = make_corpus(d, a.copies)
        result = {"corpus_mb": round(size / 2**20, 1), "seed_single_process": seed_baseline(d),
                  "ours_1_cpu": ours(d, 1), "ours_2_cpus": ours(d, 2)}
    result["ratio_2cpus_vs_seed"] = round(result["ours_2_cpus"]["chunks_per_s"] / result["seed_single_process"]["chunks_per_s"], 2)
    write_result(result, a.json)


if __name__ == "__main__":
    main()
