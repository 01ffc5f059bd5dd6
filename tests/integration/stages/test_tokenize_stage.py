"""The tokenize stage on a real local Ray instance: artifacts, quarantine accounting, determinism."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import RetriesExhausted, open_location
from pipelines.runtime.ray_session import task_cause
from pipelines.stages.tokenize import run_tokenize
from pipelines.text.chunking import doc_to_chunks
from pipelines.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("ray_local")


def tokenize(corpus, out, **kw):
    args = dict(chunk_size=64, seq_len=256, text_field="text", tokenizer="packaged:all-MiniLM-L6-v2",
                unit_bytes=0, concurrency=2, config={})
    args.update(kw)
    return run_tokenize(corpus=[str(c) for c in (corpus if isinstance(corpus, list) else [corpus])],
                        out=open_location(str(out)), **args)


def read(out, folder) -> pa.Table:
    return pq.read_table(os.path.join(out, folder))


def part_bytes(out, folder) -> dict[str, bytes]:
    d = os.path.join(out, folder)
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.startswith("part-")}


@pytest.fixture
def mixed_corpus(tmp_path, plays):
    """Real plays plus every kind of bad input the issue names."""
    d = tmp_path / "mixed"
    (d / "plays").mkdir(parents=True)
    for p in plays[:2]:
        shutil.copy(p, d / "plays" / p.name)
    (d / "notes.md").write_text("# Notes\nA short markdown document about the plays.")
    lines = [json.dumps({"text": "First line document."}), "{broken", json.dumps({"title": "no text"}),
             json.dumps({"text": "Second good document."})]
    (d / "lines.jsonl").write_text("\n".join(lines) + "\n")
    (d / "more.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": "Gzipped document."}) + "\n").encode()))
    pq.write_table(pa.table({"text": ["Parquet row zero.", None, "Parquet row two."]}), d / "rows.parquet")
    (d / "latin1.txt").write_bytes("fa\xe7ade".encode("latin-1"))
    (d / "blob.txt").write_bytes(bytes(range(256)))
    (d / "empty.txt").write_text("   \n")
    (d / "picture.png").write_bytes(b"\x89PNG\r\n")
    return d


def test_artifacts_follow_the_contract(mixed_corpus, tmp_path):
    out = tmp_path / "out"
    s = tokenize(mixed_corpus, out)
    docs, chunks, seqs, quarantine = (read(out, f) for f in ("docs", "chunks", "seqs", "quarantine"))

    # accounting: documents + quarantined = inputs (2 plays, md, 2 jsonl good, gz, 2 parquet good = 8 docs)
    inputs = 2 + 1 + 4 + 1 + 3 + 4  # plays, md, jsonl lines, gz, parquet rows, 4 bad files (png included)
    assert s.documents == docs.num_rows == 8
    assert s.quarantined == quarantine.num_rows == 7
    assert s.documents_read == docs.num_rows + quarantine.num_rows == inputs
    reasons = dict(zip(*np.unique(quarantine["reason"].to_numpy(zero_copy_only=False), return_counts=True)))
    assert reasons == {"invalid_json": 1, "missing_text_field": 2, "invalid_utf8": 1, "binary": 1, "empty": 1,
                       "unsupported_format": 1}
    sources = dict(zip(quarantine["source"].to_pylist(), quarantine["reason"].to_pylist()))
    assert sources[f"{mixed_corpus}/lines.jsonl#line=2"] == "invalid_json"
    assert sources[f"{mixed_corpus}/rows.parquet#row=1"] == "missing_text_field"
    assert f"{mixed_corpus}/rows.parquet#row=2" in docs["source"].to_pylist()

    # ids dense from 0 in sorted listing order; chunks match the tokenizer token for token
    assert docs["doc_id"].to_pylist() == list(range(8))
    assert docs["source"].to_pylist()[0].endswith("lines.jsonl#line=1")
    assert chunks["chunk_id"].to_pylist() == list(range(chunks.num_rows))
    tok = load_tokenizer()
    texts = {"lines.jsonl#line=1": "First line document.", "rows.parquet#row=0": "Parquet row zero."}
    by_source = {src.rsplit("/", 1)[-1]: i for i, src in enumerate(docs["source"].to_pylist())}
    tokens = np.array(chunks["tokens"].to_pylist(), dtype=np.int32)
    for name, text in texts.items():
        i = by_source[name]
        first, n = docs["first_chunk_id"][i].as_py(), docs["num_chunks"][i].as_py()
        expected = doc_to_chunks(np.array(tok.tokenizer.encode(text).ids), 64)
        assert (tokens[first:first + n] == expected).all()
        assert docs["sha256"][i].as_py() == hashlib.sha256(text.encode()).hexdigest()
        assert (chunks["doc_id"].to_numpy()[first:first + n] == i).all()
    assert docs["num_chunks"].to_numpy().sum() == chunks.num_rows
    # a sequence starts every seq_len/chunk_size = 4 chunks of each document
    expected_seqs = np.concatenate([np.arange(f, f + n, 4) for f, n in
                                    zip(docs["first_chunk_id"].to_numpy(), docs["num_chunks"].to_numpy())])
    assert seqs["seq_start"].to_numpy().tolist() == expected_seqs.tolist()
    m = read_manifest(open_location(str(out)), "chunks")
    assert m["totals"]["chunks"] == chunks.num_rows and m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert sum(p["rows"] for p in m["parts"]) == chunks.num_rows


def test_rerun_is_a_noop_and_parts_are_deterministic(play_corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = tokenize(play_corpus, a, unit_bytes=200_000)
    mtimes = {n: os.path.getmtime(os.path.join(a, "chunks", n)) for n in os.listdir(a / "chunks")}
    again = tokenize(play_corpus, a, unit_bytes=200_000)
    assert again.up_to_date and again.chunks == first.chunks
    assert {n: os.path.getmtime(os.path.join(a, "chunks", n)) for n in os.listdir(a / "chunks")} == mtimes
    tokenize(play_corpus, b, unit_bytes=200_000)
    for folder in ("chunks", "docs", "seqs", "quarantine"):
        assert part_bytes(a, folder) == part_bytes(b, folder)
    # a damaged part is detected and recomputed to the same bytes
    victim = sorted((a / "chunks").glob("part-*"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:-10])
    assert not tokenize(play_corpus, a, unit_bytes=200_000).up_to_date
    assert victim.read_bytes() == good


def test_split_units_give_the_same_rows(tmp_path, plays):
    """A big jsonl cut into byte ranges yields the same documents, ids and line numbers as one unit."""
    d = tmp_path / "j"
    d.mkdir()
    with open(d / "plays.jsonl", "w") as f:
        for p in plays:
            for k, para in enumerate(p.read_text().split("\n\n")[:60]):
                f.write(json.dumps({"text": para} if k % 13 else {"wrong": para}) + "\n")
    whole, split = tmp_path / "whole", tmp_path / "split"
    tokenize(d, whole, unit_bytes=1 << 30)
    tokenize(d, split, unit_bytes=5_000)
    assert len(list((split / "chunks").glob("part-*"))) > 5
    for folder in ("chunks", "docs", "seqs", "quarantine"):
        assert read(whole, folder).equals(read(split, folder)), folder


def test_same_parts_through_s3(play_corpus, tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus-bucket")
    fs.put(str(play_corpus), "corpus-bucket/plays", recursive=True)
    local = tmp_path / "local"
    tokenize(play_corpus, local, unit_bytes=300_000)
    s = tokenize("s3://corpus-bucket/plays", "s3://corpus-bucket/build", unit_bytes=300_000)
    assert s.chunks > 0
    for folder in ("chunks", "seqs", "quarantine"):
        names = sorted(fs.ls(f"corpus-bucket/build/{folder}"))
        remote = {n.rsplit("/", 1)[-1]: fs.cat(n) for n in names if n.rsplit("/", 1)[-1].startswith("part-")}
        assert remote == part_bytes(local, folder), folder
    remote_docs = pq.read_table("corpus-bucket/build/docs", filesystem=fs)
    local_docs = read(local, "docs")
    assert remote_docs.drop(["source"]).equals(local_docs.drop(["source"]))
    assert all(s.startswith("s3://corpus-bucket/plays/") for s in remote_docs["source"].to_pylist())
    assert fs.exists("corpus-bucket/build/chunks/_manifest.json")
    assert not fs.exists("corpus-bucket/build/chunks/_staging")


def test_bad_values_are_quarantined_and_out_inside_the_corpus_is_not_read_on_s3(tmp_path, s3_server):
    """Through the real stage: text UTF-8 cannot carry (a JSON lone surrogate, parquet bytes that are not
    UTF-8) and a document over --max-doc-mb are quarantined records, not a traceback; --out inside --corpus
    on object storage is not read back as input, so the rerun is up to date."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("inside-bucket")
    lines = [json.dumps({"text": "A good first document."}), '{"text": "a lone \\ud800 surrogate"}',
             json.dumps({"text": "far too long " * 400}), json.dumps({"text": "A good last document."})]
    fs.pipe("inside-bucket/corpus/a.jsonl", ("\n".join(lines) + "\n").encode())
    rows = pa.array([b"Parquet row zero.", b"\xed\xa0\x80 not UTF-8"], pa.binary()).view(pa.string())
    with fs.open("inside-bucket/corpus/b.parquet", "wb") as f:
        pq.write_table(pa.table({"text": rows}), f)
    corpus, out = "s3://inside-bucket/corpus", "s3://inside-bucket/corpus/build"
    first = tokenize(corpus, out, max_doc_mb=0.004)
    assert (first.documents, first.quarantined_by_reason) == (3, {"invalid_unicode": 1, "too_large": 1, "invalid_utf8": 1})
    again = tokenize(corpus, out, max_doc_mb=0.004)
    assert again.up_to_date and again.documents == 3


@ray.remote
def _unreadable_unit() -> None:
    raise RetriesExhausted("cannot read s3://b/a.jsonl after 5 attempts (7.5 s): ConnectionError: reset by peer")


def test_a_storage_failure_in_a_worker_reaches_the_job_as_one_line():
    """What a tokenize task raises when a read outlasts its retries is what the job prints: not Ray's traceback."""
    with pytest.raises(RetriesExhausted) as e:
        ray.get(_unreadable_unit.remote())
    assert "Traceback" in str(e.value) or "\n" in str(e.value)  # Ray's wrapper carries the remote traceback
    assert str(task_cause(e.value)) == "cannot read s3://b/a.jsonl after 5 attempts (7.5 s): ConnectionError: reset by peer"
