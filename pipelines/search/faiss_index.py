"""Which faiss index a build gets, and the facts about it every index builder shares.

The index key (exact, IVF-Flat with about sqrt(N) lists, or autofaiss' quantized choice), the settings that
shape an index version, how many vectors a key needs to train, and how an index file is committed. Shared by
the single-node and distributed builds (:mod:`pipelines.stages.index`, :mod:`pipelines.stages.index_distributed`)
and by the re-index.
"""
from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.artifacts.storage import Location
from pipelines.artifacts.versions import put_file

if TYPE_CHECKING:
    from pipelines.artifacts.embeddings import EmbeddingsInfo

FLAT_MAX_VECTORS = 4096  # below this, exact search over everything costs less than training anything
FLAT_COMPARE_MAX = 262_144  # up to this, the single-node build also times exact search against the tuned index
TRAIN_POINTS_PER_LIST = 50  # k-means needs >= 39 per centroid (faiss warns below)
PQ_TRAIN_POINTS = 256 * 40  # 8-bit product quantizers: 256 centroids per sub-space
METRICS = ("l2", "ip")


@dataclass(frozen=True)
class IndexSettings:
    """Everything that shapes the index version (and so its fingerprint)."""

    index_key: str = ""
    max_index_memory: str = "4G"
    max_query_ms: float = 10.0
    metric: str = "l2"
    k: int = 2
    extra_neighbors: int = 10
    target_recall: float = 0.97
    recall_sample: int = 1000

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.k < 1 or self.extra_neighbors < 0:
            raise ValueError(f"--k must be >= 1 and --extra-neighbors >= 0, got {self.k} and {self.extra_neighbors}")
        if self.max_query_ms <= 0 or not 0 < self.target_recall <= 1 or self.recall_sample < 1:
            raise ValueError("--max-query-ms must be > 0, target recall in (0, 1], recall sample >= 1")
        memory_bytes(self.max_index_memory)


def memory_bytes(text: str) -> int:
    """'4G', '512M', '100m', '1.5T' or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"--max-index-memory must look like 4G, 512M or a byte count, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def batched_nlist(n: int) -> int:
    """Power of two near sqrt(n): balances coarse assignment and list scans for batched queries."""
    return int(min(1 << 18, max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def choose_index_key(n: int, dim: int, max_index_memory: str) -> str:
    """Exact search when tiny, IVF-Flat with sqrt(N) lists while it fits the memory bound, else
    autofaiss' memory-mappable quantized choice (see the module doc)."""
    if n <= FLAT_MAX_VECTORS:
        return "Flat"
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    nlist = batched_nlist(n)
    if n * (dim * 4 + 8) + nlist * dim * 4 <= memory_bytes(max_index_memory):
        return f"IVF{nlist},Flat"  # exact vectors while they fit (autofaiss quantizes from 1M on regardless)
    keys = get_optimal_index_keys_v2(n, dim, max_index_memory, should_be_memory_mappable=True)
    if not keys:
        raise ValueError(f"no index of {n} vectors of dim {dim} fits --max-index-memory {max_index_memory}")
    return keys[0]  # quantized, with its HNSW coarse quantizer: many lists cost little to assign


def flat_may_compete(info: EmbeddingsInfo, max_index_memory: str) -> bool:
    """Small enough that exact search might beat the tuned approximate index (both fit memory)."""
    return info.n <= FLAT_COMPARE_MAX and info.n * info.dim * 4 <= memory_bytes(max_index_memory)


def train_size(n: int, key: str) -> int:
    """How many vectors the key needs to train: k-means points per list, PQ codebook points."""
    nlist = 0
    if m := re.search(r"IVF(\d+)", key):
        nlist = int(m.group(1))
    elif m := re.search(r"IMI(\d+)x(\d+)", key):
        nlist = 2 ** int(m.group(2))
    need = nlist * TRAIN_POINTS_PER_LIST
    if re.search(r"PQ\d+", key):
        need = max(need, PQ_TRAIN_POINTS)
    return int(min(n, max(need, 1)))


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def check_index_key(key: str, dim: int, metric: str) -> None:
    import faiss

    try:
        faiss.index_factory(dim, key, faiss_metric(metric))
    except RuntimeError as e:
        raise ValueError(f"--index-key {key!r} is not a valid faiss index factory string: {str(e).splitlines()[0]}") from None


def write_index_file(out: Location, rel: str, index) -> None:
    """Commit a faiss index at ``rel`` (temporary name + rename locally, one upload remotely)."""
    import tempfile

    import faiss

    if out.is_local:
        final = out.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        faiss.write_index(index, tmp)
        os.replace(tmp, final)
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "index")
        faiss.write_index(index, local)
        put_file(out, rel, local)


def faiss_version() -> str:
    import faiss

    return faiss.__version__


def autofaiss_version() -> str:
    from autofaiss.version import __version__

    return __version__
