"""The settings of a per-row kNN memory: shared by the memory (:mod:`models.knn_memory`) and its row indexes
(:mod:`models.knn_ivf`), so neither imports the other for them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

BACKENDS = ("auto", "exact", "ivf", "faiss")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class KNNMemoryConfig:
    """Settings of a per-row kNN memory."""

    dim: int = 64
    """Width of keys and values (the attention head width)."""

    capacity: int = 65536
    """Entries kept per row; when full, the oldest entries are evicted first (FIFO)."""

    backend: str = "auto"
    """``"auto"`` (exact on GPU and for small rows; for large rows on CPU the numba IVF list scan, or faiss
    when numba is missing or ``ivf_codec`` is ``"sq8"``), ``"exact"``, ``"ivf"`` (the numba IVF list scan)
    or ``"faiss"`` (a faiss IVF index). ``"ivf"`` and ``"faiss"`` apply to rows with at least
    ``faiss_min_entries`` entries, on any device; smaller rows are searched exactly."""

    faiss_min_entries: int = 8192
    """A row switches from exact search to an IVF index once it holds this many entries (CPU only under
    ``"auto"``)."""

    nlist: Optional[int] = None
    """IVF lists per row at full size; ``None`` means about ``4 * sqrt(capacity)`` (1024 at 64k).
    Smaller rows use fewer lists (at least ``train_points_per_list`` training points per list)."""

    ivf_codec: str = "flat"
    """How faiss IVF lists store keys: ``"flat"`` (IndexIVFFlat, exact distances within the scanned lists)
    or ``"sq8"`` (IndexIVFScalarQuantizer, 8 bits per dimension; results are still exact keys and values,
    only the ranking uses the 8-bit codes). The numba list scan always ranks by the stored keys."""

    nprobe: int = 4
    """IVF lists scanned per query: the speed/recall knob (4 of 1,024 lists gave recall@32 0.94 on
    clustered unit vectors at 64k entries; see benchmarks/knn_memory_speed.py)."""

    min_candidates: int = 256
    """Scan at least this many entries per query (raises ``nprobe`` while lists are small)."""

    train_points_per_list: int = 32
    """k-means sample size per list when (re)training the IVF quantizer."""

    train_iters: int = 10
    """k-means iterations when (re)training the IVF quantizer."""

    retrain_growth: float = 2.0
    """Retrain a row's quantizer when its size has grown by this factor since the last training."""

    retrain_turnover: float = 1.0
    """Retrain a row's quantizer after this many capacities of new entries since the last training."""

    storage_dtype: str = "float32"
    """dtype of the key/value ring buffers: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""

    exact_dtype: str = "float32"
    """dtype of the exact-search matmul: ``"float32"`` (bit-exact ranking) or ``"bfloat16"`` (faster on
    CPUs with bf16 units and on GPU; near-ties may swap)."""

    exact_chunk_elems: int = 1 << 24
    """Cap on ``queries x entries`` scores materialised at once per row by the exact search."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "ivf" and self.ivf_codec != "flat":
            raise ValueError(f"ivf_codec={self.ivf_codec!r} applies to backend='faiss' only")
        if self.faiss_min_entries < 1:
            raise ValueError(f"faiss_min_entries must be >= 1, got {self.faiss_min_entries}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist must be >= 1 or None, got {self.nlist}")
        if self.ivf_codec not in ("flat", "sq8"):
            raise ValueError(f"ivf_codec must be 'flat' or 'sq8', got {self.ivf_codec!r}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.min_candidates < 0:
            raise ValueError(f"min_candidates must be >= 0, got {self.min_candidates}")
        if self.train_points_per_list < 1 or self.train_iters < 1:
            raise ValueError("train_points_per_list and train_iters must be >= 1")
        if self.retrain_growth <= 1.0:
            raise ValueError(f"retrain_growth must be > 1, got {self.retrain_growth}")
        if self.retrain_turnover <= 0.0:
            raise ValueError(f"retrain_turnover must be > 0, got {self.retrain_turnover}")
        for name in ("storage_dtype", "exact_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.exact_chunk_elems < 1:
            raise ValueError(f"exact_chunk_elems must be >= 1, got {self.exact_chunk_elems}")

    @property
    def full_nlist(self) -> int:
        """IVF lists used once a row is full."""
        if self.nlist is not None:
            return self.nlist
        return int(min(4096, max(16, 4 * math.sqrt(self.capacity))))
