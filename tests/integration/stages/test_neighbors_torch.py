"""The GPU path of the index and neighbors stages, run on the CPU device (the same torch code): torch
k-means trains the index's coarse quantizer, and the list-major torch scan stores the same neighbors as
the CPU faiss search, on a real local Ray instance."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.versions import NeighborsReader, index_infos
from pipelines.stages.index import run_index
from pipelines.stages.neighbors import run_neighbors
from tests.helpers_embeddings import brute_force_neighbors, load_embeddings, write_synthetic_build

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def ivf_build(tmp_path_factory):
    """6,000 chunks, an IVF-Flat index whose quantizer torch k-means trained, and the CPU paths' neighbors
    (the routed search, which widens the probes of a query crowded by its own document as the scan does)."""
    b = write_synthetic_build(str(tmp_path_factory.mktemp("torch")), n_chunks=6000, dim=32, parts=3,
                              mean_doc_chunks=30, seed=5)
    s = run_index(out=b.out, index_key="IVF32,Flat", target_recall=0.9, concurrency=2, torch_device="cpu")
    index_path = run_neighbors(out=b.out, index_version=s.version, concurrency=2, search="index")
    index_ids, _ = NeighborsReader(b.out).lookup(np.arange(6000))
    cpu = run_neighbors(out=b.out, index_version=s.version, concurrency=2, search="routed")
    ids, dist = NeighborsReader(b.out).lookup(np.arange(6000))
    assert (ids == index_ids).all(1).mean() > 0.99 and abs(cpu.recall_at_k - index_path.recall_at_k) < 0.01
    return b, s, cpu, ids, dist


def test_torch_kmeans_trains_the_faiss_index_and_the_summary_says_so(ivf_build):
    b, s, _, _, _ = ivf_build
    assert "torch on cpu" in s.trainer and "torch on cpu" in " ".join(s.lines())
    assert "torch on cpu" in index_infos(b.out)["trainer"]
    assert s.neighbor_recall_at_k >= 0.9  # the tuner reached its target on the torch-trained lists


def test_torch_scan_stores_the_cpu_paths_neighbors_and_reports_their_recall(ivf_build):
    b, s, cpu, cpu_ids, cpu_dist = ivf_build
    n = run_neighbors(out=b.out, index_version=s.version, concurrency=2, torch_device="cpu")
    assert n.version != cpu.version and n.search["search"] == "torch" and n.search["device"] == "cpu"
    ids, dist = NeighborsReader(b.out).lookup(np.arange(6000))
    same = (ids == cpu_ids).all(1)
    assert same.mean() > 0.995, same.mean()
    np.testing.assert_allclose(dist[~same], cpu_dist[~same], rtol=1e-4, atol=1e-5)  # only ties differ
    assert n.rows_with_pads == 0 and n.recall_at_k is not None and abs(n.recall_at_k - cpu.recall_at_k) < 0.01
    assert "torch list-major scan on cpu" in " ".join(n.lines())
    m = read_manifest(b.out, f"neighbors/{n.version}")
    assert m["search"] == "torch" and m["recall_at_k"] == n.recall_at_k
    assert not os.path.exists(b.out.path(f"neighbors/{n.version}/_routed"))


def test_lists_sharded_over_a_small_memory_budget_give_the_same_neighbors(ivf_build):
    b, s, _, cpu_ids, cpu_dist = ivf_build
    # 6,000 x 52 bytes = 305 KiB resident: a 64 KiB budget needs at least five shards (k=3: a new version)
    n = run_neighbors(out=b.out, index_version=s.version, concurrency=2, torch_device="cpu", shard_memory="64K", k=3)
    assert n.search["shards"] >= 5 and n.search["shard_bytes_max"] <= 64 * 1024 * 1.5
    ids, dist = NeighborsReader(b.out).lookup(np.arange(6000))
    assert (ids[:, :2] == cpu_ids).all(1).mean() > 0.995  # its first two are the k=2 neighbors
    np.testing.assert_allclose(dist[:, :2], cpu_dist, rtol=1e-4, atol=1e-5)


def test_an_exact_index_is_searched_by_the_scan_as_brute_force(tmp_path):
    b = write_synthetic_build(str(tmp_path), n_chunks=1500, dim=16, parts=2, mean_doc_chunks=20, seed=6)
    s = run_index(out=b.out, concurrency=2, torch_device="cpu")
    assert s.index_key == "Flat" and not s.trainer  # nothing to train
    n = run_neighbors(out=b.out, index_version=s.version, concurrency=2, torch_device="cpu", k=3)
    assert n.search["search"] == "torch"
    ids, dist = NeighborsReader(b.out).lookup(np.arange(1500))
    want, want_d = brute_force_neighbors(load_embeddings(b), b.doc_first, 3)
    assert (ids == want).all(1).mean() > 0.99
    np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-4)
