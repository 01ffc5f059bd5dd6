"""Can int8 embed faster than bfloat16 on this CPU at float32 quality? (issue 20)

    .venv/bin/python benchmarks/int8_encoder.py [--chunks 1024] [--reps 3] \\
        [--json benchmarks/results/int8_encoder.json]

The candidate: every Linear of the packaged MiniLM's encoder layers in int8 with per-output-channel
weight scales and per-token dynamic activation scales (``torch._int_mm``, VNNI int8 x int8 -> int32),
optionally with SmoothQuant's per-channel smoothing (activation outliers moved into the weights,
calibrated on 128 chunks that the quality figures do not use). PyTorch's own ``quantize_dynamic``
(per-tensor activations) reached only cosine 0.86 here; per-token scales keep the outliers of one token
from flattening every other token. Reports, in one run on real Shakespeare chunks:

- chunks/s of the float32, bfloat16 and int8 encoders (interleaved repetitions, median), batch 256;
- cosine of each embedding to float32 (mean, min) and neighbors recall@2 against float32's exact neighbors;
- the CPU's matmul peaks (float32, bfloat16, int8 ``_int_mm``) at the encoder's FFN shape, and the
  fraction of its dtype's peak each encoder reaches (MiniLM: about 1.4 GFLOP per 65-token chunk).
The prototype lives here, not in models/, until it beats bfloat16.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_util import write_result  # noqa: E402

GFLOP_PER_CHUNK = 1.4  # MiniLM-L6 over 65 positions: 2 x 22M parameters x 65 tokens, roughly
BATCH = 256


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with int8 operands: W per output channel, x per token (row), int32 accumulation."""

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor | None):
        super().__init__()
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
        self.inv_smooth = None if smooth is None else 1.0 / smooth
        self.w_scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.w_q = torch.round(w / self.w_scale[:, None]).to(torch.int8).t().contiguous()
        self.bias = linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        x_scale = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        x_q = torch.round(x / x_scale).to(torch.int8)
        rows = x_q.shape[0]
        if rows <= 16:  # _int_mm wants more than 16 rows
            x_q = torch.cat([x_q, torch.zeros(17 - rows, x_q.shape[1], dtype=torch.int8)])
        y = torch._int_mm(x_q, self.w_q)[:rows].float() * x_scale * self.w_scale + self.bias
        return y.reshape(*shape[:-1], -1).to(dtype)


def quantize(encoder, calibration: np.ndarray, alpha: float | None) -> None:
    """Swap the encoder layers' Linears for Int8Linear, smoothing with ``alpha`` (None: no smoothing)."""
    linears = {name: m for name, m in encoder.model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}"}
    peaks: dict[str, torch.Tensor] = {}
    if alpha is not None:
        def record(name):
            def hook(_module, inputs, _output):
                a = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
                peaks[name] = torch.maximum(peaks[name], a) if name in peaks else a
            return hook
        hooks = [m.register_forward_hook(record(n)) for n, m in linears.items()]
        encoder.embed(calibration)
        for h in hooks:
            h.remove()
    for name, linear in linears.items():
        parent, _, child = name.rpartition(".")
        smooth = None
        if alpha is not None:
            w_peak = linear.weight.detach().float().abs().amax(0).clamp(min=1e-5)
            smooth = (peaks[name].clamp(min=1e-5) ** alpha / w_peak ** (1 - alpha)).clamp(min=1e-5)
        setattr(encoder.model.get_submodule(parent), child, Int8Linear(linear, smooth))


def real_chunks(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (n, 65), doc id (n,)) cut from the bundled plays with the packaged tokenizer."""
    from pipelines.stages.build_config import bundled_corpus
    from pipelines.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rows, docs = [], []
    for doc, name in enumerate(sorted(os.listdir(bundled_corpus()))):
        ids = tok.tokenizer.encode(open(os.path.join(bundled_corpus(), name), encoding="utf-8").read(),
                                   add_special_tokens=False).ids
        for start in range(0, len(ids) - 65, 64 * 7):  # every 7th chunk: many plays, not one
            rows.append(ids[start:start + 65])
            docs.append(doc)
            if len(rows) == n:
                return np.asarray(rows, np.int64), np.asarray(docs)
    return np.asarray(rows, np.int64), np.asarray(docs)


def exact_top2(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :2]


def matmul_peaks(reps: int = 5) -> dict:
    """GFLOP/s (GOP/s for int8) of one FFN-shaped product: (256 x 65 tokens) x 384 x 1536."""
    m, k, n = BATCH * 65, 384, 1536
    out = {}
    for name, a, b, f in [
        ("float32", torch.randn(m, k), torch.randn(k, n), torch.matmul),
        ("bfloat16", torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16), torch.matmul),
        ("int8", torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (k, n), dtype=torch.int8),
         torch._int_mm),
    ]:
        f(a, b)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b)
            times.append(time.perf_counter() - t)
        out[name] = round(2 * m * k * n / float(np.median(times)) / 1e9, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=1024, help="real chunks embedded per encoder and repetition")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (the median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from models.encoder import ChunkEncoder, EncoderConfig
    from pipelines.text.tokenizer import resolve_model_path

    path = resolve_model_path("packaged:all-MiniLM-L6-v2")
    tokens, _ = real_chunks(args.chunks + 128)
    calibration, tokens = tokens[:128], tokens[128:]
    encoders = {"float32": ChunkEncoder(EncoderConfig(path, compute_dtype="float32")),
                "bfloat16": ChunkEncoder(EncoderConfig(path, compute_dtype="bfloat16"))}
    for label, dtype, alpha in [("int8", "float32", None), ("int8_smooth", "float32", 0.7),
                                ("int8_smooth_bf16_activations", "bfloat16", 0.7)]:
        encoders[label] = ChunkEncoder(EncoderConfig(path, compute_dtype=dtype))
        quantize(encoders[label], calibration, alpha)

    def embed(enc) -> np.ndarray:
        return np.concatenate([enc.embed(tokens[i:i + BATCH]) for i in range(0, len(tokens), BATCH)])

    rates: dict[str, list[float]] = {name: [] for name in encoders}
    vectors = {name: embed(enc) for name, enc in encoders.items()}  # warm-up, and the quality figures
    for _ in range(args.reps):
        for name, enc in encoders.items():
            t = time.perf_counter()
            embed(enc)
            rates[name].append(len(tokens) / (time.perf_counter() - t))
    peaks = matmul_peaks()
    ref = vectors["float32"]
    ref_top = exact_top2(ref)
    result = {"chunks": len(tokens), "threads": args.threads, "batch": BATCH, "matmul_peak_gflops": peaks,
              "encoders": {}}
    for name, x in vectors.items():
        cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
        top = exact_top2(x)
        recall = float(np.mean([len(set(a) & set(b)) / 2 for a, b in zip(top, ref_top)]))
        rate = float(np.median(rates[name]))
        peak = peaks["int8" if name.startswith("int8") else name]
        result["encoders"][name] = {"chunks_per_s": round(rate, 1), "cosine_mean": round(float(cos.mean()), 5),
                                    "cosine_min": round(float(cos.min()), 5), "recall_at_2_vs_float32": recall,
                                    "fraction_of_peak": round(rate * GFLOP_PER_CHUNK / peak, 3)}
    result["int8_vs_bfloat16_speed"] = round(result["encoders"]["int8_smooth"]["chunks_per_s"]
                                             / result["encoders"]["bfloat16"]["chunks_per_s"], 3)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
