"""Do 2 Ray Train workers learn like 1 at the same global batch? Train the same RETRO from the same seed on the
same build twice: 1 worker with 2 CPU threads, then 2 DDP workers (gloo) with 1 thread each, the global batch
fixed. The data order and the loss normalisation do not depend on the worker count (pipelines/train/common.py),
so the curves should agree up to float rounding (bf16 autocast, different matmul shapes and all-reduce order).
Writes benchmarks/results/retro_scaling.json and retro_scaling.png, with tokens/s of both.

    .venv/bin/python benchmarks/retro_scaling.py     # about 6 minutes on 2 cores once the build exists
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from retro_bench_common import PAIRS, build, metrics, plot, ray_up, save
from retro_quality import MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/retroforge-bench")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    work = Path(args.work)
    files = [f for pair in PAIRS[: args.pairs] for f in pair]
    ray_up()
    data, _ = build(work, files, chunk_size=16, seq_len=128)  # retro_quality's build
    from jobs.train_retro import main as train

    runs = {}
    for workers in (1, 2):
        out = work / f"retro_scaling_{workers}w"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--num-workers", str(workers),
               "--cpus-per-worker", str(2 // workers), "--lr", "2e-3", "--warmup-steps", "10", "--log-every", "1",
               "--eval-every", str(args.steps), "--eval-batches", "2", "--num-neighbors", "1", "--checkpoint-every", str(args.steps),
               "--seed", "7", "--vocab", "corpus"] + [a for o in MODEL for a in ("--override", o)]
        start = time.perf_counter()
        assert train(cmd) == 0
        rows = metrics(out)
        tr = [r for r in rows if r["kind"] == "train"]
        ev = [r for r in rows if r["kind"] == "eval"][-1]
        runs[workers] = {"command": "python -m jobs.train_retro " + " ".join(cmd),
                         "wall_seconds": round(time.perf_counter() - start, 1),
                         "steps": [r["step"] for r in tr], "loss": [r["loss"] for r in tr],
                         "tokens_per_s_median": round(float(np.median([r["tokens_per_s"] for r in tr[2:]])), 1),
                         "final_eval_loss": round(ev["eval_loss"], 5)}
    a, b = np.asarray(runs[1]["loss"]), np.asarray(runs[2]["loss"])
    diff = np.abs(a - b)
    drop = a[:5].mean() - a[-5:].mean()
    result = {
        "benchmark": "retro_scaling",
        "global_batch": args.batch_size,
        "steps": args.steps,
        "max_abs_loss_diff": round(float(diff.max()), 5),
        "mean_abs_loss_diff": round(float(diff.mean()), 5),
        "loss_drop_over_run": round(float(drop), 4),
        "diff_relative_to_drop": round(float(diff.max() / drop), 4),
        "final_eval_loss": {"1_worker": runs[1]["final_eval_loss"], "2_workers": runs[2]["final_eval_loss"]},
        "tokens_per_s_median": {"1_worker_x_2_threads": runs[1]["tokens_per_s_median"],
                                "2_workers_x_1_thread": runs[2]["tokens_per_s_median"]},
        "runs": {f"{w}_worker{'s' if w > 1 else ''}": {k: v for k, v in r.items() if k not in ("loss", "steps")}
                 for w, r in runs.items()},
        "loss_1_worker": [round(x, 5) for x in runs[1]["loss"]],
        "loss_2_workers": [round(x, 5) for x in runs[2]["loss"]],
    }
    save("retro_scaling", result)
    plot("retro_scaling", f"RETRO train loss, global batch {args.batch_size}: 1 vs 2 Ray Train workers", [
        ("1 worker (2 threads)", runs[1]["steps"], runs[1]["loss"], "-"),
        ("2 workers, DDP (1 thread each)", runs[2]["steps"], runs[2]["loss"], "--"),
    ])


if __name__ == "__main__":
    main()
