"""The neighbor rule and its pieces, without Ray: filtering, the per-document retry, exact search,
recall with ties, and reading embeddings/docs in pieces."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.artifacts.embeddings import DocBounds, EmbeddingPart, NpyPart, gather_rows, load_embeddings_info, uniform_sample
from pipelines.artifacts.storage import open_location
from pipelines.search.knn import (
    empty_topk,
    exact_block,
    filter_candidates,
    merge_topk,
    recall_at_k,
    search_excluding,
    search_neighbors,
)
from tests.helpers_embeddings import brute_force_neighbors, load_embeddings, write_synthetic_build


def test_filter_drops_self_same_document_and_missing_then_pads():
    cand = np.array([[5, 6, 2, 9, -1, 7], [3, 4, 1, 0, 2, 8]])
    dist = np.arange(12, dtype=np.float32).reshape(2, 6)
    # query 5 lives in document [4, 7): 5, 6 are out; query 3 in [0, 3): 1, 0, 2 are out
    ids, d, n = filter_candidates(cand, dist, np.array([5, 3]), np.array([4, 0]), np.array([7, 3]), 3, "l2")
    assert ids.tolist() == [[2, 9, 7], [4, 8, -1]]
    assert d[0].tolist() == [2.0, 3.0, 5.0] and d[1, 2] == np.inf
    assert n.tolist() == [3, 2]


@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_filter_properties(n_cand, k, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 50, 8)
    lo = np.maximum(q - rng.integers(0, 5, 8), 0)
    hi = q + 1 + rng.integers(0, 5, 8)
    cand = rng.integers(-1, 60, (8, n_cand))
    ids, _, n = filter_candidates(cand, np.zeros(cand.shape, np.float32), q, lo, hi, k, "l2")
    for row, qq, a, b, c, nv in zip(ids, q, lo, hi, cand, n):
        real = row[row >= 0]
        assert qq not in real and not ((real >= a) & (real < b)).any()
        assert (row[: len(real)] >= 0).all() and (row[len(real):] == -1).all()  # pads only at the end
        expected = [x for x in c if x >= 0 and x != qq and not a <= x < b][:k]
        assert real.tolist() == expected and nv == len(expected)


def _clustered(n_docs=20, per_doc=30, dim=16, seed=0):
    """Each document is a tight blob: its own chunks are always nearer than any other document's."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_docs, dim)) * 5
    x = np.repeat(centers, per_doc, 0) + 0.01 * rng.standard_normal((n_docs * per_doc, dim))
    first = np.arange(0, n_docs * per_doc, per_doc)
    return x.astype(np.float32), first


@pytest.mark.parametrize("key", ["Flat", "IVF8,Flat", "HNSW16", "shards"])
def test_retry_fills_rows_that_their_own_document_crowds_out(key):
    x, first = _clustered()
    n, d = x.shape
    if key == "shards":
        index = faiss.IndexShards(d, False, True)
        for s in range(0, n, 200):
            sub = faiss.IndexFlatL2(d)
            sub.add(x[s:s + 200])
            index.add_shard(sub)
    else:
        index = faiss.index_factory(d, key)
        index.train(x)
        index.add(x)
        if key.startswith("IVF"):
            faiss.extract_index_ivf(index).nprobe = 1
    bounds = DocBounds(first, n)
    q = np.arange(n)
    lo, hi = bounds.range_of(q)
    # extra=3: every one of the 5 candidates is from the query's own 30-chunk document
    ids, dist, short = search_neighbors(index, x, q, lo, hi, k=2, extra=3, metric="l2")
    assert not short.any() and (ids >= 0).all()
    assert not ((ids >= lo[:, None]) & (ids < hi[:, None])).any()
    exact, _ = brute_force_neighbors(x, first, 2)
    found = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(ids, exact)])
    if key in ("Flat", "shards"):  # exact indices find the exact answer; approximate ones are tuned elsewhere
        assert found == 1.0


def test_exact_retry_paths_agree(monkeypatch):
    """Short rows on an exact index: the wide batched re-search and the per-document selector
    search (used for documents too long to re-fetch) give the same neighbors."""
    import pipelines.search.knn as core

    x, first = _clustered(n_docs=10, per_doc=40, seed=5)
    x += 0.3 * np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    q = np.arange(len(x))
    lo, hi = DocBounds(first, len(x)).range_of(q)
    wide = search_neighbors(index, x, q, lo, hi, k=3, extra=2, metric="l2")
    monkeypatch.setattr(core, "EXACT_REFETCH_MAX", 4)
    narrow = search_neighbors(index, x, q, lo, hi, k=3, extra=2, metric="l2")
    assert np.array_equal(wide[0], narrow[0]) and np.allclose(wide[1], narrow[1], rtol=1e-5)
    exact, _ = brute_force_neighbors(x, first, 3)
    assert np.array_equal(wide[0], exact)


def test_search_excluding_on_shards_uses_global_ids():
    x, first = _clustered(n_docs=6, per_doc=50)
    index = faiss.IndexShards(x.shape[1], False, True)
    for s in range(0, 300, 100):  # shard boundaries cut through documents
        sub = faiss.IndexFlatL2(x.shape[1])
        sub.add(x[s:s + 100])
        index.add_shard(sub)
    _, ids = search_excluding(index, x[120:125], 4, 100, 150, 1, "l2")
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    _, ref = flat.search(x[120:125], 300)
    ref = np.array([[i for i in row if not 100 <= i < 150][:4] for row in ref])
    assert ids.tolist() == ref.tolist()


def test_pads_when_too_few_chunks_outside_the_document():
    x, first = _clustered(n_docs=2, per_doc=3)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    q = np.arange(6)
    lo, hi = DocBounds(first, 6).range_of(q)
    ids, dist, short = search_neighbors(index, x, q, lo, hi, k=5, extra=0, metric="l2")
    assert short.all() and ((ids >= 0).sum(1) == 3).all() and (ids[:, 3:] == -1).all()
    assert np.isinf(dist[:, 3:]).all()


def test_exact_block_matches_brute_force_and_merges_across_blocks():
    x, first = _clustered(n_docs=8, per_doc=25, seed=3)
    x += np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    q = np.array([0, 31, 77, 199])
    lo, hi = DocBounds(first, len(x)).range_of(q)
    raw, filt = empty_topk(4, 5), empty_topk(4, 5)
    for s in range(0, len(x), 37):
        r, f = exact_block(x[q], q, lo, hi, x[s:s + 37], np.arange(s, min(s + 37, len(x))), 5, "l2")
        raw, filt = merge_topk(raw, r, 5), merge_topk(filt, f, 5)
    ref, _ = brute_force_neighbors(x, first, 5, queries=q)
    assert filt[0].tolist() == ref.tolist()
    assert all(i not in row for i, row in zip(q, raw[0]))


def test_recall_counts_ties_and_misses():
    gt_ids = np.array([[1, 2, 3, 4]])
    gt_scores = np.array([[0.1, 0.5, 0.5, 0.9]], np.float32)  # 2 and 3 tie for second place
    assert recall_at_k(np.array([[1, 3]]), gt_ids, gt_scores, 2) == 1.0
    assert recall_at_k(np.array([[1, 4]]), gt_ids, gt_scores, 2) == 0.5
    assert recall_at_k(np.array([[-1, -1]]), gt_ids, gt_scores, 2) == 0.0
    # fewer exact neighbors than k: only the ones that exist are wanted
    assert recall_at_k(np.array([[7, -1]]), np.array([[7, -1, -1]]), np.array([[0.2, np.inf, np.inf]], np.float32), 2) == 1.0


def test_npy_part_reads_rows_and_samples(tmp_path):
    b = write_synthetic_build(str(tmp_path), n_chunks=500, dim=8, parts=3, dtype="float16")
    info = load_embeddings_info(b.out)
    x = load_embeddings(b)
    part = info.parts[1]
    npy = NpyPart(b.out, f"embeddings/{part.path}")
    assert npy.rows == part.rows and npy.dim == 8
    assert np.array_equal(npy.read(3, 10), x[part.offset + 3:part.offset + 10])
    ids = uniform_sample(500, 40, "t")
    assert len(set(ids.tolist())) == 40 and np.all(np.diff(ids) > 0)
    assert np.array_equal(gather_rows(b.out, info, ids), x[ids])
    dense = np.arange(0, part.rows, 2)
    assert np.array_equal(npy.take(dense, block_rows=16), x[part.offset + dense])
    assert EmbeddingPart.from_dict(part.to_dict()) == part


def test_doc_bounds_from_docs_parts(tmp_path):
    b = write_synthetic_build(str(tmp_path), n_chunks=300, dim=4, parts=2, mean_doc_chunks=7)
    bounds = DocBounds.load(open_location(str(tmp_path)), 300)
    ids = np.arange(300)
    lo, hi = bounds.range_of(ids)
    doc = b.doc_of(ids)
    assert np.array_equal(lo, b.doc_first[doc])
    assert np.array_equal(hi, b.doc_first[doc] + b.doc_sizes[doc])
    with pytest.raises(ValueError, match="tile"):
        DocBounds.load(open_location(str(tmp_path)), 301)


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_list_major_ivf_search_equals_faiss(tmp_path, metric):
    from pipelines.artifacts.versions import read_faiss
    from pipelines.search import ivf_blas

    rng = np.random.default_rng(7)
    x = rng.standard_normal((6000, 128)).astype(np.float32)
    index = faiss.index_factory(128, "IVF32,Flat", metric)
    index.train(x[:2000])
    index.add(x)
    faiss.write_index(index, str(tmp_path / "i.index"))
    mapped = read_faiss(str(tmp_path / "i.index"), mmap=True)  # lists read from the memory-mapped file
    for idx in (index, mapped):
        ivf = faiss.extract_index_ivf(idx)
        ivf.nprobe = 4
        d_ref, i_ref = idx.search(x[:1500], 7)
        assert ivf_blas.worth_it(faiss.downcast_index(ivf), 1500)
        d, i = ivf_blas.search(faiss.downcast_index(ivf), x[:1500], 7)
        assert (i == i_ref).mean() > 0.999
        assert np.allclose(d, d_ref, rtol=1e-4, atol=1e-3)
