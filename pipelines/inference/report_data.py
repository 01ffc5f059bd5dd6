"""What the build report shows, read from a build's manifests and a bounded sample of its parts.

Why separate from the page: the figures a user trusts (counts, recall, distances) are computed here once,
as plain dataclasses, so the HTML renderer only lays them out and a test can compare the two. Every read is
bounded: manifests, the ``docs/`` columns ``source`` and ``num_chunks`` (one row per document), at most
``max_quarantine`` quarantine rows, at most ``max_distances`` stored neighbor rows, and the chunks parts the
sampled examples fall in; never the embeddings or the whole chunks table.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from pipelines.artifacts.build_reader import BuildReader, DocSources
from pipelines.artifacts.manifest import read_manifest, require_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import Location
from pipelines.artifacts.tombstones import FOLDER as TOMBSTONES
from pipelines.artifacts.versions import NeighborsReader, complete_versions, index_infos, resolve_latest
from pipelines.reindex.publish import read_history
from pipelines.runtime.redact import redact
from pipelines.text.tokenizer import load_tokenizer

# the build's stages in the order they run, and the manifest folder that commits each (docs/design.md)
STAGES = (("tokenize", "docs"), ("embed", "embeddings"), ("index", "index/{index}"), ("neighbors", "neighbors/{neighbors}"))
EXAMPLES_PER_REASON = 3
MAX_HISTORY = 20  # the newest re-index runs shown


@dataclass
class StageRow:
    """One stage as its manifest records it; ``seconds`` is measured where the stage records it, else the time
    since the previous stage's manifest was written (marked ``estimated``)."""

    stage: str
    folder: str
    finished_at: str
    seconds: float | None
    estimated: bool
    counts: dict[str, int | float]


@dataclass
class SourceRow:
    source: str  # the input file (a jsonl/parquet row's ``#line=N`` / ``#row=N`` suffix dropped)
    documents: int
    chunks: int


@dataclass
class QuarantineReason:
    reason: str
    count: int
    examples: list[tuple[str, str]]  # (source, detail)


@dataclass
class IndexSummary:
    """The published index and the tuner's choice of search settings, with the recall it measured."""

    version: str
    key: str
    key_reason: str
    metric: str
    layout: str
    vectors: int
    dim: int
    size_bytes: int
    search_params: str
    rerank_candidates: int
    recall_at_k: float | None
    target_recall: float | None
    query_ms: float | None
    build_seconds: float | None


@dataclass
class NeighborsSummary:
    """The published neighbors: k, the held-out recall of what was stored, and a histogram of the stored distances."""

    version: str
    k: int
    rows: int
    rows_with_pads: int
    recall_at_k: float | None
    candidates: int | None
    cpu_ms_per_chunk: float | None
    distance_edges: list[float]
    distance_counts: list[int]
    distances_sampled: int


@dataclass
class Neighbor:
    chunk_id: int
    source: str
    distance: float
    text: str


@dataclass
class ChunkExample:
    chunk_id: int
    source: str
    text: str
    neighbors: list[Neighbor]


@dataclass
class Versions:
    latest: dict
    index_versions: list[str]
    neighbors_versions: list[str]
    history: list[dict]


@dataclass
class BuildReport:
    """Everything the report page shows, in the order it shows it."""

    data_url: str
    generated_at: str
    totals: dict[str, int]
    stages: list[StageRow]
    sources: list[SourceRow]
    quarantine: list[QuarantineReason]
    index: IndexSummary
    neighbors: NeighborsSummary
    versions: Versions
    examples: list[ChunkExample] = field(default_factory=list)


def _epoch(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def stage_rows(data: Location, latest: dict) -> list[StageRow]:
    """The four build stages from their manifests: when each finished, how long it took, what it counted."""
    rows: list[StageRow] = []
    previous: float | None = None
    for stage, pattern in STAGES:
        folder = pattern.format(**latest)
        m = require_manifest(data, folder, "the report")
        finished = m.get("written_at", "")
        counts = {k: v for k, v in m.get("totals", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        seconds, estimated = None, False
        if stage == "index":
            seconds = index_infos(data, latest["index"]).get("build_seconds")
        if seconds is None and previous is not None and finished:
            seconds, estimated = max(0.0, _epoch(finished) - previous), True
        if finished:
            previous = _epoch(finished)
        rows.append(StageRow(stage, folder, finished, seconds, estimated, counts))
    return rows


def source_rows(data: Location, limit: int) -> tuple[list[SourceRow], int]:
    """Documents and chunks per input file, largest first (at most ``limit`` rows), and how many files there are."""
    docs: Counter = Counter()
    chunks: Counter = Counter()
    for part in require_manifest(data, "docs", "the report")["parts"]:
        t = read_table(data, f"docs/{part['path']}", columns=["source", "num_chunks"])
        for source, n in zip(t.column("source").to_pylist(), t.column("num_chunks").to_pylist()):
            file = source.split("#", 1)[0]
            docs[file] += 1
            chunks[file] += int(n)
    ordered = sorted(docs, key=lambda s: (-chunks[s], s))
    return [SourceRow(s, docs[s], chunks[s]) for s in ordered[:limit]], len(ordered)


def quarantine_reasons(data: Location, max_rows: int) -> list[QuarantineReason]:
    """Quarantined inputs by reason, most frequent first: counts from the manifest (all of them), examples from
    the first ``max_rows`` rows."""
    m = read_manifest(data, "quarantine")
    if m is None:
        return []
    by_reason = dict(m.get("totals", {}).get("quarantined_by_reason", {}))
    examples: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen = 0
    for part in m["parts"]:
        if seen >= max_rows:
            break
        t = read_table(data, f"quarantine/{part['path']}", columns=["source", "reason", "detail"])
        for source, reason, detail in zip(*(t.column(c).to_pylist() for c in ("source", "reason", "detail"))):
            seen += 1
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append((source, detail or ""))
            by_reason.setdefault(reason, 0)
    return [QuarantineReason(r, int(by_reason[r]) or len(examples[r]), examples[r])
            for r in sorted(by_reason, key=lambda r: (-int(by_reason[r]), r))]


def index_summary(data: Location, version: str) -> IndexSummary:
    m = require_manifest(data, f"index/{version}", "the report")
    infos = index_infos(data, version)
    totals = m.get("totals", {})
    return IndexSummary(
        version=version, key=m.get("index_key", "?"), key_reason=m.get("key_reason", ""), metric=m.get("metric", "l2"),
        layout=m.get("layout", ""), vectors=int(totals.get("ntotal", totals.get("chunks", 0))), dim=int(totals.get("dim", 0)),
        size_bytes=int(totals.get("size_bytes", 0)), search_params=m.get("index_param", "") or "exact (no parameters)",
        rerank_candidates=int(m.get("rerank_candidates", 0)), recall_at_k=m.get("recall_at_k"),
        target_recall=infos.get("target_recall"), query_ms=m.get("query_ms"), build_seconds=infos.get("build_seconds"))


def neighbors_summary(data: Location, version: str, max_rows: int, bins: int = 20) -> NeighborsSummary:
    """The neighbors manifest's figures and a histogram of the stored distances of the first ``max_rows`` rows."""
    m = require_manifest(data, f"neighbors/{version}", "the report")
    reader = NeighborsReader(data, version)
    values: list[np.ndarray] = []
    taken = 0
    for i in range(len(reader.parts)):
        if taken >= max_rows:
            break
        t = reader.read_part(i)
        nb = t.column("neighbors").combine_chunks().flatten().to_numpy()
        ds = t.column("distances").combine_chunks().flatten().to_numpy()
        values.append(ds[nb >= 0])
        taken += t.num_rows
    d = np.concatenate(values) if values else np.zeros(0, np.float32)
    counts, edges = np.histogram(d, bins=bins) if len(d) else (np.zeros(0, int), np.zeros(0))
    totals = m.get("totals", {})
    return NeighborsSummary(
        version=version, k=int(totals.get("k", reader.k)), rows=int(totals.get("rows", len(reader))),
        rows_with_pads=int(totals.get("rows_with_pads", 0)), recall_at_k=m.get("recall_at_k"),
        candidates=m.get("candidates"), cpu_ms_per_chunk=m.get("cpu_ms_per_chunk"),
        distance_edges=[float(x) for x in edges], distance_counts=[int(x) for x in counts], distances_sampled=int(len(d)))


def examples(data: Location, version: str, count: int) -> list[ChunkExample]:
    """``count`` live chunks spread evenly over the build, each with its stored neighbors, as text."""
    reader = BuildReader(data)
    if count <= 0 or reader.n_chunks == 0:
        return []
    sources = DocSources(data)
    neighbors = NeighborsReader(data, version)
    tok = load_tokenizer(reader.tokenizer.get("name", "packaged:all-MiniLM-L6-v2")).tokenizer
    c = reader.chunk_size

    def text(tokens: np.ndarray) -> str:
        return tok.decode([int(t) for t in tokens[:c] if t], skip_special_tokens=True)

    spread = np.unique(np.linspace(0, reader.n_chunks - 1, count + 2).astype(np.int64)[1:-1])
    ids = spread[~reader.dead(spread)]
    if not len(ids):
        return []
    nb, dist = neighbors.lookup(ids)
    tokens, docs = reader.gather(ids)
    out = []
    for i, chunk in enumerate(ids.tolist()):
        keep = (nb[i] >= 0) & ~reader.dead(np.maximum(nb[i], 0))
        n_ids, n_dist = nb[i][keep], dist[i][keep]
        n_tokens, n_docs = reader.gather(n_ids)
        n_sources = sources(n_docs)
        out.append(ChunkExample(chunk, sources(docs[i:i + 1])[0], text(tokens[i]),
                                [Neighbor(int(n_ids[j]), n_sources[j], float(n_dist[j]), text(n_tokens[j]))
                                 for j in range(len(n_ids))]))
    return out


def collect_report(data: Location, *, max_sources: int = 30, max_quarantine: int = 100_000,
                   max_distances: int = 200_000, num_examples: int = 4) -> BuildReport:
    """Read a published build's manifests and a bounded sample of its parts into a :class:`BuildReport`.

    Args:
        data: the build (``--data``).
        max_sources: most input files listed (the largest by chunks); the rest are counted.
        max_quarantine: most quarantine rows read for examples (counts come from the manifest).
        max_distances: most stored neighbor rows read for the distance histogram.
        num_examples: sampled chunks shown with their neighbors.

    Returns:
        The report's figures; a build with no ``LATEST`` raises ``FileNotFoundError``.
    """
    latest = resolve_latest(data)
    tokenize = require_manifest(data, "docs", "the report")
    sources, n_files = source_rows(data, max_sources)
    totals = {k: int(v) for k, v in tokenize.get("totals", {}).items() if isinstance(v, int)}
    totals["input_files"] = n_files
    tombstones = read_manifest(data, TOMBSTONES)
    if tombstones is not None:
        totals["tombstoned_documents"] = sum(int(p.get("documents", 0)) for p in tombstones["parts"])
    return BuildReport(
        data_url=redact(data.url), generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), totals=totals,
        stages=stage_rows(data, latest), sources=sources, quarantine=quarantine_reasons(data, max_quarantine),
        index=index_summary(data, latest["index"]), neighbors=neighbors_summary(data, latest["neighbors"], max_distances),
        versions=Versions(latest, complete_versions(data, "index"), complete_versions(data, "neighbors"),
                          read_history(data)[-MAX_HISTORY:]),
        examples=examples(data, latest["neighbors"], num_examples))
