"""Length grouping in the encoder (ChunkEncoder.embed_rows) against today's loop (consecutive batches at
full length), same rows, one process, on the real packaged encoder.

    .venv/bin/python benchmarks/length_grouping.py [--rows 2000] [--batch-size 256] \\
        [--json benchmarks/results/length_grouping.json]

Two row sets: "speeches" (padding-heavy: the bundled Shakespeare split into speeches, each speech its own
document, so most chunks are a document's short last chunk) and "plays" (whole plays as documents, as the
bundled demo corpus is built: almost every chunk full). For each: padding fraction, chunks/s of both paths at
the stage's default compute dtype (bfloat16 where the CPU has it), and how far the results move: rows
bit-identical (full rows / trimmed rows), max abs diff and min cosine of the trimmed rows, for float32 and
bfloat16 compute and after the stage's float16 storage cast. Prints JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_util import write_result  # noqa: E402

CHUNK = 64


def speeches(text: str) -> list[str]:
    """Paragraphs of a play, a speaker's name line joined to the speech that follows it."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    docs, i = [], 0
    while i < len(paragraphs):
        p = paragraphs[i]
        if "\n" not in p and len(p) < 30 and i + 1 < len(paragraphs):
            p, i = p + "\n" + paragraphs[i + 1], i + 1
        docs.append(p)
        i += 1
    return docs


def chunk_rows(split_speeches: bool, n_rows: int) -> np.ndarray:
    """The first ``n_rows`` chunk rows of the bundled plays (sorted names), tokenized as the stage does."""
    from pipelines.stages.build_config import bundled_corpus
    from pipelines.text.chunking import doc_to_chunks
    from pipelines.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rows, have = [], 0
    for name in sorted(os.listdir(bundled_corpus())):
        text = open(os.path.join(bundled_corpus(), name), encoding="utf-8").read()
        docs = speeches(text) if split_speeches else [text]
        for enc in tok.tokenizer.encode_batch(docs):
            rows.append(doc_to_chunks(np.array(enc.ids, np.int32), CHUNK))
            have += len(rows[-1])
        if have >= n_rows:
            break
    return np.concatenate(rows)[:n_rows]


def plain(encoder, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Today's embed stage loop."""
    return np.concatenate([encoder.embed(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def compare(a: np.ndarray, b: np.ndarray, full: np.ndarray) -> dict:
    """How far grouped (b) is from plain (a): bit-identical rows, and the trimmed rows' largest difference."""
    same = (a == b).all(axis=1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    f16 = (a.astype(np.float16) == b.astype(np.float16)).all(axis=1)
    short = ~full
    return {"full_rows_identical": f"{int(same[full].sum())}/{int(full.sum())}",
            "trimmed_rows_identical": f"{int(same[short].sum())}/{int(short.sum())}",
            "trimmed_max_abs_diff": float(np.abs(a[short] - b[short]).max()) if short.any() else 0.0,
            "trimmed_min_cosine": round(float(cos[short].min()), 8) if short.any() else 1.0,
            "max_abs_value": float(np.abs(a).max()),
            "float16_storage_rows_identical": f"{int(f16.sum())}/{len(a)}",
            "float16_storage_max_abs_diff": float(np.abs(a.astype(np.float16).astype(np.float32)
                                                         - b.astype(np.float16).astype(np.float32)).max())}


def measure(encoders: dict, rows: np.ndarray, batch_size: int, exact_rows: int) -> dict:
    from models.encoder import row_lengths

    lengths = row_lengths(rows, 0)
    full = lengths == CHUNK
    plain_positions = len(rows) * (CHUNK + 1)
    from models.encoder import plan_length_batches

    grouped_positions = sum(len(b.rows) * (b.width + 1) for b in plan_length_batches(lengths, CHUNK, batch_size))
    result = {"rows": len(rows), "full_rows": int(full.sum()),
              "padding_fraction": round(1 - float(lengths.sum()) / (CHUNK * len(rows)), 4),
              "positions_computed_grouped_vs_plain": round(grouped_positions / plain_positions, 4)}
    for name, enc in encoders.items():
        sub = rows if name == "auto" else rows[:exact_rows]  # float32 is slow: its exactness on a prefix
        t_plain, a = timed(plain, enc, sub, batch_size)
        t_grouped, b = timed(enc.embed_rows, sub, batch_size)
        entry = {"compute_dtype": str(enc.dtype).removeprefix("torch."), "rows": len(sub),
                 "plain_chunks_per_s": round(len(sub) / t_plain, 1), "grouped_chunks_per_s": round(len(sub) / t_grouped, 1),
                 "speedup": round(t_plain / t_grouped, 2)}
        result[name] = entry | compare(a, b, full[:len(sub)])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="chunk rows per set")
    ap.add_argument("--exact-rows", type=int, default=500, help="rows of the float32 comparison (a prefix)")
    ap.add_argument("--batch-size", type=int, default=256, help="the build's --embed-batch-size default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from models.encoder import ChunkEncoder, EncoderConfig
    from pipelines.text.tokenizer import default_encoder_path

    torch.set_num_threads(a.threads)
    encoders = {name: ChunkEncoder(EncoderConfig(default_encoder_path(), compute_dtype=name, device="cpu"))
                for name in ("auto", "float32")}
    encoders["auto"].embed(chunk_rows(False, 8))  # warm-up: first-call allocations are not the loop's
    result = {"batch_size": a.batch_size, "threads": a.threads,
              "speeches": measure(encoders, chunk_rows(True, a.rows), a.batch_size, a.exact_rows),
              "plays": measure(encoders, chunk_rows(False, a.rows), a.batch_size, a.exact_rows)}
    write_result(result, a.json)


if __name__ == "__main__":
    main()
