"""What the GPU benchmarks share: device-synchronised timing, the measured bf16 matmul peak that their
"fraction of peak" figures divide by, and their command line. Imports only torch (the GPU machine has
no Ray or faiss)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bf16_peak_tflops(device: torch.device, small: bool) -> float:
    """Dense bf16 matmul TFLOP/s on this device: a loop of square products (8192 wide; 256 when small)."""
    n, loops = (256, 3) if small else (8192, 20)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def body() -> None:
        for _ in range(loops):
            torch.mm(a, b)

    return 2 * n ** 3 * loops / (time_ms(body, device, repeats=3 if small else 5) / 1000) / 1e12


def device_main(run: Callable[[str, bool], dict], description: str, default_json: str = "") -> None:
    """The command line of a GPU benchmark: ``--device``, ``--small`` (toy sizes: checks the script, on
    any device), ``--json`` (also write the result there; full-size runs only by default)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="toy sizes: seconds on a CPU, figures mean nothing")
    ap.add_argument("--json", default=default_json, help="also write the result here (not with --small)")
    args = ap.parse_args()
    result = run(args.device, args.small)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json and not args.small:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
