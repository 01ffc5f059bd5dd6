"""The local cache of a published index on object storage (``open_index`` / ``fetch_files``): keyed and checked
by the manifest's sha256 before faiss reads a byte, so neither a later build at the same URL (same version name,
other bytes) nor a damaged cached copy is ever used. A real fsspec filesystem (``memory://``) stands in for S3."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from pipelines.artifacts.manifest import write_manifest
from pipelines.artifacts.storage import open_location, write_bytes_atomic
from pipelines.artifacts.versions import file_entry, open_index

N, DIM = 32, 8


def publish_flat_index(out, seed: int) -> np.ndarray:
    """``index/v0001`` holding N random vectors (same size for every seed); returns the vectors."""
    import faiss

    x = np.random.default_rng(seed).standard_normal((N, DIM)).astype(np.float32)
    index = faiss.IndexFlatL2(DIM)
    index.add(x)
    write_bytes_atomic(out, "index/v0001/knn.index", faiss.serialize_index(index).tobytes())
    write_manifest(out, "index/v0001", stage="index", parts=[file_entry(out, "index/v0001/knn.index", "knn.index")],
                   totals={"chunks": N, "ntotal": N, "dim": DIM}, config={},
                   extra={"layout": "single", "index_files": ["knn.index"], "index_key": "Flat", "metric": "l2"})
    return x


@pytest.fixture
def remote():
    return open_location(f"memory://index-cache-{uuid.uuid4().hex[:8]}/build")


def cached_files(cache) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]


def test_an_earlier_build_at_the_same_url_is_never_read_from_the_cache(remote, tmp_path):
    cache = str(tmp_path / "cache")
    first = publish_flat_index(remote, seed=1)
    assert np.array_equal(open_index(remote, "v0001", cache_dir=cache).reconstruct_n(0, N), first)
    second = publish_flat_index(remote, seed=2)  # rebuilt at the same URL: same version name, same size
    assert np.array_equal(open_index(remote, "v0001", cache_dir=cache).reconstruct_n(0, N), second)


def test_a_damaged_cached_copy_is_fetched_again(remote, tmp_path):
    cache = str(tmp_path / "cache")
    x = publish_flat_index(remote, seed=3)
    open_index(remote, "v0001", cache_dir=cache)
    (path,) = cached_files(cache)
    with open(path, "r+b") as f:  # same size, other bytes: the vectors at the end of the file
        f.seek(-16, os.SEEK_END)
        f.write(b"\xff" * 16)
    assert np.array_equal(open_index(remote, "v0001", cache_dir=cache).reconstruct_n(0, N), x)
