"""Synthetic builds in the exact layout the embed stage writes (chunks/, docs/, embeddings/).

Used by the index/neighbors tests and benchmarks, so they exercise the real artifact contract
without running an encoder. Embeddings are clustered like text embeddings: documents belong to
topics, and a document's chunks sit close to each other (so same-document neighbors crowd the
top of every search, which is what the neighbor filter has to handle). Parts are generated one
at a time from per-part seeds, so 10^7 rows never sit in memory at once.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.artifacts.manifest import part_name, write_manifest
from pipelines.artifacts.parquet import write_table
from pipelines.artifacts.storage import Location, open_location, sha256_bytes, write_bytes_atomic

CHUNKS_SCHEMA = pa.schema([("chunk_id", pa.int64()), ("doc_id", pa.int64()), ("tokens", pa.list_(pa.int32()))])
DOCS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("source", pa.string()), ("sha256", pa.string()),
                         ("first_chunk_id", pa.int64()), ("num_chunks", pa.int64())])
IDS_SCHEMA = pa.schema([("chunk_id", pa.int64())])


@dataclass
class SyntheticBuild:
    """What was written: enough for tests to compute the expected answer independently."""

    out: Location
    n_chunks: int
    dim: int
    doc_first: np.ndarray  # first chunk id of every document, increasing
    doc_sizes: np.ndarray
    part_rows: list[int]
    dtype: str

    def doc_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_first, ids, side="right") - 1


def _doc_sizes(n_chunks: int, mean_doc_chunks: int, rng: np.random.Generator) -> np.ndarray:
    sizes = []
    left = n_chunks
    while left > 0:
        s = int(min(left, max(1, rng.integers(1, 2 * mean_doc_chunks))))
        sizes.append(s)
        left -= s
    return np.asarray(sizes, dtype=np.int64)


def _split_docs(sizes: np.ndarray, parts: int) -> list[np.ndarray]:
    """Whole documents per part (as tokenize writes them), about equal chunk counts."""
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    bounds = [int(np.searchsorted(ends, total * (i + 1) / parts, side="left")) + 1 for i in range(parts)]
    bounds[-1] = len(sizes)
    out, lo = [], 0
    for b in bounds:
        b = max(b, lo)
        out.append(np.arange(lo, b))
        lo = b
    return [p for p in out if len(p)] or [np.arange(len(sizes))]


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_synthetic_build(url: str, *, n_chunks: int, dim: int = 32, parts: int = 4, mean_doc_chunks: int = 20,
                          n_topics: int = 64, doc_spread: float = 0.5, noise: tuple[float, float] = (0.2, 1.0),
                          noise_rank: int = 32, dtype: str = "float16", seed: int = 0,
                          tokens: bool = True) -> SyntheticBuild:
    """Write chunks/, docs/ and embeddings/ (npy + ids parquet + manifests) for ``n_chunks`` chunks.

    A chunk is its topic's center + its document's offset (``doc_spread``) + noise in a shared
    ``noise_rank``-dimensional subspace (text embeddings have a low intrinsic dimension), scaled
    per document between ``noise``: tight documents crowd their own chunks' neighbor lists, loose
    ones mix with other documents of their topic."""
    out = open_location(url)
    rng = np.random.default_rng(seed)
    sizes = _doc_sizes(n_chunks, mean_doc_chunks, rng)
    doc_first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32) / np.sqrt(dim)
    doc_topic = rng.integers(0, n_topics, len(sizes))
    doc_noise = rng.uniform(noise[0], noise[1], len(sizes)).astype(np.float32)
    rank = min(noise_rank, dim)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    emb_parts, chunk_parts, doc_parts = [], [], []
    for p, docs in enumerate(_split_docs(sizes, parts)):
        prng = np.random.default_rng([seed, p])
        first, rows = int(doc_first[docs[0]]), int(sizes[docs].sum())
        ids = np.arange(first, first + rows, dtype=np.int64)
        chunk_doc = np.repeat(docs.astype(np.int64), sizes[docs])
        centers = topics[doc_topic[docs]] + doc_spread * prng.standard_normal((len(docs), dim)).astype(np.float32) / np.sqrt(dim)
        x = np.repeat(centers, sizes[docs], axis=0)
        scale = np.repeat(doc_noise[docs], sizes[docs])[:, None]
        x += scale * (prng.standard_normal((rows, rank)).astype(np.float32) @ basis) / np.sqrt(rank)
        arr = x.astype(dtype)
        name = part_name(p, ".npy")
        data = _npy_bytes(arr)
        write_bytes_atomic(out, f"embeddings/{name}", data)
        ids_rel = f"ids/{part_name(p)}"
        write_table(out, f"embeddings/{ids_rel}", pa.table({"chunk_id": ids}, schema=IDS_SCHEMA))
        emb_parts.append({"path": name, "rows": rows, "bytes": len(data), "sha256": sha256_bytes(data), "ids_path": ids_rel})
        if tokens:
            tok = prng.integers(1, 30000, (rows, 5)).astype(np.int32)
            token_list = pa.ListArray.from_arrays(pa.array(np.arange(0, (rows + 1) * 5, 5, dtype=np.int32)),
                                                  pa.array(tok.reshape(-1)))
            chunks = pa.Table.from_arrays([pa.array(ids), pa.array(chunk_doc), token_list], schema=CHUNKS_SCHEMA)
            chunk_parts.append(write_table(out, f"chunks/{part_name(p)}", chunks) | {"path": part_name(p)})
        docs_t = pa.table({"doc_id": docs.astype(np.int64), "source": [f"synthetic://doc/{d}" for d in docs],
                           "sha256": ["0" * 64] * len(docs), "first_chunk_id": doc_first[docs],
                           "num_chunks": sizes[docs]}, schema=DOCS_SCHEMA)
        doc_parts.append(write_table(out, f"docs/{part_name(p)}", docs_t) | {"path": part_name(p)})
    totals = {"chunks": n_chunks, "documents": len(sizes)}
    write_manifest(out, "docs", stage="tokenize", parts=doc_parts, totals=totals, config={"synthetic": True})
    if tokens:
        write_manifest(out, "chunks", stage="tokenize", parts=chunk_parts, totals=totals, config={"synthetic": True})
    write_manifest(out, "embeddings", stage="embed", parts=emb_parts, totals={"chunks": n_chunks, "dim": dim},
                   config={"synthetic": True, "seed": seed},
                   extra={"dtype": dtype, "dim": dim, "encoder": "synthetic", "pooling": "mean", "tokenizer": {}})
    return SyntheticBuild(out, n_chunks, dim, doc_first, sizes, [e["rows"] for e in emb_parts], dtype)


def load_embeddings(build: SyntheticBuild) -> np.ndarray:
    """All embeddings as float32 (tests only: small builds)."""
    parts = [np.load(build.out.path(f"embeddings/{part_name(i, '.npy')}")) for i in range(len(build.part_rows))]
    return np.concatenate(parts).astype(np.float32)


def brute_force_neighbors(x: np.ndarray, doc_first: np.ndarray, k: int, metric: str = "l2",
                          queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference answer, written independently of pipelines/: exact k nearest from other documents."""
    q_ids = np.arange(len(x)) if queries is None else np.asarray(queries)
    doc = np.searchsorted(doc_first, np.arange(len(x)), side="right") - 1
    q = x[q_ids].astype(np.float64)
    xx = x.astype(np.float64)
    if metric == "l2":
        score = (q * q).sum(1)[:, None] + (xx * xx).sum(1)[None, :] - 2 * q @ xx.T  # smaller is nearer
    else:
        score = -(q @ xx.T)
    score[doc[q_ids][:, None] == doc[None, :]] = np.inf
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(score, order, 1)
    ids = np.where(np.isfinite(best), order, -1)
    return ids.astype(np.int64), (best if metric == "l2" else -best)
