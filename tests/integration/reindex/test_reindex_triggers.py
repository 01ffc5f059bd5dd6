"""The cases where the re-index rebuilds the index from scratch instead of updating the published
one, each on a real (tiny) build with the real encoder and a real local Ray instance:
``--full``, shrink past ``--max-growth``, recall of the updated copy below ``--min-recall``, an HNSW
index (faiss cannot remove ids from it) that has documents to remove, and a build made with the
distributed index layout. Every case checks what a user sees: the ``history.jsonl`` row and the
summary say "full" and why, the published index version is a fresh full build over the live chunks
only, and the neighbors are those of a from-scratch build of the corpus as it is now (exact
neighbors over the live chunks' embeddings, computed here with numpy), up to ties (HNSW, which is
approximate: to the recall it is tuned for).

One tokenize + embed of the corpus is shared by the module; each test copies it, builds the index
kind it needs (index + neighbors stages only) and re-indexes its copy. Documents are removed by
leaving their files out of ``--corpus`` (so nothing needs embedding again)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import open_location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import NeighborsReader, complete_versions, list_versions, open_index, resolve_latest
from pipelines.reindex.publish import read_history
from pipelines.reindex.run import run_reindex
from pipelines.stages.build import STAGES
from pipelines.stages.build_config import BuildConfig

pytestmark = pytest.mark.usefixtures("ray_local")
K = 3
CUT = 4000  # characters per document: about 18 chunks of 64 tokens


@dataclass
class Shared:
    corpus: Path  # every document of the build, one file each
    embedded: Path  # the build after tokenize + embed (no index yet)
    flat: Path  # the same, indexed (Flat) and published


def _cfg(corpus: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(corpus=[str(corpus)], out=str(out), seq_len=256, k=K, concurrency=2, embed_batch_size=64,
                       unit_mb=0.03, **kw)  # 2 parts


@pytest.fixture(scope="module")
def shared(tmp_path_factory, plays) -> Shared:
    d = tmp_path_factory.mktemp("triggers")
    corpus = d / "corpus"
    corpus.mkdir()
    for p in plays:
        text = p.read_text()
        for j in range(2):
            (corpus / f"{p.stem}_{j}.txt").write_text(text[3000 + j * CUT:3000 + (j + 1) * CUT])
    cfg = _cfg(corpus, d / "embedded")
    loc = open_location(cfg.out)
    for name in ("tokenize", "embed"):
        STAGES[name](cfg, loc, cfg.corpus, 2)
    shared = Shared(corpus, d / "embedded", d / "flat")
    _index_and_publish(shared, shared.embedded, shared.flat, index_key="Flat")
    return shared


def _index_and_publish(shared: Shared, src: Path, out: Path, **kw) -> Path:
    shutil.copytree(src, out)
    cfg = _cfg(shared.corpus, out, **kw)
    loc = open_location(str(out))
    for name in ("index", "neighbors"):
        STAGES[name](cfg, loc, cfg.corpus, 2)
    return out


def publish_build(shared: Shared, dst: Path, **kw) -> Path:
    """A copy of the shared embeddings, indexed and published by the build's own index and neighbors
    stages (as ``jobs.build_index`` with these options would)."""
    return _index_and_publish(shared, shared.embedded, dst / "out", **kw)


def flat_build(shared: Shared, dst: Path) -> Path:
    """A copy of the shared published Flat build."""
    shutil.copytree(shared.flat, dst / "out")
    return dst / "out"


def documents(out: Path) -> list[tuple[str, int]]:
    """(file name, chunks) of every live document, by doc id."""
    t = pq.read_table(out / "docs")
    dead = Tombstones.load(open_location(str(out))).dead_docs()
    return [(Path(s).name, n) for d, s, n in zip(*(t.column(c).to_pylist() for c in ("doc_id", "source", "num_chunks")))
            if d not in dead]


def corpus_without(shared: Shared, names: set[str]) -> list[str]:
    """``--corpus`` as the remaining files: the left-out ones are removed documents."""
    files = sorted(p for p in shared.corpus.iterdir() if p.name not in names)
    assert len(files) == len(list(shared.corpus.iterdir())) - len(names)
    return [str(p) for p in files]


def reindex(shared: Shared, out: Path, removed: set[str], **kw):
    s = run_reindex(corpus=corpus_without(shared, removed), out=open_location(str(out)), concurrency=2,
                    **({"max_growth": 1.0} | kw))
    print("\n".join(s.lines()))
    return s


def smallest_docs(out: Path, n: int) -> set[str]:
    return {name for name, _ in sorted(documents(out), key=lambda d: (d[1], d[0]))[:n]}


# ----------------------------------------------------------------------------- what a user sees


def exact_neighbors(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(live chunk ids, their exact K nearest live chunks of other documents, squared L2 distances):
    what a from-scratch Flat build of the corpus as it is now stores (written independently of pipelines/)."""
    loc = open_location(str(out))
    x = np.concatenate([np.load(p) for p in sorted((out / "embeddings").glob("part-*.npy"))]).astype(np.float64)
    doc = np.full(len(x), -1, np.int64)
    t = pq.read_table(out / "docs")
    for d, f, n in zip(*(t.column(c).to_pylist() for c in ("doc_id", "first_chunk_id", "num_chunks"))):
        doc[f:f + n] = d
    live = np.setdiff1d(np.arange(len(x)), Tombstones.load(loc).chunk_ids())
    q = x[live]
    score = (q * q).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2 * q @ q.T
    score[doc[live][:, None] == doc[live][None, :]] = np.inf
    order = np.argsort(score, axis=1, kind="stable")[:, :K]
    return live, live[order], np.take_along_axis(score, order, 1)


def assert_neighbors_of_a_fresh_build(out: Path, approximate: bool = False) -> None:
    """Exact index: the exact neighbors, up to ties. Approximate (HNSW): what a fresh build of it
    reaches, the --target-recall (0.97) it is tuned for, and never nearer than the exact ones."""
    loc = open_location(str(out))
    live, ids, dist = exact_neighbors(out)
    reader = NeighborsReader(loc)
    found, found_dist = reader.lookup(live)
    assert len(live) > 100 and (found >= 0).all()
    if approximate:
        recall = np.mean([len(set(f) & set(e)) / K for f, e in zip(found.tolist(), ids.tolist())])
        assert recall >= 0.97, recall
        assert (found_dist >= dist - 1e-3 * (1 + dist)).all()
    else:
        assert np.allclose(found_dist, dist, rtol=1e-3, atol=1e-3), np.abs(found_dist - dist).max()
        differ = int((found != ids).any(1).sum())  # only where equal distances allow another order
        assert differ <= len(live) * 0.01, differ
    dead = Tombstones.load(loc).chunk_ids()
    assert len(dead) and (reader.lookup(dead)[0] == -1).all()


def assert_full_rebuild(out: Path, s, why: str, *, runs: int = 1, approximate: bool = False) -> dict:
    """The run's history row and summary say 'full' and why; LATEST names a fresh full build over
    the live chunks; every live chunk was searched again; the neighbors are a fresh build's."""
    loc = open_location(str(out))
    history = read_history(loc)
    assert len(history) == runs
    h, latest = history[-1], resolve_latest(loc)
    assert h["action"] == "full" and why in h["reason"], h
    assert (s.action, s.reason) == ("full", h["reason"])
    assert f"full rebuild: {h['reason']}" in "\n".join(s.lines())
    assert h["version"] == {"index": latest["index"], "neighbors": latest["neighbors"]} == \
        {"index": s.index_version, "neighbors": s.neighbors_version}
    assert latest["reindex"] == "full"
    im = read_manifest(loc, f"index/{latest['index']}")
    r = im["reindex"]
    assert (r["mode"], r["reason"]) == ("full", h["reason"])
    live = latest["live_chunks"]
    assert live == latest["chunks_total"] - Tombstones.load(loc).chunks
    assert (r["full_build"], r["live_at_full_build"], r["added_since_full"], r["removed_since_full"]) == \
        (latest["index"], live, 0, 0)
    assert r["added"] == im["totals"]["ntotal"] == open_index(loc).ntotal == live and r["removed"] == 0
    nm = read_manifest(loc, f"neighbors/{latest['neighbors']}")["reindex"]
    assert (nm["mode"], nm["reason"]) == ("full", h["reason"])
    n = h["neighbors"]
    assert n["rows_researched"] + n["rows_new"] == live and n["rows_checked"] == 0 and n["rows_dropped"] > 0
    assert set(list_versions(loc, "index")) == set(complete_versions(loc, "index"))  # no abandoned attempt left
    assert_neighbors_of_a_fresh_build(out, approximate)
    return im


# ----------------------------------------------------------------------------- the triggers


def test_full_flag_rebuilds_even_a_tiny_change(shared, tmp_path):
    out = flat_build(shared, tmp_path)
    base = resolve_latest(str(out))["index"]
    gone = smallest_docs(out, 1)  # well under --max-growth: without --full an update
    s = reindex(shared, out, gone, full=True)
    h = read_history(open_location(str(out)))[-1]
    assert (h["documents_removed"], h["documents_added"], h["documents_changed"]) == (1, 0, 0)
    assert h["chunks_tombstoned"] < 0.1 * sum(n for _, n in documents(out))
    im = assert_full_rebuild(out, s, "--full was given")
    assert im["index_key"] == "Flat" and h["base"]["index"] == base != h["version"]["index"]
    assert im["reindex"]["distributed"]["add_tasks"] == 2  # one per embeddings part, merged into knn.index


def test_shrink_past_max_growth_rebuilds(shared, tmp_path):
    out = flat_build(shared, tmp_path)
    docs = documents(out)
    total = sum(n for _, n in docs)
    # first run: 2 documents removed, under --max-growth: an update, counted since the full build
    first = smallest_docs(out, 2)
    removed_first = sum(n for name, n in docs if name in first)
    assert removed_first / total < 0.25
    s1 = reindex(shared, out, first, max_growth=0.25)
    assert s1.action == "incremental", s1.lines()
    r1 = read_manifest(open_location(str(out)), f"index/{s1.index_version}")["reindex"]
    assert r1["removed_since_full"] == removed_first and r1["full_build"] == s1.base[0]
    # second run: enough more removed that everything removed since the full build passes 25%
    more, removed = set(first), removed_first
    for name, n in sorted(docs, key=lambda d: d[0]):
        if removed / total > 0.25:
            break
        if name not in more:
            more.add(name)
            removed += n
    s2 = reindex(shared, out, more, max_growth=0.25)
    h = read_history(open_location(str(out)))[-1]
    assert h["documents_removed"] == len(more) - 2 and h["documents_added"] == 0
    assert_full_rebuild(out, s2, f"{removed} chunks removed since the last full build ({s1.base[0]})", runs=2)
    assert f"is {removed / total:.1%} of it, over --max-growth 25%" in h["reason"]


def test_recall_below_min_recall_rebuilds(shared, tmp_path):
    """A lossy IVF+PQ index held to a query budget that leaves no room for re-ranking more candidates
    (--max-query-ms) cannot reach --min-recall 1.0 after the update: drift. The rebuild is asked
    (--index-key) to be exact, so its neighbors can be checked exactly."""
    import faiss

    out = publish_build(shared, tmp_path, index_key="IVF4,PQ16x4", max_query_ms=1e-6)
    base = resolve_latest(str(out))["index"]
    assert read_manifest(open_location(str(out)), f"index/{base}")["neighbor_recall_at_k"] < 1.0
    gone = smallest_docs(out, 1)
    s = reindex(shared, out, gone, min_recall=1.0, index_key="Flat")
    im = assert_full_rebuild(out, s, "is below --min-recall 1.0 with the quantizers of")
    assert f"index/{base}" in s.reason and s.reason.startswith(f"neighbor recall@{K} ")
    assert im["index_key"] == "Flat"
    published = open_index(open_location(str(out)))  # kept alive while its parts are looked at
    index = faiss.downcast_index(published)
    assert isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


def test_hnsw_index_with_documents_to_remove_is_rebuilt(shared, tmp_path):
    import faiss

    out = publish_build(shared, tmp_path, index_key="HNSW32")
    gone = smallest_docs(out, 1)
    s = reindex(shared, out, gone)
    im = assert_full_rebuild(out, s, "IndexHNSWFlat indices cannot remove vectors in place", approximate=True)
    assert im["index_key"] == "HNSW32"
    published = open_index(open_location(str(out)))  # kept alive while its parts are looked at
    index = faiss.downcast_index(published)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    assert isinstance(inner, faiss.IndexHNSW)


def test_distributed_layout_is_rebuilt_as_a_single_file(shared, tmp_path):
    """The re-index only updates single-file indices: a build with the distributed (sharded)
    layout is rebuilt as one file, which later runs can update."""
    from pipelines.reindex.state import base_state, drift_reason

    out = publish_build(shared, tmp_path, index_key="Flat", distributed=True)
    loc = open_location(str(out))
    base = read_manifest(loc, f"index/{resolve_latest(loc)['index']}")
    assert base["layout"] == "shards" and base["mode"] == "distributed" and len(base["index_files"]) > 1
    gone = smallest_docs(out, 1)
    s = reindex(shared, out, gone)
    im = assert_full_rebuild(out, s, "the published index has the 'shards' layout; the re-index job updates "
                                     "single-file indices")
    assert (im["layout"], im["index_files"], im["index_key"]) == ("single", ["knn.index"], "Flat")
    now = base_state(loc)  # what the next run starts from: an update of this version, for a small change
    assert drift_reason(now, 0, 1, 1.0, now.index_manifest.get("layout", "single"), False) == ""
