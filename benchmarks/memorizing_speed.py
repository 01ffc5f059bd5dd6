"""Memorizing Transformer training speed: models/memorizing.py vs the seed's model, same size, same run.

Command (from the repository root). The seed is the real PyPI package ``memorizing-transformers-pytorch``
(0.4.1), installed into a separate venv that also sees this project's venv:

    python -m venv /tmp/seedvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/seedvenv/lib/python3.11/site-packages/main.pth
    /tmp/seedvenv/bin/pip install --no-deps memorizing-transformers-pytorch einops einops-exts filelock
    /tmp/seedvenv/bin/python benchmarks/memorizing_speed.py > benchmarks/results/memorizing_speed.json

(``--no-seed`` measures ours alone with ``.venv/bin/python``.)

Both models have the seed README's shape on bytes: dim 512, depth 8, 8 heads of 64, memorizing layers
(4, 5) with 65,536 kNN memories per row and 32 retrieved, XL memory of 512 on layers (2, 3, 4, 5).
Each training step is one segment of 4 rows x 512 byte tokens (consecutive segments of a real text per row),
forward + backward + Adam (fused, the same for both). Ours trains under bfloat16 autocast, as it would on
this machine; the seed runs in float32, the only way it runs (its memory calls ``.numpy()`` on the queries,
which fails for bfloat16). ``ours_fp32`` shows how much of the gap is precision.

Two scenarios: ``empty`` (memories start empty, as in the first steps of training) and ``full`` (both
kNN memories prefilled with random unit keys to just below capacity before timing; the seed's memory would
reset itself past capacity, so the timed steps stop short of it). Steps of the models alternate, so machine
noise hits both; the ratio of median step times is the figure to read.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.memorizing import MemorizingConfig, MemorizingTransformer  # noqa: E402


def byte_stream(rows: int, length: int) -> torch.Tensor:
    """(rows, length) bytes of real text (Python's standard library sources), one stretch per row."""
    import argparse as m1
    import collections as m2
    import email.message as m3
    import json.decoder as m4
    import logging as m5
    import pathlib as m6
    import subprocess as m7
    import typing as m8
    import unittest.case as m9
    import urllib.request as m10
    text = "".join(inspect.getsource(m) for m in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10)).encode()
    need = rows * length
    text = (text * (need // len(text) + 1))[:need]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long().view(rows, length)


class Ours:
    def __init__(self, batch: int, bf16: bool):
        torch.manual_seed(0)
        self.model = MemorizingTransformer(MemorizingConfig.preset("readme")).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True)
        self.memory = self.model.create_memory(batch)
        self.bf16 = bf16

    def prefill(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        for mem in self.memory.knn:
            for s in range(0, n, 4096):
                m = min(4096, n - s)
                k = torch.nn.functional.normalize(torch.randn(mem.num_rows, m, 64, generator=g), dim=-1)
                mem.add(k, torch.randn(mem.num_rows, m, 64, generator=g))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(x, self.memory, labels=y).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


class Seed:
    def __init__(self, batch: int, tmp: str):
        from memorizing_transformers_pytorch import MemorizingTransformer as SeedModel

        torch.manual_seed(0)
        self.model = SeedModel(
            num_tokens=256, dim=512, dim_head=64, depth=8, memorizing_layers=(4, 5), max_knn_memories=65536,
            num_retrieved_memories=32, xl_memory_layers=(2, 3, 4, 5), xl_max_memories=512,
            knn_memories_directory=tmp,
        ).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True)
        self.ctx = self.model.knn_memories_context(batch_size=batch)
        self.knn = self.ctx.__enter__()
        self.xl = None

    def prefill(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        for mem in self.knn:
            for s in range(0, n, 4096):
                m = min(4096, n - s)
                k = torch.nn.functional.normalize(torch.randn(mem.num_indices, m, 64, generator=g), dim=-1)
                mem.add(torch.stack((k, torch.randn(mem.num_indices, m, 64, generator=g)), dim=2))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss, xl = self.model(x, knn_memories=self.knn, xl_memories=self.xl, labels=y)
        self.xl = [t.detach() for t in xl]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)


def run_scenario(name: str, runners: dict, data: torch.Tensor, warmup: int, steps: int, seq: int,
                 prefill: int) -> dict:
    for r in runners.values():
        if prefill:
            t0 = time.perf_counter()
            r.prefill(prefill)
            r.prefill_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in runners}
    losses: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + steps):
        seg = data[:, i * seq : (i + 1) * seq + 1]
        x, y = seg[:, :-1], seg[:, 1:]
        for key, r in runners.items():
            t0 = time.perf_counter()
            losses[key].append(r.step(x, y))
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[key].append(dt)
            print(f"[{name}] step {i} {key}: {dt:.2f}s", file=sys.stderr, flush=True)
    tokens = data.shape[0] * seq
    out = {"prefilled_entries_per_row": prefill, "warmup_steps": warmup, "timed_steps": steps}
    for key in runners:
        med = statistics.median(times[key])
        out[key] = {
            "tokens_per_s": round(tokens / med, 1),
            "step_s_median": round(med, 3),
            "step_s_all": [round(t, 2) for t in times[key]],
            "loss_first_last": [round(losses[key][0], 3), round(losses[key][-1], 3)],
        }
        if prefill:
            out[key]["prefill_s"] = round(runners[key].prefill_s, 1)
    if "seed" in runners:
        for key in runners:
            if key != "seed":
                out[f"speedup_{key}_vs_seed"] = round(out["seed"]["step_s_median"] / out[key]["step_s_median"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-seed", action="store_true")
    ap.add_argument("--no-fp32", action="store_true", help="skip the ours_fp32 variant")
    ap.add_argument("--scenarios", default="empty,full")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both models (default: torch's, one per core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total_steps = args.warmup + args.steps
    data = byte_stream(args.batch, total_steps * args.seq + 1)
    result = {
        "benchmark": "memorizing_speed",
        "what": "training tokens/s, one step = forward+backward+Adam on batch x seq byte tokens",
        "shape": "readme preset: dim 512, depth 8, heads 8 x 64, memorizing (4, 5), 65536 kNN memories, "
                 "32 retrieved, XL (2, 3, 4, 5) x 512, vocab 256",
        "batch": args.batch, "seq": args.seq,
        "ours": "models/memorizing.py, bfloat16 autocast (ours_fp32: float32)",
        "seed": "memorizing-transformers-pytorch 0.4.1 from PyPI (the seed), float32",
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for scen in args.scenarios.split(","):
            runners: dict = {"ours": Ours(args.batch, bf16=True)}
            if scen == "empty" and not args.no_fp32:
                runners["ours_fp32"] = Ours(args.batch, bf16=False)
            if not args.no_seed:
                runners["seed"] = Seed(args.batch, os.path.join(tmp, scen))
            prefill = 0 if scen == "empty" else 65536 - args.seq * (total_steps + 1)
            result["scenarios"][scen] = run_scenario(scen, runners, data, args.warmup, args.steps, args.seq, prefill)
            if "seed" in runners:
                runners["seed"].close()
            del runners
    result.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "machine": platform.machine(), "python": platform.python_version()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
