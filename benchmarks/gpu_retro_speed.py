"""RETRO training and generation speed on one device (made for one GPU): ours eager and compiled, against
RETRO-pytorch 0.3.9 when it is importable, as tokens/s and as a fraction of the measured bf16 matmul peak.

Commands (from the repository root):

    python benchmarks/gpu_retro_speed.py --device cuda            # the issue's table on a GPU
    python benchmarks/gpu_retro_speed.py --device cpu --small     # toy sizes: checks the script runs

Rows (full size, issue 18): the seed's size (README widths, seq 512, 4 decoder layers with CCA at (2, 4),
batch 2), the README size (seq 2048, 12 layers, batch 8) and ``paper_172m`` (seq 2048, batch 8 and 32);
always 2 neighbors of 2 * 64 tokens per chunk, dropout 0, bf16 autocast, AdamW (fused on CUDA), random tokens.
Each row: ours eager, ours with ``compile_blocks()`` (torch.compile per block), and the seed in float32 and
under bf16 autocast (seed size and README size only). A step is forward + backward + optimizer step, with
the loss kept on the device (read once after the timed steps).

FLOPs per step: 6 x parameters x tokens (the issue's count) plus attention: 12 x layers x heads x dim_head x
keys per query token (PaLM's convention, full not causal context) for the decoder's self-attention (keys =
seq_len) and CCA (keys = 1 + k * 2c), and, per neighbor token (k * 2c / c of them per sequence token), the
encoder's self-attention (keys = 2c) and cross-attention (keys = c). The fraction of peak divides the achieved
FLOP/s by the bf16 matmul rate measured here (a large square matmul), not by a datasheet number.

Generation: greedy tokens/s for one sequence (bf16), from a one-chunk prompt, with the decoder's key/value
cache (``RETRO.extend``) and without it (``RETRO.next_token_logits`` over the whole prefix); neighbors are
random tokens handed over at chunk boundaries (retrieval itself is not timed).

Imports only torch, numpy and models/ (no Ray, no faiss). Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.gpu_timing import bf16_peak_tflops, device_main, sync  # noqa: E402
from models.retro import RETRO, RetroConfig, retro_config  # noqa: E402

NEIGHBORS = 2


def _rows(small: bool) -> list[dict[str, Any]]:
    """The table's rows: (name, preset overrides, seq_len, batch, whether RETRO-pytorch gets the same model)."""
    if small:
        tiny = dict(num_tokens=512, enc_dim=64, dec_dim=64, heads=2, dim_head=32, chunk_size=16)
        return [dict(name="small", preset="readme", overrides={**tiny, "dec_depth": 2, "dec_cross_attn_layers": (2,)},
                     seq_len=64, batch=2, seed=True)]
    return [
        dict(name="seed size: seq 512, 4 layers, batch 2", preset="readme",
             overrides={"dec_depth": 4, "dec_cross_attn_layers": (2, 4)}, seq_len=512, batch=2, seed=True),
        dict(name="README size: seq 2048, 12 layers, batch 8", preset="readme", overrides={}, seq_len=2048,
             batch=8, seed=True),
        dict(name="paper_172m: seq 2048, batch 8", preset="paper_172m", overrides={}, seq_len=2048, batch=8,
             seed=False),
        dict(name="paper_172m: seq 2048, batch 32", preset="paper_172m", overrides={}, seq_len=2048, batch=32,
             seed=False),
    ]


def _config(row: dict[str, Any]) -> RetroConfig:
    return retro_config(row["preset"], **{**row["overrides"], "max_seq_len": row["seq_len"],
                                          "dec_attn_dropout": 0.0, "dec_ff_dropout": 0.0})


def _seed_model(cfg: RetroConfig) -> Optional[torch.nn.Module]:
    """RETRO-pytorch's RETRO with the same sizes, its model module imported without its retrieval package
    (as benchmarks/retro_model_speed.py does); None when retro_pytorch is not installed."""
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    from benchmarks.retro_model_speed import _build_seed

    seed_pkg = sys.modules.get("retro_pytorch.retro_pytorch")
    if seed_pkg is None:
        _build_seed(cfg.max_seq_len, cfg.dec_depth, cfg.dec_cross_attn_layers)  # installs the module stubs
        seed_pkg = sys.modules["retro_pytorch.retro_pytorch"]
    return seed_pkg.RETRO(max_seq_len=cfg.max_seq_len, dec_depth=cfg.dec_depth,
                          dec_cross_attn_layers=cfg.dec_cross_attn_layers, num_tokens=cfg.num_tokens,
                          enc_dim=cfg.enc_dim, enc_depth=cfg.enc_depth, dec_dim=cfg.dec_dim, heads=cfg.heads,
                          dim_head=cfg.dim_head, chunk_size=cfg.chunk_size)


def flops_per_step(cfg: RetroConfig, params: int, batch: int, seq_len: int) -> dict[str, float]:
    """The issue's 6 x parameters x tokens, and the attention FLOPs on top (see the module docstring)."""
    tokens = batch * seq_len
    inner, c, L = cfg.heads * cfg.dim_head, cfg.chunk_size, 2 * cfg.chunk_size
    enc_cross = cfg.enc_depth if cfg.enc_cross_attn_layers is None else len(cfg.enc_cross_attn_layers)
    per_token = 12 * inner * (cfg.dec_depth * seq_len + len(cfg.dec_cross_attn_layers) * (1 + NEIGHBORS * L))
    per_token += (NEIGHBORS * L / c) * 12 * inner * (cfg.enc_depth * L + enc_cross * c)
    return {"dense": 6.0 * params * tokens, "attention": per_token * tokens}


def _batch(cfg: RetroConfig, batch: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c = cfg.chunk_size
    seq = torch.randint(1, cfg.num_tokens, (batch, seq_len + 1), generator=g)
    retrieved = torch.randint(1, cfg.num_tokens, (batch, seq_len // c, NEIGHBORS, 2 * c), generator=g)
    return seq.to(device), retrieved.to(device)


def train_tokens_per_s(model: torch.nn.Module, cfg: RetroConfig, batch: int, seq_len: int, device: torch.device,
                       *, bf16: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Training tokens/s of one model: warm-up steps (compilation happens there), then timed steps."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    seq, retrieved = _batch(cfg, batch, seq_len, device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"tokens_per_s": round(batch * seq_len * steps / seconds, 1), "step_s": round(seconds / steps, 4),
           "warmup_s": round(warm_s, 1), "loss": round(float(losses[-1]), 4)}
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def generation_tokens_per_s(model: RETRO, new_tokens: int, device: torch.device, *, cached: bool) -> float:
    """Greedy tokens/s for one sequence from a one-chunk prompt, neighbors given at every chunk boundary."""
    cfg, c = model.config, model.chunk_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg.num_tokens, (1, c), generator=g).to(device)
    table = torch.randint(1, cfg.num_tokens, (1, cfg.max_seq_len // c, NEIGHBORS, 2 * c), generator=g).to(device)
    model = model.to(device).eval()
    cache = model.new_cache() if cached else None
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(new_tokens):
            n = tokens.shape[1]
            ret = table[:, : n // c]
            if cached:
                logits = model.extend(cache, tokens[:, cache.length:], ret)
            else:
                logits = model.next_token_logits(tokens, ret)
            tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
    sync(device)
    return round(new_tokens / (time.perf_counter() - t0), 1)


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); an out-of-memory or compile failure becomes its row's error, not the run's end."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _ours(cfg: RetroConfig, row: dict[str, Any], dev: torch.device, *, compiled: bool, small: bool, steps: int,
          warmup: int, flops: dict[str, float], peak: float) -> dict[str, Any]:
    """Our model's training speed, eager or with compile_blocks(), and its fraction of the peak."""
    torch.manual_seed(0)
    model = RETRO(cfg)
    if compiled:  # --small: the same graphs without inductor's code generation (minutes on a CPU)
        model.compile_blocks(backend="aot_eager" if small else "inductor")
    got = train_tokens_per_s(model, cfg, row["batch"], row["seq_len"], dev, bf16=True, steps=steps,
                             warmup=warmup + (2 if compiled else 0))
    seconds = got["step_s"]
    got["tflops"] = round((flops["dense"] + flops["attention"]) / seconds / 1e12, 3)
    got["fraction_of_peak"] = round(got["tflops"] / peak, 3)
    got["fraction_of_peak_dense_only"] = round(flops["dense"] / seconds / 1e12 / peak, 3)
    return got


def _seed(cfg: RetroConfig, row: dict[str, Any], dev: torch.device, *, bf16: bool, steps: int,
          warmup: int) -> dict[str, Any]:
    """RETRO-pytorch's training speed with the same sizes (float32, or under bf16 autocast)."""
    torch.manual_seed(0)
    model = _seed_model(cfg)
    if model is None:
        return {"error": "retro_pytorch is not importable here"}
    return train_tokens_per_s(model, cfg, row["batch"], row["seq_len"], dev, bf16=bf16, steps=steps, warmup=warmup)


def run(device: str, small: bool) -> dict:
    """Measure every row of the table on one device.

    Args:
        device: a torch device name ("cuda", "cuda:0", "cpu").
        small: toy sizes and few steps (checks the script; figures mean nothing).

    Returns:
        The result as a JSON-able dict: the measured peak, per row ours eager/compiled and the seed's
        tokens/s with the fraction of peak, and generation tokens/s with and without the cache.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    steps, warmup = (2, 1) if small else (20, 5)
    peak = bf16_peak_tflops(dev, small)
    rows = []
    for row in _rows(small):
        cfg = _config(row)
        torch.manual_seed(0)
        params = sum(p.numel() for p in RETRO(cfg).parameters())
        flops = flops_per_step(cfg, params, row["batch"], row["seq_len"])
        out: dict[str, Any] = {"row": row["name"], "params": params, "seq_len": row["seq_len"], "batch": row["batch"],
                               "neighbors": NEIGHBORS, "flops_per_step": flops}
        for compiled in (False, True):
            out["ours_compiled_bf16" if compiled else "ours_eager_bf16"] = _guarded(
                _ours, cfg, row, dev, compiled=compiled, small=small, steps=steps, warmup=warmup, flops=flops,
                peak=peak)
        if row["seed"]:
            for precision in ("fp32", "bf16"):
                out[f"retro_pytorch_{precision}"] = _guarded(_seed, cfg, row, dev, bf16=precision == "bf16",
                                                             steps=steps, warmup=warmup)
            best = max(out[k].get("tokens_per_s", 0) for k in ("ours_eager_bf16", "ours_compiled_bf16"))
            seed_best = max(out[f"retro_pytorch_{p}"].get("tokens_per_s", 0) for p in ("fp32", "bf16"))
            out["speedup_ours_best_vs_retro_pytorch_best"] = round(best / seed_best, 2) if seed_best else None
        rows.append(out)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    gen_cfg = _config(_rows(small)[0] if small else _rows(False)[2])  # paper_172m at seq 2048 on full runs
    torch.manual_seed(0)
    gen_model = RETRO(gen_cfg)
    new_tokens = 3 * gen_cfg.chunk_size if small else 448
    generation = {"model": "small" if small else "paper_172m", "prompt_tokens": gen_cfg.chunk_size,
                  "new_tokens": new_tokens,
                  "cached_tokens_per_s": _guarded(generation_tokens_per_s, gen_model, new_tokens, dev, cached=True),
                  "uncached_tokens_per_s": _guarded(generation_tokens_per_s, gen_model, new_tokens, dev, cached=False)}
    return {
        "benchmark": "gpu_retro_speed",
        "what": "RETRO training tokens/s (forward + backward + AdamW, bf16 autocast) and fraction of the measured "
                "bf16 peak; ours eager and per-block compiled vs RETRO-pytorch 0.3.9; greedy generation tokens/s "
                "with and without the key/value cache",
        "device": device, "small": small, "steps": steps, "warmup": warmup,
        "compile_backend": "aot_eager" if small else "inductor",
        "measured_bf16_peak_tflops": round(peak, 1), "rows": rows, "generation": generation,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
    }


def main() -> None:
    device_main(run, __doc__.split("\n\n")[0], str(REPO / "benchmarks/results/gpu_retro_speed.json"))


if __name__ == "__main__":
    main()
