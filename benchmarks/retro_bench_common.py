"""Shared pieces of the training benchmarks (retro_quality, retro_scaling, memorizing_quality): a cached build
over Shakespeare plays, running a training job in-process, and curve plots.

Why cached: the build (tokenize, embed, index, neighbors) takes minutes on 2 cores; every benchmark reuses the
one under --work when its manifests exist (the build itself redoes nothing that is complete).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# plays whose two editions (modern and First Folio spelling) are both in the package
PAIRS = [("macbeth_gut.txt", "macbeth_gut_f.txt"), ("tempest_gut.txt", "tempest_gut_f.txt"),
         ("midsummer_nights_dream_gut.txt", "midsummer_nights_dreame_gut_f.txt"),
         ("julius_caesar_gut.txt", "julius_caesar_gut_f.txt"), ("twelfth_night_gut.txt", "twelfe-night_gut_f.txt"),
         ("hamlet_gut.txt", "hamlet_gut_f.txt"), ("othello_gut.txt", "othello_gut_f.txt"),
         ("lear_gut.txt", "lear_gut_f.txt"), ("romeo_and_juliet_gut.txt", "romeo_and_juliet_gut_f.txt")]


def texts_dir() -> Path:
    from pipelines.stages.build_config import bundled_corpus

    return Path(bundled_corpus())


def corpus(work: Path, files: list[str], name: str) -> Path:
    """A folder holding copies of the chosen plays (the build lists folders)."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (d / f).exists():
            shutil.copy(texts_dir() / f, d / f)
    return d


def build(work: Path, files: list[str], *, chunk_size: int, seq_len: int, stages: str = "", k: int = 2,
          unit_mb: float = 0.25) -> tuple[Path, float]:
    """(build folder, seconds) of a jobs.build_index build over ``files``; reused when complete. Small work
    units (``unit_mb``) give several parts, so both cores embed."""
    from pipelines.stages.build import run_build
    from pipelines.stages.build_config import BuildConfig

    out = work / f"build_c{chunk_size}_s{seq_len}_{len(files)}{'_' + stages.replace(',', '-') if stages else ''}"
    src = corpus(work, files, f"corpus_{len(files)}")
    start = time.perf_counter()
    code = run_build(BuildConfig(corpus=[str(src)], out=str(out), chunk_size=chunk_size, seq_len=seq_len,
                                 stages=stages, k=k, concurrency=2, unit_mb=unit_mb))
    if code:
        raise SystemExit(f"build failed with exit code {code}")
    return out, time.perf_counter() - start


def ray_up(num_cpus: int = 2) -> None:
    from pipelines.runtime.ray_session import init_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    init_ray(num_cpus=num_cpus)


def metrics(out: Path) -> list[dict]:
    from pipelines.train.metrics import read_metrics

    return read_metrics(str(out))


def timed_run(train, cmd: list[str], out: Path) -> tuple[float, list[dict], list[dict]]:
    """Run a training job's ``main(cmd)`` in-process: (seconds, its train rows, its eval rows)."""
    start = time.perf_counter()
    if train(cmd) != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    seconds = time.perf_counter() - start
    rows = metrics(out)
    return seconds, [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def plot(name: str, title: str, series: list[tuple[str, list[float], list[float], str]], ylabel: str = "loss (nats/token)") -> Path:
    """One PNG with a line per (label, steps, values, style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=label, linewidth=1.6, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
