"""Training throughput (forward + backward + AdamW step) of models/retro.py vs RETRO-pytorch's model, on CPU.

Command (from the repository root; the seed side needs its own venv, see below):

    .venv/bin/python benchmarks/retro_model_speed.py --seed-python /tmp/seedvenv/bin/python \
        --out benchmarks/results/retro_model_speed.json

Seed venv (RETRO-pytorch 0.3.9 with the same torch; only its model module is imported, so its retrieval
dependencies (autofaiss, transformers, ...) are not needed):

    python3 -m venv /tmp/seedvenv
    /tmp/seedvenv/bin/pip install torch==2.13.0
    /tmp/seedvenv/bin/pip install retro-pytorch==0.3.9 --no-deps
    /tmp/seedvenv/bin/pip install einops "numpy<2"

Both models get the RETRO-pytorch README sizes (enc_dim 896, enc_depth 2, dec_dim 796, heads 8, dim_head 64,
chunk_size 64, vocabulary 30522) cut to seq_len 512 and 4 decoder layers. The README puts CCA at every
third of its 12 layers, ending at the last (3, 6, 9, 12); with 4 layers we keep "evenly spaced, ending at
the last layer" with two CCA layers: (2, 4). Batch 2, 2 neighbors of 2 * 64 tokens per chunk, dropout 0,
the same AdamW (fused, lr 1e-4) and the same torch thread count on both sides.

The machine is shared with other jobs, so step times swing by 2-5x. Workers run with OMP_WAIT_POLICY=PASSIVE
(both sides alike): with spinning OpenMP threads, a thread that waits on a descheduled peer burns the core
and a busy machine makes steps 2-3x slower. Each variant runs in its own
long-lived subprocess (built and warmed up once); the benchmark then runs rounds, and each round times one
step of every variant, back to back and never two at once. The speedups are the median over rounds of the
paired ratio seed_step / our_step within a round (steps close in time see like load); tokens/s from the
median and the best step are reported too. Variants (SIDE[-ATTN_IMPL]_PRECISION), by default: ours under
bf16 autocast (how it is meant to train here) with SDPA attention (the config default) and with
attn_impl="matmul" (faster on CPU), and the seed in float32 (its default: the baseline). Add seed_bf16 (the
seed under bf16 autocast: like for like) and ours_fp32 with --variants; each worker holds about 3 GB.
Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

SIZES = dict(num_tokens=30522, enc_dim=896, enc_depth=2, dec_dim=796, heads=8, dim_head=64, chunk_size=64)


def _build_ours(seq_len: int, dec_depth: int, cca: tuple[int, ...], attn_impl: str = "sdpa"):
    sys.path.insert(0, str(REPO))
    from models.retro import RETRO, retro_config

    cfg = retro_config("readme", max_seq_len=seq_len, dec_depth=dec_depth, dec_cross_attn_layers=cca,
                       dec_attn_dropout=0.0, dec_ff_dropout=0.0, attn_impl=attn_impl)
    return RETRO(cfg)


def _build_seed(seq_len: int, dec_depth: int, cca: tuple[int, ...], attn_impl: str = ""):
    """RETRO-pytorch's RETRO class, imported without running its package __init__ (which needs faiss etc.)."""
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("retro_pytorch is not installed in this interpreter")
    pkg = types.ModuleType("retro_pytorch")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["retro_pytorch"] = pkg
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.BERT_VOCAB_SIZE = 28996  # only a default argument of RETRO; we pass num_tokens
    sys.modules["retro_pytorch.retrieval"] = retrieval
    from retro_pytorch.retro_pytorch import RETRO

    return RETRO(max_seq_len=seq_len, dec_depth=dec_depth, dec_cross_attn_layers=cca, **SIZES)


def serve(args: argparse.Namespace) -> None:
    """Worker process: build one model, then run one timed training step per "step" line on stdin."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cca = tuple(int(x) for x in args.cca.split(","))
    build = _build_ours if args.side == "ours" else _build_seed
    model = build(args.seq_len, args.dec_depth, cca, args.attn_impl).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    c = SIZES["chunk_size"]
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, SIZES["num_tokens"], (args.batch, args.seq_len + 1), generator=g)  # (b, n+1)
    retrieved = torch.randint(1, SIZES["num_tokens"], (args.batch, args.seq_len // c, args.neighbors, 2 * c),
                              generator=g)  # (b, n/c, k, 2c)
    use_bf16 = args.precision == "bf16"

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(seq, retrieved, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True, "params": params}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        print(json.dumps({"step_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "loss": loss}),
              flush=True)


class Worker:
    """A serving subprocess for one (side, precision); steps run one at a time, never two at once."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        side, precision = name.split("_")
        side, _, impl = side.partition("-")
        python = sys.executable if side == "ours" else args.seed_python
        cmd = [python, str(Path(__file__).resolve()), "--side", side, "--precision", precision,
               "--attn-impl", impl or "sdpa",
               "--threads", str(args.threads), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
               "--neighbors", str(args.neighbors), "--dec-depth", str(args.dec_depth), "--cca", args.cca,
               "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": args.omp_wait_policy}
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=REPO)
        self.params = self._read()["params"]
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.times.append(reply["step_s"])
        self.cpu_times.append(reply["cpu_s"])
        return reply["step_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed-python", default="/tmp/seedvenv/bin/python",
                   help="python of a venv with retro-pytorch and the same torch")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/retro_model_speed.json"))
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--neighbors", type=int, default=2)
    p.add_argument("--dec-depth", type=int, default=4)
    p.add_argument("--cca", default="2,4", help="1-based decoder layers with chunked cross-attention")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"),
                   help="OpenMP idle threads sleep (PASSIVE) or spin; on a busy machine spinning on a "
                        "descheduled peer costs 2-3x")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each times one step of every variant")
    p.add_argument("--variants", default="ours_bf16,ours-matmul_bf16,seed_fp32",
                   help="comma-separated SIDE[-ATTN_IMPL]_PRECISION: ours|seed, sdpa|matmul, bf16|fp32; each "
                        "worker holds about 3 GB; also useful: seed_bf16, ours_fp32")
    p.add_argument("--side", choices=("ours", "seed"), help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--attn-impl", choices=("sdpa", "matmul"), default="sdpa", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side:  # worker subprocess
        serve(args)
        return

    names = args.variants.split(",")
    workers: dict[str, Worker] = {}
    try:
        for name in names:  # built one after the other; each warms up before the next starts
            workers[name] = Worker(args, name)
        for r in range(args.rounds):
            line = " ".join(f"{n}={workers[n].step():.2f}s" for n in names)
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()

    tokens = args.batch * args.seq_len

    def summary(w: Worker) -> dict:
        return {"tokens_per_s_median": round(tokens / statistics.median(w.times), 1),
                "tokens_per_s_best": round(tokens / min(w.times), 1),
                "step_s": [round(t, 3) for t in w.times], "cpu_s": [round(t, 3) for t in w.cpu_times],
                "params": w.params}

    def paired(a: str, b: str, cpu: bool = False) -> Optional[float]:
        """Median over rounds of time(b) / time(a): steps of one round ran back to back, under like load."""
        if a not in workers or b not in workers:
            return None
        ta, tb = ((workers[x].cpu_times if cpu else workers[x].times) for x in (a, b))
        return round(statistics.median(y / x for x, y in zip(ta, tb)), 2)

    result = {
        "benchmark": "retro_model_speed",
        "what": "training tokens/s (forward + backward + fused AdamW step) on CPU, ours vs RETRO-pytorch 0.3.9",
        "command": "python benchmarks/retro_model_speed.py --seed-python /tmp/seedvenv/bin/python",
        "config": {**SIZES, "seq_len": args.seq_len, "dec_depth": args.dec_depth,
                   "dec_cross_attn_layers": [int(x) for x in args.cca.split(",")], "batch": args.batch,
                   "neighbors": args.neighbors, "dropout": 0.0, "threads": args.threads,
                   "rounds": args.rounds, "warmup": args.warmup, "omp_wait_policy": args.omp_wait_policy},
        "speedup_ours_bf16_vs_seed_fp32": paired("ours_bf16", "seed_fp32"),
        "speedup_ours_bf16_vs_seed_bf16": paired("ours_bf16", "seed_bf16"),
        "speedup_ours_matmul_bf16_vs_seed_fp32": paired("ours-matmul_bf16", "seed_fp32"),
        "speedup_ours_matmul_bf16_vs_seed_bf16": paired("ours-matmul_bf16", "seed_bf16"),
        "speedup_ours_fp32_vs_seed_fp32": paired("ours_fp32", "seed_fp32"),
        "speedup_cpu_time_ours_bf16_vs_seed_fp32": paired("ours_bf16", "seed_fp32", cpu=True),
        "speedup_cpu_time_ours_matmul_bf16_vs_seed_fp32": paired("ours-matmul_bf16", "seed_fp32", cpu=True),
        "speedup_note": "median over rounds of the paired step-time ratio (seed / ours) within each round; "
                        "speedup_cpu_time_* use process CPU time (less sensitive to other jobs taking the cores)",
        "variants": {n: summary(w) for n, w in workers.items()},
    }
    import torch

    result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "loadavg_at_end": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
