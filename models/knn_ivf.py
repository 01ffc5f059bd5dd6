"""Per-row inverted-file (IVF) indexes over a kNN memory's ring buffer, for large rows on CPU.

Two implementations share the trained coarse quantizer (faiss k-means on the row's own keys):

* :class:`ListScanRowIndex` (backend ``"ivf"``, the CPU default when numba is installed): lists are not
  copies of the keys but a ``slot -> list`` map over the ring buffer, so an add overwrites a few map
  entries and an eviction costs nothing; a search finds each query's ``nprobe`` nearest centroids with
  faiss and scans the lists list by list with the numba kernels in :mod:`models.ivf_kernels` (every list
  is read once per search, not once per query). It returns ring-buffer slots.
* :class:`FaissRowIndex` (backend ``"faiss"``): a faiss ``IndexIVFFlat`` (or 8-bit scalar-quantised
  ``IndexIVFScalarQuantizer``) that mirrors the row's live entries with their ids; evicted ids are
  removed before their slot is reused. It returns entry ids.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

# torch before faiss: then faiss' OpenMP calls resolve to the runtime torch loaded globally, and the two
# libraries share one thread pool; with faiss loaded first each keeps its own pool, and alternating
# torch and faiss calls ran 2x slower on 2 cores (their idle threads spin against each other).
import torch  # noqa: F401  (import order only)

try:  # faiss is optional: without it every search is exact
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - faiss-cpu is a project dependency
    faiss = None

from models.knn_config import KNNMemoryConfig

__all__ = ["train_centroids", "slot_entry_ids", "FaissRowIndex", "ListScanRowIndex", "list_scan_available"]


def list_scan_available() -> bool:
    """True when the numba kernels of :class:`ListScanRowIndex` can be used (numba and faiss installed)."""
    if faiss is None:
        return False
    try:
        import models.ivf_kernels  # noqa: F401  (compiles lazily, on first call)
    except ImportError:
        return False
    return True


def train_centroids(keys: np.ndarray, nlist: int, cfg: KNNMemoryConfig, seed: int) -> np.ndarray:
    """(nlist, d) k-means centroids (inner-product assignment) of a sample of ``keys`` (n, d) float32:
    at most ``train_points_per_list`` points per list, ``train_iters`` iterations."""
    n = keys.shape[0]
    n_train = min(n, nlist * cfg.train_points_per_list)
    sample = keys[np.random.default_rng(seed).choice(n, n_train, replace=False)] if n_train < n else keys
    cp = faiss.ClusteringParameters()
    cp.niter = cfg.train_iters
    cp.max_points_per_centroid = cfg.train_points_per_list
    cp.min_points_per_centroid = 1
    cp.verbose = False
    cp.seed = seed & 0x7FFFFFFF
    clustering = faiss.Clustering(keys.shape[1], nlist, cp)
    quantizer = faiss.IndexFlatIP(keys.shape[1])
    clustering.train(np.ascontiguousarray(sample, dtype=np.float32), quantizer)
    return faiss.vector_to_array(clustering.centroids).reshape(nlist, keys.shape[1])


def slot_entry_ids(slots: np.ndarray, count: int, capacity: int) -> np.ndarray:
    """Entry ids held in ring-buffer ``slots`` of a row that has seen ``count`` adds since its clear: the
    largest id below ``count`` that maps to each slot (``id % capacity == slot``)."""
    return count - 1 - ((count - 1 - slots) % capacity)


def effective_nprobe(entries: int, nlist: int, cfg: KNNMemoryConfig) -> int:
    """Lists to scan per query: ``nprobe``, raised so that at least ``min_candidates`` entries are scanned
    while lists are small, and at most ``nlist``."""
    mean_list = max(1.0, entries / nlist)
    return int(min(nlist, max(cfg.nprobe, math.ceil(cfg.min_candidates / mean_list))))


class _RowIndexBase:
    """What both row indexes keep: the coarse quantizer and the retraining bookkeeping."""

    reads_ring_buffer = False
    """True when :meth:`search` scores the memory's own key buffer (passed in), False when the index holds
    copies of the keys."""

    def __init__(self, centroids: np.ndarray, cfg: KNNMemoryConfig, size_at_train: int) -> None:
        self.cfg = cfg
        self.nlist = int(centroids.shape[0])
        self.quantizer = faiss.IndexFlatIP(int(centroids.shape[1]))
        self.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.size_at_train = size_at_train
        self.added_since_train = 0

    def centroids(self) -> np.ndarray:
        """(nlist, dim) the trained list centroids."""
        return self.quantizer.reconstruct_n(0, self.nlist)

    def sq_params(self) -> Optional[np.ndarray]:
        """The trained scalar-quantizer ranges (faiss sq8 codec only), else None."""
        return None


class FaissRowIndex(_RowIndexBase):
    """One faiss IVF index mirroring one row's live entries (ids = entry ids since the row's clear)."""

    def __init__(self, centroids: np.ndarray, cfg: KNNMemoryConfig, size_at_train: int,
                 train_keys: Optional[np.ndarray] = None, sq_params: Optional[np.ndarray] = None) -> None:
        """An IVF over the given ``centroids``; the sq8 codec also needs ``sq_params`` or ``train_keys``
        to train its ranges on (the coarse quantizer is never retrained here)."""
        super().__init__(centroids, cfg, size_at_train)
        dim = int(centroids.shape[1])
        if cfg.ivf_codec == "sq8":
            index = faiss.IndexIVFScalarQuantizer(
                self.quantizer, dim, self.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
            )
            if sq_params is not None:
                faiss.copy_array_to_vector(np.ascontiguousarray(sq_params, dtype=np.float32), index.sq.trained)
                index.is_trained = True
            else:  # the quantizer is trained already: faiss trains only the scalar quantizer
                index.train(np.ascontiguousarray(train_keys, dtype=np.float32))
        else:
            index = faiss.IndexIVFFlat(self.quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.is_trained = True
        self.index = index

    def sq_params(self) -> Optional[np.ndarray]:
        sq = getattr(self.index, "sq", None)
        return None if sq is None else faiss.vector_to_array(sq.trained)

    def add(self, keys: np.ndarray, ids: np.ndarray, capacity: int, count_after: int) -> None:
        """Mirror an add: drop the ids evicted by it first, then add ``keys`` (n, d) with their ``ids``."""
        first_live = count_after - capacity
        if first_live > 0:
            self.index.remove_ids(faiss.IDSelectorRange(0, int(first_live)))
        if keys.shape[0]:
            self.index.add_with_ids(keys, ids.astype(np.int64))
            self.added_since_train += int(keys.shape[0])

    def search(self, queries: np.ndarray, k: int, keys: Optional[np.ndarray], count: int) -> np.ndarray:
        """(Q, k) entry ids of the best inner products, -1 where fewer were found (``keys`` and ``count``
        are unused: the index holds its own copies, with their ids)."""
        self.index.nprobe = effective_nprobe(self.index.ntotal, self.nlist, self.cfg)
        _, ids = self.index.search(queries, k)
        return ids


class ListScanRowIndex(_RowIndexBase):
    """A row's IVF as a ``slot -> list`` map over the ring buffer, searched with the numba list scan."""

    reads_ring_buffer = True

    def __init__(self, centroids: np.ndarray, cfg: KNNMemoryConfig, size_at_train: int, capacity: int) -> None:
        super().__init__(centroids, cfg, size_at_train)
        self.assign = np.full((1, capacity), -1, dtype=np.int32)  # list of each slot, -1: empty
        self._lists: Optional[tuple[np.ndarray, np.ndarray]] = None  # CSR, rebuilt after changes

    def add(self, keys: np.ndarray, ids: np.ndarray, capacity: int, count_after: int) -> None:
        """Assign ``keys`` (n, d), stored at the slots of ``ids``, to their nearest list (eviction is
        implicit: a reused slot gets its new list)."""
        if not keys.shape[0]:
            return
        _, lists = self.quantizer.search(keys, 1)
        self.assign[0, ids % capacity] = lists[:, 0]
        self.added_since_train += int(keys.shape[0])
        self._lists = None

    def search(self, queries: np.ndarray, k: int, keys: np.ndarray, count: int) -> np.ndarray:
        """(Q, k) entry ids of the best inner products, -1 where fewer were found.

        ``queries`` (Q, d) float32; ``keys`` (C, d) the row's ring buffer as float32, or as uint16 holding
        bfloat16 bits; ``count`` the row's adds since its clear (which names the entry in each slot).
        """
        from models import ivf_kernels

        _set_kernel_threads()
        if self._lists is None:
            self._lists = ivf_kernels.build_lists(self.assign, self.nlist)
        offsets, members = self._lists
        capacity = self.assign.shape[1]
        nprobe = effective_nprobe(min(count, capacity), self.nlist, self.cfg)
        _, probes = self.quantizer.search(queries, nprobe)  # (Q, nprobe)
        _, slots = ivf_kernels.ivf_search(queries[None], probes[None], offsets, members, keys[None], k)
        return np.where(slots[0] >= 0, slot_entry_ids(slots[0], count, capacity), -1)


def _set_kernel_threads() -> None:
    """Run the numba kernels on as many threads as torch uses (at most numba's pool size)."""
    import numba

    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
