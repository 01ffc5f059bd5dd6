"""RETRO's CPU training step, today's models/retro.py against a commit's, in pairs in one run: the check
that GPU work (issue 18) left the CPU path as fast as it was.

    .venv/bin/python benchmarks/retro_cpu_regression.py --before c2ad34c [--pairs 6] \\
        [--json benchmarks/results/retro_cpu_regression.json]

README-width model cut to 2 decoder layers at seq 256, batch 2, 2 neighbors, bf16 autocast, AdamW, 2
threads. Each pair times one step of each model back to back; the median old/new ratio is reported
(> 1: today's is faster), with both losses (equal when nothing but speed changed).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_util import write_result  # noqa: E402


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def retro_at(commit: str):
    text = subprocess.run(["git", "show", f"{commit}:models/retro.py"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_retro.py"
    path.write_text(text)
    return load_module(path, "old_retro")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit whose models/retro.py is compared")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import models.retro as new

    def build(mod):
        torch.manual_seed(0)
        cfg = mod.retro_config("readme", max_seq_len=256, dec_depth=2, dec_cross_attn_layers=(2,),
                               dec_attn_dropout=0.0, dec_ff_dropout=0.0)
        model = mod.RETRO(cfg).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, 30522, (2, 257), generator=g)
    retrieved = torch.randint(1, 30522, (2, 4, 2, 128), generator=g)
    models = {"before": build(retro_at(args.before)), "now": build(new)}

    def step(model, opt) -> tuple[float, float]:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(seq, retrieved, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t, float(loss)

    for pair in models.values():
        step(*pair)  # warm-up
    rows = []
    for _ in range(args.pairs):
        (t_old, l_old), (t_new, l_new) = step(*models["before"]), step(*models["now"])
        rows.append({"before_s": round(t_old, 4), "now_s": round(t_new, 4), "loss_before": l_old, "loss_now": l_new})
    write_result({"benchmark": "retro_cpu_regression", "before": args.before, "pairs": rows,
                  "median_before_over_now": round(statistics.median(r["before_s"] / r["now_s"] for r in rows), 3)},
                 args.json)


if __name__ == "__main__":
    main()
