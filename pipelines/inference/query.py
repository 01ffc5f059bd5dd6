"""Asking a build what it holds (`python -m jobs.query`): the nearest chunks of a text, or a chunk's stored neighbors.

Why: before training on a build, a user needs to see what retrieval will give the model. A text query goes
through the build's own tokenizer and encoder (the chunks and embeddings manifests name them) and the index
version ``LATEST`` names; a chunk id shows the neighbors the neighbors stage stored for it (what RETRO trains
on). Chunks a re-index tombstoned are never shown. Everything is loaded once per :class:`BuildSearcher`, so
later queries cost one encoder pass and one index search.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.artifacts.build_reader import BuildReader, DocSources
from pipelines.artifacts.embeddings import load_embeddings_info
from pipelines.artifacts.manifest import require_manifest
from pipelines.artifacts.storage import open_location
from pipelines.artifacts.versions import NeighborsReader, open_index, resolve_latest
from pipelines.runtime.config import fail, option
from pipelines.search.rerank import ExactVectors

OVERFETCH = 16  # extra candidates asked of the index so that tombstoned chunks can be dropped and k still filled


@dataclass(kw_only=True)
class QueryConfig:
    """Options of `python -m jobs.query`."""

    data: str = option("", "the build to query (local folder, s3://..., any fsspec URL); required")
    text: str = option("", "find the chunks nearest this text (embedded with the build's own encoder)")
    chunk_id: int = option(-1, "show this chunk and the neighbors stored for it (what RETRO trains on)")
    k: int = option(5, "hits to show for --text")
    json: bool = option(False, "one JSON object per hit instead of a table")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (the URL of a build made by jobs.build_index)")
        if bool(self.text) == (self.chunk_id >= 0):
            raise ValueError("give exactly one of --text and --chunk-id")
        if self.k <= 0:
            raise ValueError(f"--k must be positive, got {self.k}")


@dataclass
class Hit:
    """One row of an answer; ``rank`` 0 is the queried chunk itself in a --chunk-id answer."""

    rank: int
    chunk_id: int
    doc_id: int
    source: str
    distance: float
    text: str


class BuildSearcher:
    """A published build, loaded once: its chunks, sources, tombstones, tokenizer, encoder and index."""

    def __init__(self, data_url: str, device: str = "cpu"):
        """``device``: where the encoder runs (``cpu``, ``cuda``, or ``auto``: cuda when there is one); the
        index is searched on the CPU either way."""
        from models.encoder import ChunkEncoder, EncoderConfig
        from pipelines.text.tokenizer import load_tokenizer, resolve_model_path

        self.data = open_location(data_url)
        self.reader = BuildReader(self.data)
        self.sources = DocSources(self.data)
        self.latest = resolve_latest(self.data)
        emb = require_manifest(self.data, "embeddings", "queries")
        self.tokenizer = load_tokenizer(self.reader.tokenizer.get("name", "packaged:all-MiniLM-L6-v2"))
        self.encoder = ChunkEncoder(EncoderConfig(resolve_model_path(emb["encoder"]), pooling=emb.get("pooling", "mean"),
                                                  compute_dtype=emb.get("compute_dtype", "auto"), device=device,
                                                  cls_id=self.tokenizer.cls_id, pad_id=self.tokenizer.pad_id))
        self.index = open_index(self.data, self.latest["index"])
        # a lossy index (PQ...) ranks by approximate distances: re-rank its candidates exactly, as the
        # neighbors stage does, with as many candidates as its tuning found the recall needs
        index_manifest = require_manifest(self.data, f"index/{self.latest['index']}", "queries")
        self.metric = index_manifest.get("metric", "l2")
        self.rerank = int(index_manifest.get("rerank_candidates", 0))
        self.exact = ExactVectors(self.data, load_embeddings_info(self.data)) if self.rerank else None

    def text_of(self, tokens: np.ndarray) -> str:
        return self.tokenizer.tokenizer.decode([int(t) for t in tokens if t], skip_special_tokens=True)

    def hits(self, ids: np.ndarray, distances: np.ndarray, first_rank: int = 1) -> list[Hit]:
        tokens, docs = self.reader.gather(ids)
        sources = self.sources(docs)
        c = self.reader.chunk_size
        return [Hit(first_rank + i, int(ids[i]), int(docs[i]), sources[i], float(distances[i]), self.text_of(tokens[i, :c]))
                for i in range(len(ids))]

    def search_text(self, text: str, k: int) -> list[Hit]:
        """The k live chunks nearest ``text`` (embedded as the first chunk of a document would be), best first."""
        return self.search_texts([text], k)[0]

    def search_texts(self, texts: Sequence[str], k: int | Sequence[int]) -> list[list[Hit]]:
        """:meth:`search_text` for many texts at once (one of ``k`` per text, or one for all): one encoder pass
        and one index search for the lot, which is what makes a batch of requests cheaper than its requests."""
        ks = [int(k)] * len(texts) if isinstance(k, int) else [int(x) for x in k]
        if len(ks) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ks)} values of k")
        if not texts:
            return []
        c = self.reader.chunk_size
        rows = np.zeros((len(texts), c + 1), np.int64)
        for i, text in enumerate(texts):
            ids = self.tokenizer.tokenizer.encode(text, add_special_tokens=True).ids[:c]
            rows[i, :len(ids)] = ids
        query = self.encoder.embed(rows).astype(np.float32)
        distances, found = self.index.search(query, min(max(max(ks) + OVERFETCH, self.rerank), self.reader.n_chunks))
        if self.exact is not None:
            distances, found = self.exact.rescore(query, found, self.metric)
        answers = []
        for i, want in enumerate(ks):
            keep = found[i] >= 0
            keep[keep] = ~self.reader.dead(found[i][keep])
            answers.append(self.hits(found[i][keep][:want], distances[i][keep][:want]))
        return answers

    def chunk_and_neighbors(self, chunk_id: int) -> list[Hit]:
        """The chunk itself (rank 0, distance 0) and its stored neighbors from the published neighbors version."""
        if not 0 <= chunk_id < self.reader.n_chunks:
            raise ValueError(f"--chunk-id {chunk_id} is not in this build (chunk ids 0..{self.reader.n_chunks - 1})")
        if self.reader.dead(np.asarray([chunk_id]))[0]:
            raise ValueError(f"chunk {chunk_id} was removed by a re-index (tombstones/)")
        nb, dist = NeighborsReader(self.data, self.latest["neighbors"]).lookup([chunk_id])
        keep = nb[0] >= 0
        return self.hits(np.asarray([chunk_id]), np.zeros(1, np.float32), first_rank=0) + self.hits(nb[0][keep], dist[0][keep])


def format_hits(hits: list[Hit], as_json: bool) -> list[str]:
    """The lines a query prints: JSON objects, or a rank/chunk/distance/source header per hit and its text."""
    if as_json:
        return [json.dumps(asdict(h), ensure_ascii=False) for h in hits]
    lines = []
    for h in hits:
        label = "query chunk" if h.rank == 0 else f"#{h.rank}"
        lines.append(f"{label}  chunk {h.chunk_id}  doc {h.doc_id}  distance {h.distance:.4f}  {h.source}")
        lines.append(f"    {h.text}")
    return lines


def run_query(cfg: QueryConfig) -> int:
    """Load the build, answer one query, print it.

    Args:
        cfg: the query's options (``python -m jobs.query --help``).

    Returns:
        The process exit code (0); a missing or unpublished build, or a bad chunk id, exits with a one-line error.
    """
    try:
        searcher = BuildSearcher(cfg.data)
        hits = searcher.search_text(cfg.text, cfg.k) if cfg.text else searcher.chunk_and_neighbors(cfg.chunk_id)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    for line in format_hits(hits, cfg.json):
        print(line, flush=True)
    return 0
