"""GPU kernel speed (issue 19's table): the fused kNN search and the PKM value read against plain PyTorch.

Command (from the repository root, on a machine with a GPU; ``--small`` runs toy sizes on the CPU in
seconds, a smoke test of the script itself):

    .venv/bin/python benchmarks/gpu_kernels_speed.py --device cuda > benchmarks/results/gpu_kernels_speed.json

Measured, each a median over repeats after warm-up (the first call autotunes the Triton kernels):
  * kNN search, 4 rows x 65,536 entries, dim 64, 4,096 queries a row, top 32: ``matmul_topk`` (the fused
    kernel where it runs) in bf16 and fp32 against one plain ``bmm`` + ``topk`` over the whole shape, and
    ``KNNMemory.search`` end to end (bf16 and fp32 storage, exact backend) with the fraction of the bf16
    matmul peak that the fused search reaches (the peak measured here with a loop of large bf16 matmuls);
  * kNN memory add, 512 entries a row into the full memory;
  * PKM forward + backward under bf16 autocast at (4, 512, 512) and (32, 2048, 1024), 256 keys, top 32,
    4 heads: ours with the Triton value read, ours with ``F.embedding_bag``, and product-key-memory 0.3.0's
    ``PKM`` in float32 when it is installed (it fails under bf16 autocast).
Imports torch, triton (through models) and numpy only: it runs on a GPU machine without Ray or faiss.
"""
from __future__ import annotations

import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models.pkm as pkm_module  # noqa: E402
from benchmarks.gpu_timing import bf16_peak_tflops, device_main, time_ms  # noqa: E402
from models.knn_config import KNNMemoryConfig  # noqa: E402
from models.pkm import PKMConfig, ProductKeyMemory  # noqa: E402
from models.topk_matmul import matmul_topk  # noqa: E402
from models.triton_support import kernels_run_on  # noqa: E402


def knn_search(device: torch.device, rows: int, entries: int, dim: int, queries: int, k: int,
               repeats: int) -> dict:
    """Fused matmul + top-k vs plain bmm + topk over the whole (rows, queries, entries) score tensor."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q32 = torch.nn.functional.normalize(torch.randn(rows, queries, dim, generator=g), dim=-1).to(device)
    k32 = torch.nn.functional.normalize(torch.randn(rows, entries, dim, generator=g), dim=-1).to(device)
    out: dict = {"shape": {"rows": rows, "entries": entries, "dim": dim, "queries": queries, "k": k},
                 "fused_path": "triton" if kernels_run_on(device) else "reference (blockwise PyTorch)"}
    flops = 2 * rows * queries * entries * dim
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        q, keys = q32.to(dt), k32.to(dt)
        fused = time_ms(lambda q=q, keys=keys: matmul_topk(q, keys, k), device, repeats)
        plain = time_ms(lambda q=q, keys=keys: torch.bmm(q, keys.transpose(1, 2)).topk(k, dim=-1), device, repeats)
        out[f"fused_{name}_ms"] = round(fused, 3)
        out[f"plain_bmm_topk_{name}_ms"] = round(plain, 3)
        out[f"fused_{name}_tflops"] = round(flops / (fused / 1000) / 1e12, 4)
    return out


def knn_memory(device: torch.device, rows: int, entries: int, dim: int, queries: int, k: int, add: int,
               repeats: int) -> dict:
    """``KNNMemory`` end to end on ``device``: search of a full memory and an add (with FIFO eviction)."""
    from models.knn_memory import KNNMemory  # imports faiss when installed; runs without it

    out: dict = {}
    g = torch.Generator(device="cpu").manual_seed(1)
    for storage in ("bfloat16", "float32"):
        cfg = KNNMemoryConfig(dim=dim, capacity=entries, backend="exact", storage_dtype=storage,
                              exact_dtype=storage)
        mem = KNNMemory(rows, cfg, device=device)
        fill = torch.randn(rows, entries, dim, generator=g).to(device)
        mem.add(fill, fill)
        q = torch.randn(rows, queries, dim, generator=g).to(device)
        new = torch.randn(rows, add, dim, generator=g).to(device)
        out[f"search_{storage}_ms"] = round(time_ms(lambda mem=mem, q=q: mem.search(q, k), device, repeats), 3)
        out[f"add_{storage}_ms"] = round(time_ms(lambda mem=mem, new=new: mem.add(new, new), device, repeats), 3)
    return out


@contextmanager
def _embedding_bag_path() -> Iterator[None]:
    """Make the PKM layer read its values with ``F.embedding_bag`` (as without Triton)."""
    saved = pkm_module.kernels_run_on
    pkm_module.kernels_run_on = lambda device: False
    try:
        yield
    finally:
        pkm_module.kernels_run_on = saved


def pkm_step_ms(layer: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    """One training step of the layer alone: zero_grad, forward (bf16 autocast or not), backward."""
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.float().square().mean().backward()

    return time_ms(step, x.device, repeats)


def pkm(device: torch.device, batch: int, seq: int, dim: int, num_keys: int, topk: int, heads: int,
        repeats: int) -> dict:
    """PKM forward + backward: the Triton value read vs ``F.embedding_bag`` vs product-key-memory 0.3.0."""
    torch.manual_seed(0)
    ours = ProductKeyMemory(dim, PKMConfig(num_keys=num_keys, topk=topk, heads=heads)).to(device)
    x = torch.randn(batch, seq, dim, device=device, requires_grad=True)
    out: dict = {"shape": [batch, seq, dim], "num_keys": num_keys, "topk": topk, "heads": heads,
                 "value_read": "triton" if kernels_run_on(device) else "embedding_bag"}
    out["ours_bf16_autocast_ms"] = round(pkm_step_ms(ours, x, True, repeats), 3)
    with _embedding_bag_path():
        out["ours_embedding_bag_bf16_autocast_ms"] = round(pkm_step_ms(ours, x, True, repeats), 3)
    try:
        from product_key_memory import PKM
    except ImportError:
        out["seed"] = "product-key-memory not installed"
    else:
        seed = PKM(dim, heads=heads, num_keys=num_keys, topk=topk, dim_head=ours.dim_head).to(device)
        out["seed_fp32_ms"] = round(pkm_step_ms(seed, x, False, repeats), 3)
        out["speedup_seed_fp32_over_ours"] = round(out["seed_fp32_ms"] / out["ours_bf16_autocast_ms"], 2)
    return out


def run(device: str, small: bool) -> dict:
    """Measure the table on ``device``.

    Args:
        device: a torch device string ("cuda", "cpu").
        small: toy sizes that finish in seconds on a CPU (checks the script, measures nothing of note).

    Returns:
        The figures, JSON-serialisable.
    """
    dev = torch.device(device)
    repeats = 3 if small else 10
    if small:
        search = dict(rows=2, entries=512, dim=16, queries=64, k=8)
        pkm_shapes = [dict(batch=2, seq=16, dim=32, num_keys=16, topk=4, heads=2)]
    else:
        search = dict(rows=4, entries=65536, dim=64, queries=4096, k=32)
        pkm_shapes = [dict(batch=4, seq=512, dim=512, num_keys=256, topk=32, heads=4),
                      dict(batch=32, seq=2048, dim=1024, num_keys=256, topk=32, heads=4)]
    result: dict = {"benchmark": "gpu_kernels_speed", "device": device, "small": small}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    peak = bf16_peak_tflops(dev, small)
    result["bf16_matmul_peak_tflops"] = round(peak, 3)
    result["knn_search"] = knn_search(dev, repeats=repeats, **search)
    result["knn_search"]["fused_bf16_fraction_of_peak"] = round(result["knn_search"]["fused_bf16_tflops"] / peak, 4)
    result["knn_memory"] = knn_memory(dev, add=64 if small else 512, repeats=repeats, **search)
    result["pkm"] = [pkm(dev, repeats=repeats, **shape) for shape in pkm_shapes]
    result.update(torch=torch.__version__, cpus=os.cpu_count(), machine=platform.machine())
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    return result


def main() -> None:
    device_main(run, __doc__.splitlines()[0], "benchmarks/results/gpu_kernels_speed.json")


if __name__ == "__main__":
    main()
