"""PKM forward+backward speed: models/pkm.py vs a minimal re-implementation of the seed's layer.

Command (from the repository root):

    .venv/bin/python benchmarks/pkm_speed.py > benchmarks/results/pkm_speed.json

Both layers get the same shape (dim 512, 256 keys, top 32, 4 heads, dim_head 128, input (4, 512, 512)),
the same precision (float32 parameters, bfloat16 autocast by default, as training runs here) and the same
training-step pattern (``zero_grad(set_to_none=True)``, forward, ``loss.backward()``). They alternate
within one run so that machine noise hits both; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pkm import PKMConfig, ProductKeyMemory  # noqa: E402


class SeedPKM(nn.Module):
    """The seed's PKM forward (product_key_memory.py, default options), re-written without einops."""

    def __init__(self, dim: int, heads: int = 4, num_keys: int = 128, topk: int = 32, dim_head: int = 128):
        super().__init__()
        self.topk, self.heads, self.num_keys, self.dim_head = topk, heads, num_keys, dim_head
        self.to_queries = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.norm = nn.LayerNorm(dim_head)
        self.keys = nn.Parameter(torch.randn(heads, num_keys, 2, dim_head) / math.sqrt(dim_head))
        self.values = nn.EmbeddingBag(num_keys**2, dim, mode="sum")
        nn.init.normal_(self.values.weight, std=1 / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, d, k = self.heads, self.dim_head, self.topk
        q = self.to_queries(x)  # b t (p h d)
        q = q.view(b, t, 2, h, d).permute(0, 2, 3, 1, 4).reshape(b * 2 * h, t, d)  # (b p h) t d
        q = self.norm(q)
        q = q.view(b, 2, h, t, d).permute(1, 0, 3, 2, 4)  # p b t h d
        dots = torch.einsum("pbthd,hnpd->bthpn", q, self.keys)
        scores, indices = dots.topk(k=k, dim=-1)
        (sx, sy), (ix, iy) = scores.chunk(2, dim=3), indices.chunk(2, dim=3)
        all_scores = (sx[..., :, None] + sy[..., None, :]).reshape(b, t, h, k * k)
        all_indices = (ix[..., :, None] * self.num_keys + iy[..., None, :]).reshape(b, t, h, k * k)
        final_topk, final_indices = all_scores.topk(k, dim=-1)
        value_indices = all_indices.gather(-1, final_indices)
        attn = final_topk.softmax(dim=-1)
        value_indices = value_indices.reshape(b * t, h * k)
        attn = attn.reshape(b * t, h * k)
        out = self.values(value_indices, per_sample_weights=attn.to(self.values.weight.dtype))
        return out.view(b, t, -1)


def step(layer: nn.Module, x: torch.Tensor, bf16: bool) -> None:
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    y.float().square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--num-keys", type=int, default=256)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    args = ap.parse_args()
    torch.manual_seed(0)
    bf16 = not args.fp32

    ours = ProductKeyMemory(args.dim, PKMConfig(num_keys=args.num_keys, topk=args.topk, heads=args.heads))
    seed = SeedPKM(args.dim, heads=args.heads, num_keys=args.num_keys, topk=args.topk, dim_head=ours.dim_head)
    x = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)

    times: dict[str, list[float]] = {"ours": [], "seed": []}
    layers = {"ours": ours, "seed": seed}
    for name, layer in layers.items():  # warm-up
        step(layer, x, bf16)
        step(layer, x, bf16)
    for _ in range(args.repeats):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            step(layer, x, bf16)
            times[name].append((time.perf_counter() - t0) * 1000)
    ours_ms = statistics.median(times["ours"])
    seed_ms = statistics.median(times["seed"])
    print(
        json.dumps(
            {
                "benchmark": "pkm_speed",
                "what": "PKM forward+backward per step (zero_grad(set_to_none), fwd, bwd), median ms",
                "shape": {"batch": args.batch, "seq": args.seq, "dim": args.dim, "num_keys": args.num_keys,
                          "topk": args.topk, "heads": args.heads, "dim_head": ours.dim_head},
                "autocast_bf16": bf16,
                "repeats": args.repeats,
                "ours_ms": round(ours_ms, 2),
                "seed_ms": round(seed_ms, 2),
                "speedup_seed_over_ours": round(seed_ms / ours_ms, 3),
                "ms_all": {k: [round(t, 1) for t in v] for k, v in times.items()},
                "seed_impl": "minimal re-implementation of product_key_memory.PKM forward (default options)",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
