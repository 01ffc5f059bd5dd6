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
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipelines.artifacts.storage import Location
from pipelines.artifacts.versions import put_file

if TYPE_CHECKING:
    from pipelines.artifacts.embeddings import EmbeddingsInfo

FLAT_MAX_VECTORS = 4096  # below this, exact search over everything costs less than training anything
FLAT_COMPARE_MAX = 262_144  # up to this, the single-node build also times exact search against the tuned index
TRAIN_POINTS_PER_LIST = 50  # sampled per list for k-means (faiss' guidance: 30-256; it warns below 39)
MIN_TRAIN_POINTS_PER_LIST = 39  # fewer lists than this many vectors each, on small builds
MAX_LISTS = 1 << 20
FLAT_QUANTIZER_MAX_LISTS = 1 << 16  # beyond, assigning to lists goes through an HNSW graph of the centroids
TWO_LEVEL_MIN_LISTS = 4096  # from here k-means runs in two levels: sqrt(nlist) clusters, then each split
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
        if self.max_query_ms <= 0:
            raise ValueError(f"--max-query-ms must be > 0, got {self.max_query_ms}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if self.recall_sample < 1:
            raise ValueError(f"the recall sample must hold at least 1 chunk, got {self.recall_sample}")
        memory_bytes(self.max_index_memory)


def memory_bytes(text: str, flag: str = "--max-index-memory") -> int:
    """'4G', '512M', '100m', '1.5T' or a plain byte count (``flag`` names the option in the error)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"{flag} must look like 4G, 512M or a byte count, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def ivf_nlist(n: int) -> int:
    """Lists for n vectors: the smallest power of two >= 4 sqrt(n) (faiss' guidance: 4-16 sqrt(n)),
    but no more than leave ``MIN_TRAIN_POINTS_PER_LIST`` vectors per list for k-means."""
    want = 1 << max(4, math.ceil(math.log2(4 * math.sqrt(max(n, 1)))))
    cap = 1 << max(4, int(math.log2(max(n // MIN_TRAIN_POINTS_PER_LIST, 16))))
    return int(min(want, cap, MAX_LISTS))


def nlist_of(key: str) -> int:
    m = re.search(r"IVF(\d+)", key)
    return int(m.group(1)) if m else 0


def _with_lists(key: str, nlist: int) -> str:
    """``key`` with ``nlist`` lists and, beyond ``FLAT_QUANTIZER_MAX_LISTS``, an HNSW coarse quantizer."""
    quantizer = "_HNSW32" if nlist > FLAT_QUANTIZER_MAX_LISTS else ""
    return re.sub(r"IVF\d+(_HNSW\d+)?", f"IVF{nlist}{quantizer}", key)


@dataclass(frozen=True)
class IndexChoice:
    """The automatic index key and why (the index summary prints the reason)."""

    key: str
    reason: str


def explain_index_choice(n: int, dim: int, max_index_memory: str) -> IndexChoice:
    """Exact search when tiny; IVF-Flat while the exact vectors fit the memory bound; else
    autofaiss' memory-mappable quantized key, with its list count brought into faiss' 4-16 sqrt(N)
    range when it falls outside (an HNSW coarse quantizer beyond 65,536 lists)."""
    if n <= FLAT_MAX_VECTORS:
        return IndexChoice("Flat", f"{n} vectors: exact search costs less than training anything")
    nlist = ivf_nlist(n)
    if n * (dim * 4 + 8) + nlist * dim * 4 <= memory_bytes(max_index_memory):
        return IndexChoice(_with_lists("IVF1,Flat", nlist),
                           f"exact vectors fit --max-index-memory {max_index_memory}; {nlist} lists "
                           f"({nlist / math.sqrt(n):.1f} sqrt(N))")
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    keys = get_optimal_index_keys_v2(n, dim, max_index_memory, should_be_memory_mappable=True)
    if not keys:
        raise ValueError(f"no index of {n} vectors of dim {dim} fits --max-index-memory {max_index_memory}")
    theirs = nlist_of(keys[0])
    ratio = theirs / math.sqrt(n)
    if 4 <= ratio <= 16:
        return IndexChoice(keys[0], f"autofaiss' choice for --max-index-memory {max_index_memory} "
                                                         f"({theirs} lists, {ratio:.1f} sqrt(N))")
    return IndexChoice(_with_lists(keys[0], nlist),
                       f"autofaiss' codes for --max-index-memory {max_index_memory}, with {nlist} lists instead of its "
                       f"{theirs} ({ratio:.1f} sqrt(N), outside faiss' 4-16 sqrt(N))")


def choose_index_key(n: int, dim: int, max_index_memory: str) -> str:
    return explain_index_choice(n, dim, max_index_memory).key


def flat_may_compete(info: EmbeddingsInfo, max_index_memory: str) -> bool:
    """Small enough that exact search might beat the tuned approximate index (both fit memory)."""
    return info.n <= FLAT_COMPARE_MAX and info.n * info.dim * 4 <= memory_bytes(max_index_memory)


def train_index(index, x: np.ndarray) -> None:
    """Train ``index`` on the sample ``x``. With many lists, the coarse k-means runs in two levels
    (faiss' ``two_level_clustering``: sqrt(nlist) clusters, each split in proportion to its size),
    which costs about 2 sqrt(nlist) instead of nlist distance computations per point and iteration:
    at 16,384 lists, 64x less work, so training stays minutes where flat k-means takes hours."""
    from faiss.contrib.clustering import two_level_clustering

    from pipelines.search.knn import ivf_of

    ivf = ivf_of(index)
    if ivf is None or ivf.nlist < TWO_LEVEL_MIN_LISTS or ivf.is_trained:
        index.train(x)
        return
    train_with_centroids(index, x, lambda xt, nlist, _spherical: two_level_clustering(xt, int(math.sqrt(nlist)), nlist)[0])


def train_with_centroids(index, x: np.ndarray, centroids_of: Callable[[np.ndarray, int, bool], np.ndarray]) -> None:
    """Train an untrained IVF ``index`` whose coarse centroids come from ``centroids_of(xt, nlist,
    spherical)``: its pre-transforms first (``xt`` is ``x`` through them), then the quantizer filled
    with those centroids, then whatever the codes need (PQ, SQ) from faiss."""
    import faiss

    from pipelines.search.knn import ivf_of

    ivf = ivf_of(index)
    top = faiss.downcast_index(index)
    xt = x
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            vt = top.chain.at(i)
            vt.train(xt)
            xt = vt.apply(xt)
    centroids = centroids_of(xt, int(ivf.nlist), ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    ivf.train(xt)  # the quantizer is full: this trains only what the codes need (PQ, SQ)
    index.is_trained = True


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
