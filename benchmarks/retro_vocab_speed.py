"""What `--vocab corpus` buys: training tokens/s of the tiny RETRO with the tokenizer's whole 30,522-token output
vocabulary against only the token ids the build uses (renumbered), on the same build, in one run.

    .venv/bin/python benchmarks/retro_vocab_speed.py     # about 5 minutes on 2 cores once the build exists

The build is retro_quality's (5 play pairs, chunk_size 16, seq_len 128; made under --work and reused). Each
round trains both variants for --steps steps, one after the other (1 Ray Train worker, 2 threads, bf16
autocast, batch 8); a variant's figure is the median tokens/s of its steps after the first two. The ratio is
the median over rounds of corpus / full within a round (runs close in time see like load). Writes
benchmarks/results/retro_vocab_speed.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from retro_bench_common import PAIRS, build, ray_up, save, timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/retroforge-bench")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    work = Path(args.work)
    files = [f for pair in PAIRS[: args.pairs] for f in pair]
    ray_up()
    data, _ = build(work, files, chunk_size=16, seq_len=128)
    from jobs.train_retro import main as train

    per_round: list[dict[str, float]] = []
    commands = {}
    for r in range(args.rounds):
        got = {}
        for vocab in ("full", "corpus"):
            out = work / f"retro_vocab_{vocab}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", str(args.steps),
                   "--batch-size", "8", "--num-workers", "1", "--cpus-per-worker", "2", "--log-every", "1",
                   "--eval-every", "0", "--checkpoint-every", str(args.steps), "--eval-batches", "1", "--vocab", vocab]
            commands[vocab] = "python -m jobs.train_retro " + " ".join(cmd)
            _, rows, _ = timed_run(train, cmd, out)
            got[vocab] = float(np.median([row["tokens_per_s"] for row in rows[2:]]))
        per_round.append(got)
        print(f"round {r}: {got}", file=sys.stderr, flush=True)
    ratios = [g["corpus"] / g["full"] for g in per_round]
    save("retro_vocab_speed", {
        "benchmark": "retro_vocab_speed",
        "command": "python benchmarks/retro_vocab_speed.py " + " ".join(sys.argv[1:]),
        "build": str(data), "steps": args.steps, "rounds": per_round,
        "tokens_per_s_median": {v: round(float(np.median([g[v] for g in per_round])), 1) for v in ("full", "corpus")},
        "speedup_corpus_over_full": round(float(np.median(ratios)), 2),
        "commands": commands,
    })


if __name__ == "__main__":
    main()
