"""The embed stage on a real local Ray instance with the real packaged encoder."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import open_location
from pipelines.stages.embed import read_chunk_tokens, run_embed
from pipelines.stages.tokenize import run_tokenize
from pipelines.text.tokenizer import default_encoder_path
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("ray_local")


def tokenize(corpus, out, tokenizer="packaged:all-MiniLM-L6-v2", unit_bytes=30_000):
    return run_tokenize(corpus=[str(corpus)], out=open_location(str(out)), chunk_size=64, seq_len=256, text_field="text",
                        tokenizer=tokenizer, unit_bytes=unit_bytes, concurrency=2, config={})


def embed(out, **kw):
    args = dict(encoder="packaged:all-MiniLM-L6-v2", pooling="mean", embedding_dtype="float16", compute_dtype="auto",
                batch_size=64, concurrency=2, cpus_per_worker=1, gpus_per_worker=0, allow_tokenizer_mismatch=False,
                config={})
    args.update(kw)
    return run_embed(out=open_location(str(out)), **args)


def load_embeddings(out) -> tuple[np.ndarray, np.ndarray]:
    m = read_manifest(open_location(str(out)), "embeddings")
    vecs = np.concatenate([np.load(os.path.join(out, "embeddings", p["path"])) for p in m["parts"]])
    ids = np.concatenate([pq.read_table(os.path.join(out, "embeddings", p["ids_path"]))["chunk_id"].to_numpy()
                          for p in m["parts"]])
    return ids, vecs


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, plays):
    """~500 chunks of real text in several parts, tokenized once for the module."""
    d = tmp_path_factory.mktemp("embed")
    corpus = d / "corpus"
    corpus.mkdir()
    for p in plays[:4]:
        (corpus / p.name).write_text(p.read_text()[:20_000])
    tokenize(corpus, d / "build", unit_bytes=20_000)
    embed(d / "build")
    return d


def copy_without_embeddings(small_build, dest):
    shutil.copytree(small_build / "build", dest, ignore=shutil.ignore_patterns("embeddings"))
    return dest


def reference_hidden(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent float32 run of the encoder on [CLS] + chunk: (last hidden state, attention mask)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(default_encoder_path()).eval()
    ids = torch.cat([torch.full((len(tokens), 1), 101), torch.from_numpy(tokens[:, :-1].astype(np.int64))], 1)
    mask = ids != 0
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return h.numpy(), mask.numpy()


def reference_fp32(tokens: np.ndarray) -> np.ndarray:
    """The seed's bert_embed read independently: mean of the last hidden state over non-pad tokens after [CLS]."""
    h, mask = reference_hidden(tokens)
    m = mask[:, 1:, None].astype(np.float32)
    return (h[:, 1:] * m).sum(1) / (m.sum(1) + 1e-8)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def stored_rows_by_chunk_id(out) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Sampled chunk ids from every chunks part (first rows and each part's last rows), their tokens, and the
    stored vector of each id found through the embeddings' own ids files (not by position)."""
    loc = open_location(str(out))
    ids, vecs = load_embeddings(out)
    row_of = {int(c): i for i, c in enumerate(ids)}
    chosen, tokens = [], []
    for part in read_manifest(loc, "chunks")["parts"]:
        chunk_ids, toks = read_chunk_tokens(loc, part["path"])
        pick = np.unique(np.r_[0:3, len(toks) - 2:len(toks)].clip(0, len(toks) - 1))
        chosen.append(chunk_ids[pick])
        tokens.append(toks[pick])
    chosen_ids = np.concatenate(chosen)
    return chosen_ids, np.concatenate(tokens), {c: vecs[row_of[int(c)]].astype(np.float32) for c in chosen_ids}


def test_embeddings_match_float32_reference_and_layout(small_build):
    out = small_build / "build"
    ids, vecs = load_embeddings(out)
    s = read_manifest(open_location(str(out)), "embeddings")["totals"]
    chunks = read_manifest(open_location(str(out)), "chunks")
    assert s["chunks"] == len(ids) == chunks["totals"]["chunks"] and vecs.dtype == np.float16 and vecs.shape[1] == 384
    assert (ids == np.arange(len(ids))).all()
    m = read_manifest(open_location(str(out)), "embeddings")
    assert m["dim"] == 384 and m["pooling"] == "mean" and m["tokenizer"]["fingerprint"] == chunks["tokenizer"]["fingerprint"]
    # rows of every part, including each part's last chunks (a document's short last chunk: padding matters there),
    # looked up by chunk id; the default bf16 compute + float16 storage stays as close to float32 as the
    # benchmark measures (benchmarks/results/embed_throughput.json: min cosine 0.99989)
    chosen, tokens, stored = stored_rows_by_chunk_id(out)
    assert len(chosen) >= 3 * len(chunks["parts"])
    cos = cosine(reference_fp32(tokens), np.stack([stored[int(c)] for c in chosen]))
    assert cos.min() >= 0.9995 and cos.mean() >= 0.9999, cos
    # the embedding-reader layout: numpy folder + ids metadata folder, read back row for row
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(out / "embeddings"), file_format="npy")
    assert reader.count == len(ids) and reader.dimension == 384
    again = embed(out)
    assert again.up_to_date


def test_float32_paths_equal_the_float32_reference(small_build, tmp_path):
    """--compute-dtype float32 --embedding-dtype float32 reproduces the reference's numbers (no bf16 anywhere),
    for mean pooling and for --pooling cls, which is the hidden state at position 0 ([CLS])."""
    out = copy_without_embeddings(small_build, tmp_path / "mean")
    embed(out, embedding_dtype="float32", compute_dtype="float32")
    chosen, tokens, stored = stored_rows_by_chunk_id(out)
    got = np.stack([stored[int(c)] for c in chosen])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_fp32(tokens), rtol=0, atol=2e-4)

    out = copy_without_embeddings(small_build, tmp_path / "cls")
    embed(out, pooling="cls", embedding_dtype="float32", compute_dtype="float32")
    chosen, tokens, stored = stored_rows_by_chunk_id(out)
    cls_vecs = np.stack([stored[int(c)] for c in chosen])
    hidden, _ = reference_hidden(tokens)
    np.testing.assert_allclose(cls_vecs, hidden[:, 0], rtol=0, atol=2e-4)
    assert cosine(cls_vecs, reference_fp32(tokens)).max() < 0.99  # a different pooling, not the mean again


def test_tokenizer_mismatch_is_refused(small_build, tmp_path):
    """Chunks made with a different (cased-preserving) tokenizer must not be embedded silently."""
    tok_dir = tmp_path / "other-tokenizer"
    shutil.copytree(default_encoder_path(), tok_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "mismatch"
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Words For A Small Document, Written In Title Case.")
    tokenize(corpus, out, tokenizer=str(tok_dir))
    with pytest.raises(ValueError, match="different tokenizer"):
        embed(out)
    assert embed(out, allow_tokenizer_mismatch=True).chunks == 1


def test_damaged_and_missing_parts_are_recomputed_only(small_build, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(small_build / "build", out)
    total = read_manifest(open_location(str(out)), "embeddings")["totals"]["chunks"]
    parts = sorted((out / "embeddings").glob("part-*.npy"))
    assert len(parts) >= 3
    before = {p.name: p.read_bytes() for p in parts}
    untouched_mtime = parts[2].stat().st_mtime
    parts[0].unlink()
    parts[1].write_bytes(before[parts[1].name][:-100])
    s = embed(out)
    assert 0 < s.embedded_now < total
    assert {p.name: p.read_bytes() for p in sorted((out / "embeddings").glob("part-*.npy"))} == before
    assert parts[2].stat().st_mtime == untouched_mtime


@pytest.mark.slow
def test_killed_embed_resumes(small_build, tmp_path):
    out = copy_without_embeddings(small_build, tmp_path / "k")
    import ray

    # the job joins the session's Ray instance; killing its driver ends its tasks (Ray cancels what a dead
    # driver owns), as losing the machine that submitted it would
    args = [sys.executable, "-m", "jobs.build_index", "--out", str(out), "--stages", "embed", "--embed-batch-size", "64",
            "--ray-address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("embeddings/_parts/*/part-*.json")):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    done_before = len(list(out.glob("embeddings/_parts/*/part-*.json")))
    assert done_before >= 1 and not (out / "embeddings" / "_manifest.json").exists()
    total = read_manifest(open_location(str(out)), "chunks")["totals"]["chunks"]
    s = embed(out)
    assert s.embedded_now < total and s.chunks == total
    ids, vecs = load_embeddings(out)
    ids2, vecs2 = load_embeddings(small_build / "build")  # an uninterrupted run with the same settings
    assert (ids == ids2).all() and np.array_equal(vecs, vecs2)


def test_s3_round_trip(small_build, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("embed-bucket")
    local = small_build / "build"
    fs.put(str(local / "chunks"), "embed-bucket/build/chunks", recursive=True)
    s = embed("s3://embed-bucket/build")
    assert s.chunks > 0
    m_remote = json.loads(fs.cat("embed-bucket/build/embeddings/_manifest.json"))
    m_local = read_manifest(open_location(str(local)), "embeddings")
    assert [p["sha256"] for p in m_remote["parts"]] == [p["sha256"] for p in m_local["parts"]]
