"""The torch k-means and list-major IVF scan (pipelines.search.torch_*) on the CPU device, checked against
faiss' own k-means and against brute force: the same code runs on CUDA in the GPU neighbors path."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from pipelines.search.torch_kmeans import kmeans
from pipelines.search.torch_scan import Coarse, DeviceLists, device_bytes_per_vector, plan_shards, search


def clustered(n: int, dim: int, topics: int, seed: int, doc_len: int = 10):
    """Topic centers + document offsets + noise (documents of ``doc_len`` consecutive rows), like the
    synthetic builds: own-document vectors crowd each other's neighbor lists."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((topics, dim)).astype(np.float32)
    docs = (n + doc_len - 1) // doc_len
    doc_center = centers[rng.integers(0, topics, docs)] + 0.5 * rng.standard_normal((docs, dim)).astype(np.float32)
    x = np.repeat(doc_center, doc_len, 0)[:n] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    groups = (np.arange(n) // doc_len) * doc_len  # each row's document, named by its first row
    return x.astype(np.float32), groups.astype(np.int64)


def brute_force(x: np.ndarray, groups: np.ndarray, k: int, metric: str = "l2"):
    if metric == "l2":
        d = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    else:
        d = -(x @ x.T)
    d[groups[:, None] == groups[None, :]] = np.inf
    ids = np.argsort(d, 1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, 1)


def ivf_recall(x: np.ndarray, centroids: np.ndarray, nprobe: int, k: int = 10) -> float:
    """recall@k of an IVF-Flat index with these centroids against exact search (queries: the data)."""
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], len(centroids))
    index.quantizer.add(centroids)
    index.is_trained = True
    index.add(x)
    index.nprobe = nprobe
    _, found = index.search(x[:500], k)
    _, want = faiss.knn(x[:500], x, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, want)]))


def test_torch_kmeans_centroids_give_an_index_as_good_as_faiss_kmeans():
    x, _ = clustered(10_000, 32, topics=40, seed=0)
    nlist = 64
    ours = kmeans(torch.from_numpy(x), nlist, seed=1)
    assert ours.centroids.shape == (nlist, 32) and torch.bincount(ours.assignment, minlength=nlist).min() > 0
    theirs = faiss.Kmeans(32, nlist, niter=20, seed=1)
    theirs.train(x)
    r_ours, r_theirs = ivf_recall(x, ours.centroids.numpy(), 4), ivf_recall(x, theirs.centroids, 4)
    assert r_ours >= r_theirs - 0.03, (r_ours, r_theirs)
    # same seed, same centroids; a spherical run gives unit centroids
    assert torch.equal(kmeans(torch.from_numpy(x), nlist, seed=1).centroids, ours.centroids)
    sph = kmeans(torch.from_numpy(x), nlist, seed=1, spherical=True, iterations=3)
    assert torch.allclose(sph.centroids.norm(dim=1), torch.ones(nlist), atol=1e-5)


def test_kmeans_reseeds_empty_clusters_and_refuses_too_few_points():
    x = torch.zeros(200, 4)
    x[:100] += 1.0  # two distinct points, many copies: most clusters start empty-prone
    x += 1e-3 * torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    r = kmeans(x, 8, seed=0, iterations=5)
    assert torch.isfinite(r.centroids).all()
    with pytest.raises(ValueError, match="needs at least 8 points"):
        kmeans(torch.zeros(5, 4), 8)


def _lists(x, groups, centroids, metric, dtype=torch.float32, list_shard=None, shard=0):
    coarse = Coarse(torch.from_numpy(centroids), metric)
    xt = torch.from_numpy(x)
    lists = coarse.probes(xt, 1)[:, 0]
    keep = torch.ones(len(x), dtype=torch.bool) if list_shard is None else torch.from_numpy(list_shard)[lists] == shard
    ids = torch.arange(len(x))
    return coarse, lists, DeviceLists.build(ids[keep], torch.from_numpy(groups)[keep], lists[keep], xt[keep],
                                            len(centroids), dtype)


@pytest.mark.parametrize("metric,dtype", [("l2", torch.float32), ("ip", torch.float32), ("l2", torch.float16)])
def test_scan_probing_every_list_is_exact_search_without_the_own_document(metric, dtype):
    x, groups = clustered(2000, 24, topics=12, seed=2)
    if dtype == torch.float16:
        x = x.astype(np.float16).astype(np.float32)  # stored float16 embeddings: exact in the scan's dtype
    centroids = kmeans(torch.from_numpy(x), 16, seed=0, iterations=5).centroids.numpy()
    coarse, lists, dl = _lists(x, groups, centroids, metric, dtype)
    sizes = torch.bincount(lists, minlength=16)
    s, i = search([dl], coarse, torch.from_numpy(x), torch.from_numpy(groups), torch.full((2000,), 12), sizes,
                  nprobe=16, k=3, score_budget=200_000)
    want_i, want_d = brute_force(x, groups, 3, metric)
    got_d = s.numpy() if metric == "l2" else -s.numpy()
    np.testing.assert_allclose(got_d, want_d if metric == "l2" else -want_d, rtol=1e-4, atol=1e-3)
    same = (i.numpy() == want_i).all(1)
    assert same.mean() > 0.99  # the rest are ties
    assert not (groups[i.numpy()] == groups[:, None]).any()  # never the chunk itself nor its document


def test_sharded_scan_equals_one_shard_and_a_document_filling_its_lists_still_gets_k():
    x, groups = clustered(4000, 16, topics=20, seed=3)
    groups[:400] = 0  # one 400-chunk document: it fills the few lists it sits in
    centroids = kmeans(torch.from_numpy(x), 32, seed=0, iterations=5).centroids.numpy()
    coarse, lists, whole = _lists(x, groups, centroids, "l2")
    sizes = torch.bincount(lists, minlength=32)
    need = torch.from_numpy(np.where(groups == 0, 400, 10) + 2)
    args = (coarse, torch.from_numpy(x), torch.from_numpy(groups), need, sizes)
    one = search([whole], *args, nprobe=2, k=2)
    plan = plan_shards(sizes.numpy(), device_bytes_per_vector(16, torch.float32), 30_000)
    shards = [_lists(x, groups, centroids, "l2", list_shard=plan, shard=s)[2] for s in range(plan.max() + 1)]
    assert len(shards) >= 4 and all(sh.nbytes <= 30_000 or len(sh.lists) == 1 for sh in shards)
    many = search(shards, *args, nprobe=2, k=2)
    assert torch.equal(one[1], many[1]) or (one[1] != many[1]).float().mean() < 0.01
    torch.testing.assert_close(one[0], many[0])
    assert (one[1] >= 0).all()  # widened probes found k neighbors outside the big document too
    assert not (groups[one[1].numpy()] == groups[:, None]).any()
