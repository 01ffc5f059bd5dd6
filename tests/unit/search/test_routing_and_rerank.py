"""The pieces of accurate neighbors at scale, without Ray: exact re-ranking of a lossy index's
candidates, shard plans bounded by memory, the per-shard exact scan with the neighbor rule, and
the extra probes a query gets when its own document fills its lists."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipelines.artifacts.embeddings import load_embeddings_info
from pipelines.search.knn import search_neighbors
from pipelines.search.rerank import ExactVectors, is_lossy
from pipelines.search.routing import (
    ShardVectors,
    check_search_mode,
    pairs_by_shard,
    plan_shards,
    probes_needed,
    scan_shard,
    shard_bytes_per_vector,
    spatial_list_order,
)
from tests.helpers_embeddings import brute_force_neighbors, load_embeddings, write_synthetic_build


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    b = write_synthetic_build(str(tmp_path_factory.mktemp("b")), n_chunks=3000, dim=32, parts=3, mean_doc_chunks=20, seed=5)
    return b, load_embeddings(b)


def test_lossiness_is_read_from_the_index_type():
    d = 16
    assert not is_lossy(faiss.index_factory(d, "Flat"))
    assert not is_lossy(faiss.index_factory(d, "IVF4,Flat"))
    assert not is_lossy(faiss.index_factory(d, "HNSW8"))
    assert not is_lossy(faiss.IndexIDMap2(faiss.IndexFlatL2(d)))
    for key in ("IVF4,PQ4", "PQ4", "IVF4,SQ8", "OPQ4_16,IVF4,PQ4", "HNSW8_SQ8", "PCA8,IVF4,Flat"):
        assert is_lossy(faiss.index_factory(d, key)), key


def test_rescore_orders_candidates_by_exact_distance(small):
    b, x = small
    exact = ExactVectors(b.out, load_embeddings_info(b.out))
    q = x[[10, 2000]]
    cand = np.array([[5, 2999, 1500, -1, 7], [0, 1, 2, 3, -1]])
    d, ids = exact.rescore(q, cand, "l2")
    for row in range(2):
        want = sorted((float(((q[row] - x[c]) ** 2).sum()), c) for c in cand[row] if c >= 0)
        assert ids[row, :4].tolist() == [c for _, c in want] and ids[row, 4] == -1
        np.testing.assert_allclose(d[row, :4], [v for v, _ in want], rtol=1e-4)
    d_ip, ids_ip = exact.rescore(q, cand, "ip")
    assert ids_ip[0, 0] == max((c for c in cand[0] if c >= 0), key=lambda c: float(q[0] @ x[c]))


def test_reranking_lifts_a_pq_index_to_the_exact_neighbors(small):
    b, x = small
    index = faiss.index_factory(32, "IVF16,PQ4")  # 4 bytes per 32-dim vector: very lossy
    index.train(x)
    index.add(x)
    index.nprobe = 16  # every list: what is left is PQ's own error
    queries = np.arange(0, 3000, 7)
    lo, hi = (b.doc_first[np.searchsorted(b.doc_first, queries, side="right") - 1],
              np.append(b.doc_first, 3000)[np.searchsorted(b.doc_first, queries, side="right")])
    want, _ = brute_force_neighbors(x, b.doc_first, 2, queries=queries)
    plain, _, _ = search_neighbors(index, x[queries], queries, lo, hi, k=2, extra=10, metric="l2")
    exact = ExactVectors(b.out, load_embeddings_info(b.out))
    ranked, dist, _ = search_neighbors(index, x[queries], queries, lo, hi, k=2, extra=10, metric="l2",
                                       exact=exact, rerank=200)

    def recall(found):
        return np.mean([len(set(f) & set(w)) / 2 for f, w in zip(found, want)])

    assert recall(plain) < 0.8 and recall(ranked) >= 0.97, (recall(plain), recall(ranked))
    # the stored distances are the exact ones, not the PQ estimates
    np.testing.assert_allclose(dist[:, 0], ((x[queries] - x[ranked[:, 0]]) ** 2).sum(1), rtol=1e-4)


def test_shard_plan_respects_the_budget_and_covers_every_list():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 200, 64)
    sizes[[3, 9]] = 0
    centroids = rng.normal(size=(64, 8)).astype(np.float32)
    per_vector = shard_bytes_per_vector(8)
    plan = plan_shards(sizes, centroids, 8, 1000 * per_vector)
    assert plan.shards >= int(np.ceil(sizes.sum() / 1000))
    assert (plan.list_shard[sizes > 0] >= 0).all() and (plan.list_shard[sizes == 0] == -1).all()
    for s in range(plan.shards):
        held = sizes[plan.list_shard == s].sum() * per_vector
        assert held == plan.shard_bytes[s] and held <= 1000 * per_vector
    assert plan_shards(sizes, centroids, 8, 10**12).shards == 1


def test_spatial_order_keeps_near_centroids_together():
    rng = np.random.default_rng(1)
    # four far-apart clusters of 16 centroids each, shuffled
    centers = np.repeat(np.eye(4, 8) * 100, 16, axis=0) + rng.normal(size=(64, 8))
    perm = rng.permutation(64)
    order = spatial_list_order(centers[perm].astype(np.float32))
    assert sorted(order.tolist()) == list(range(64))
    cluster = (perm // 16)[order]
    assert (np.diff(cluster) != 0).sum() == 3  # each cluster is one contiguous run


def test_scan_shard_is_exact_within_the_probed_lists_and_applies_the_neighbor_rule():
    rng = np.random.default_rng(2)
    n, d, k = 400, 8, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    lists = rng.integers(0, 10, n)
    doc_first = np.arange(0, n, 5)
    shard_lists = np.array([1, 4, 7])
    mine = np.isin(lists, shard_lists)
    idx = np.nonzero(mine)[0]
    half = len(idx) // 2  # built from two pieces, as a scan task does from its parts' files
    shard = ShardVectors.from_pieces([(idx[:half], lists[idx[:half]], x[idx[:half]].astype(np.float16)),
                                      (idx[half:], lists[idx[half:]], x[idx[half:]].astype(np.float16))])
    x = x.astype(np.float16).astype(np.float32)  # the values the shard holds
    q_ids = np.arange(0, n, 3)
    probes = np.stack([rng.permutation(10)[:4] for _ in q_ids])
    lo = doc_first[q_ids // 5]
    hi = lo + 5
    list_shard = np.where(np.isin(np.arange(10), shard_lists), 0, 1)
    pair_rows, pair_lists = pairs_by_shard(probes, list_shard, 2)[0]
    assert set(pair_lists.tolist()) <= set(shard_lists.tolist()) and len(pair_rows) == np.isin(probes, shard_lists).sum()
    ids, scores = scan_shard(shard, x[q_ids], q_ids, pair_rows, pair_lists, lo, hi, k, "l2")
    for row, q in enumerate(q_ids):
        allowed = np.isin(lists, np.intersect1d(probes[row], shard_lists)) & ((np.arange(n) < lo[row]) | (np.arange(n) >= hi[row]))
        cand = np.nonzero(allowed)[0]
        ref = cand[np.argsort(((x[cand] - x[q]) ** 2).sum(1), kind="stable")[:k]]
        got = ids[row][ids[row] >= 0]
        assert got.tolist() == ref.tolist()
        np.testing.assert_allclose(scores[row, :len(got)], ((x[got] - x[q]) ** 2).sum(1), rtol=1e-4, atol=1e-5)


def test_a_query_whose_document_fills_its_lists_probes_more():
    probes = np.array([[5, 2, 7, 1], [5, 2, 7, 1], [5, 2, 7, 1]])
    sizes = np.zeros(8, np.int64)
    sizes[[5, 2, 7, 1]] = [10, 10, 10, 10]
    cut = probes_needed(probes, sizes, 1, np.array([3, 15, 100]))
    assert cut.tolist() == [[5, -1, -1, -1], [5, 2, -1, -1], [5, 2, 7, 1]]


def test_search_mode_is_validated():
    check_search_mode("routed", "512M")
    with pytest.raises(ValueError, match="--neighbors-search"):
        check_search_mode("sharded", "2G")
    with pytest.raises(ValueError, match="4G, 512M"):
        check_search_mode("auto", "lots")


def test_many_lists_train_in_two_levels_and_still_cluster_well(monkeypatch):
    import faiss.contrib.clustering as clustering

    from pipelines.search.faiss_index import TWO_LEVEL_MIN_LISTS, train_index

    calls = []
    real = clustering.two_level_clustering
    monkeypatch.setattr(clustering, "two_level_clustering", lambda *a, **kw: calls.append(a[1:3]) or real(*a, **kw))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(TWO_LEVEL_MIN_LISTS * 40, 8)).astype(np.float32)
    two = faiss.index_factory(8, f"IVF{TWO_LEVEL_MIN_LISTS},Flat")
    train_index(two, x)
    assert calls == [(64, TWO_LEVEL_MIN_LISTS)]  # sqrt(nlist) clusters first, then split
    assert two.is_trained and two.quantizer.ntotal == TWO_LEVEL_MIN_LISTS
    small = faiss.index_factory(8, "IVF64,Flat")
    train_index(small, x[:5000])
    assert len(calls) == 1 and small.is_trained
    # no worse than 15% above flat k-means' quantization error on the same sample
    flat = faiss.Kmeans(8, TWO_LEVEL_MIN_LISTS, niter=10, seed=1)
    flat.train(x)
    err_two = two.quantizer.search(x, 1)[0].mean()
    err_flat = flat.index.search(x, 1)[0].mean()
    assert err_two <= 1.15 * err_flat, (err_two, err_flat)
