"""Does the memory help on long real documents? Train a small Memorizing Transformer briefly on CPU over whole
Shakespeare plays (each play one document of ~30-45k tokens, streamed in 256-token segments), then compare the
loss on held-out plays with the memories (XL + kNN), with none, and with the XL memory only.
Writes benchmarks/results/memorizing_quality.json and memorizing_quality.png.

    .venv/bin/python benchmarks/memorizing_quality.py      # about 7 minutes on 2 cores

``--knn-backend ivf`` (or ``faiss``) runs the same training with the kNN memory on its IVF search from 1,024
entries per row on (the memory holds 4,096), to compare the approximate search with the exact one; results go
to ``memorizing_quality_<backend>.json``/``.png``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from retro_bench_common import PAIRS, build, plot, ray_up, save, timed_run

EXTRA = ["as_you_like_it_gut.txt", "coriolanus_gut.txt", "cymbeline_gut.txt", "henry_v_gut.txt",
         "merchant_of_venice_gut.txt", "much_ado_about_nothing_gut.txt", "richard_ii_gut.txt", "winters_tale_gut.txt"]
MODEL = ["dim=128", "depth=4", "heads=4", "dim_head=32", "ff_mult=4", "memorizing_layers=(3,)",
         "xl_memory_layers=(2, 3)", "xl_max_memories=256", "max_knn_memories=4096", "num_retrieved_memories=32",
         "rel_pos_num_buckets=32", "rel_pos_max_distance=128", "pkm_layers=()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/retroforge-bench")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--knn-backend", choices=("exact", "ivf", "faiss"), default="exact")
    args = ap.parse_args()
    model = MODEL + [f"knn_backend='{args.knn_backend}'"]
    if args.knn_backend != "exact":
        model.append("knn_faiss_min_entries=1024")
    name = "memorizing_quality" if args.knn_backend == "exact" else f"memorizing_quality_{args.knn_backend}"

    work = Path(args.work)
    files = [pair[0] for pair in PAIRS] + EXTRA  # one edition each: 17 plays
    ray_up()
    data, build_s = build(work, files, chunk_size=64, seq_len=2048, stages="tokenize")
    out = work / f"{name}_run"
    shutil.rmtree(out, ignore_errors=True)
    from jobs.train_memorizing import main as train

    cmd = ["--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--num-workers", "2", "--seq-len", "256", "--lr", "2e-3",
           "--warmup-steps", "20", "--eval-every", str(args.eval_every), "--eval-fraction", "0.15",
           "--eval-docs", "4", "--eval-segments", "24", "--log-every", "5", "--checkpoint-every", str(args.steps),
           "--vocab", "corpus"]
    cmd += [a for o in model for a in ("--override", o)]
    train_s, tr, ev = timed_run(train, cmd, out)
    last = ev[-1]
    keys = ("eval_loss", "eval_loss_no_memory", "eval_loss_no_knn")
    result = {
        "benchmark": name,
        "command": "python -m jobs.train_memorizing " + " ".join(cmd),
        "corpus": f"{len(files)} Shakespeare plays, one document each",
        "build_seconds": round(build_s, 1),
        "train_seconds": round(train_s, 1),
        "steps": args.steps,
        "global_batch": args.batch_size,
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in tr)[len(tr) // 2],
        "eval_steps": [r["step"] for r in ev],
        **{k: [round(r[k], 4) for r in ev] for k in keys},
        "eval_tokens": last["eval_tokens"],
        "final": {**{k: round(last[k], 4) for k in keys},
                  "gap_no_memory_minus_memory": round(last["eval_loss_no_memory"] - last["eval_loss"], 4),
                  "gap_no_knn_minus_memory": round(last["eval_loss_no_knn"] - last["eval_loss"], 4)},
        "train_loss": {"steps": [r["step"] for r in tr], "loss": [round(r["loss"], 4) for r in tr]},
    }
    save(name, result)
    plot(name, f"Memorizing Transformer on {len(files)} plays: held-out loss ({args.steps} steps, CPU, "
         f"kNN {args.knn_backend})", [
        ("train loss (with memory)", result["train_loss"]["steps"], result["train_loss"]["loss"], "-"),
        ("eval, XL + kNN memory", result["eval_steps"], result["eval_loss"], "o-"),
        ("eval, XL memory only", result["eval_steps"], result["eval_loss_no_knn"], "^:"),
        ("eval, no memory", result["eval_steps"], result["eval_loss_no_memory"], "s--"),
    ])


if __name__ == "__main__":
    main()
