"""Embed-stage throughput: the whole stage on 2 CPUs against a minimal re-implementation of the
seed's loop (RETRO-pytorch chunks_to_embeddings_: Python loop, batch 16, float32), same chunks, one run.

    .venv/bin/python benchmarks/embed_throughput.py [--chunks 4096] [--seed-chunks 1024] \\
        [--json benchmarks/results/embed_throughput.json]

Ray's start-up (ray.init, starting the workers) is excluded; loading the encoder in each actor,
reading the parts and writing the embeddings are included. Also reports the minimum cosine
similarity of our (bfloat16) embeddings to the float32 seed's on the shared chunks. Prints JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_util import run_in_fresh_ray, write_result  # noqa: E402


def make_chunks(out: str, n_chunks: int) -> None:
    """Tokenize enough Shakespeare to give at least ``n_chunks`` chunks, in ~8 parts."""
    from pipelines.artifacts.storage import open_location
    from pipelines.runtime.ray_session import init_ray
    from pipelines.stages.build_config import bundled_corpus
    from pipelines.stages.tokenize import run_tokenize

    corpus = os.path.join(out, "corpus")
    os.makedirs(corpus)
    texts = sorted(os.listdir(bundled_corpus()))
    need = n_chunks * 64 * 4.5  # ~4.5 characters per token in these plays
    size = 0
    for name in texts:
        text = open(os.path.join(bundled_corpus(), name), encoding="utf-8").read()
        with open(os.path.join(corpus, name), "w", encoding="utf-8") as f:
            f.write(text)
        size += len(text)
        if size >= need:
            break
    init_ray(num_cpus=2)
    run_tokenize(corpus=[corpus], out=open_location(os.path.join(out, "build")), chunk_size=64, seq_len=2048,
                 text_field="text", tokenizer="packaged:all-MiniLM-L6-v2", unit_bytes=int(size / 8) + 1,
                 concurrency=2, config={})
    import ray

    ray.shutdown()


def seed_loop(tokens: np.ndarray, threads: int) -> tuple[float, np.ndarray]:
    """The seed's bert_embed loop: batch 16, float32, mask = ids != pad, mean over non-pad after [CLS]."""
    import torch
    from transformers import AutoModel

    from pipelines.text.tokenizer import default_encoder_path

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(default_encoder_path()).eval()
    out = []
    start = time.perf_counter()
    for i in range(0, len(tokens), 16):
        batch = torch.from_numpy(tokens[i:i + 16].astype(np.int64))
        batch = torch.cat([torch.full((len(batch), 1), 101), batch], dim=1)[:, :-1]
        mask = batch != 0
        with torch.no_grad():
            h = model(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        m = mask[:, 1:, None]
        out.append(((h[:, 1:] * m).sum(1) / (m.sum(1) + 1e-8)).numpy())
    return time.perf_counter() - start, np.concatenate(out)


def ours(build: str, cpus: int, cpus_per_worker: int) -> dict:
    body = f"""
from pipelines.stages.embed import run_embed
s = run_embed(out=open_location({build!r}), encoder="packaged:all-MiniLM-L6-v2", pooling="mean",
              embedding_dtype="float16", compute_dtype="auto", batch_size=256, concurrency={cpus // cpus_per_worker},
              cpus_per_worker={cpus_per_worker}, gpus_per_worker=0, allow_tokenizer_mismatch=False, config={{}})
print("RESULT", json.dumps({{"chunks": s.embedded_now, "seconds": round(s.seconds, 2),
                            "chunks_per_s": round(s.embedded_now / s.seconds, 1)}}))
"""
    return run_in_fresh_ray(body, cpus, "torch, transformers, pipelines.stages.embed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4096)
    ap.add_argument("--seed-chunks", type=int, default=1024, help="the seed is slow: time it on a prefix")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import shutil

    from pipelines.artifacts.storage import open_location
    from pipelines.stages.embed import read_chunk_tokens

    with tempfile.TemporaryDirectory() as d:
        make_chunks(d, a.chunks)
        build = os.path.join(d, "build")
        _, tokens = read_chunk_tokens(open_location(build), "part-00000.parquet")
        tokens = tokens[: a.seed_chunks]
        seed_s, seed_vecs = seed_loop(tokens, threads=2)
        result = {"seed_loop_2_threads": {"chunks": len(tokens), "seconds": round(seed_s, 2),
                                          "chunks_per_s": round(len(tokens) / seed_s, 1)}}
        result["ours_2_workers_x_1_cpu"] = ours(build, 2, 1)
        ours_vecs = np.load(os.path.join(build, "embeddings", "part-00000.npy"))[: len(tokens)].astype(np.float32)
        cos = (ours_vecs * seed_vecs).sum(1) / np.linalg.norm(ours_vecs, axis=1) / np.linalg.norm(seed_vecs, axis=1)
        shutil.rmtree(os.path.join(build, "embeddings"))
        result["ours_1_worker_x_2_cpus"] = ours(build, 2, 2)
    result["min_cosine_vs_float32_seed"] = round(float(cos.min()), 5)
    best = max(result["ours_2_workers_x_1_cpu"]["chunks_per_s"], result["ours_1_worker_x_2_cpus"]["chunks_per_s"])
    result["ratio_best_vs_seed"] = round(best / result["seed_loop_2_threads"]["chunks_per_s"], 2)
    write_result(result, a.json)


if __name__ == "__main__":
    main()
