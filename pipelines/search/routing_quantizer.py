"""The routed search's coarse quantizer, kept beside the index so nobody downloads the index for it.

The list-routed neighbor search (pipelines/stages/neighbors_routed.py) needs only the IVF's coarse
quantizer (behind the index's pre-transform, e.g. OPQ) and the size of every inverted list. At 10^9
chunks the index itself is tens of GB, so the index stage writes these two small files when it writes an
IVF index, and the routed search reads them instead of the index. Older builds fall back to the index.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipelines.artifacts.storage import Location, exists, read_bytes, write_bytes_atomic
from pipelines.search.faiss_index import write_index_file
from pipelines.search.knn import ivf_of

QUANTIZER_FILE = "quantizer.index"
LIST_SIZES_FILE = "list_sizes.npy"
ROUTING_FILES = (QUANTIZER_FILE, LIST_SIZES_FILE)


@dataclass
class RoutingQuantizer:
    """What routing needs from an IVF index: the quantizer that maps a vector to its lists (with the
    index's pre-transform in front), how many vectors each list holds, and the lists' centroids."""

    quantizer: object  # a faiss index over the centroids, taking raw vectors
    list_sizes: np.ndarray  # int64 (nlist,)
    centroids: np.ndarray  # float32 (nlist, transformed dim)


def routing_quantizer(index, dim: int) -> RoutingQuantizer | None:
    """The routing view of ``index``, or None when it is not an IVF index.

    Args:
        index: a faiss index (IVF, possibly behind an IndexPreTransform; on-disk lists are fine: only
            their sizes are read).
        dim: the dimension of the raw vectors.
    Returns:
        A :class:`RoutingQuantizer`, or None."""
    import faiss

    ivf = ivf_of(index)
    if ivf is None:
        return None
    quantizer = faiss.clone_index(ivf.quantizer)
    routed = quantizer
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        routed = faiss.IndexPreTransform(quantizer)
        for i in reversed(range(top.chain.size())):
            routed.prepend_transform(faiss.clone_VectorTransform(top.chain.at(i)))
        routed.d = dim
    sizes = np.fromiter((ivf.invlists.list_size(i) for i in range(ivf.nlist)), np.int64, ivf.nlist)
    return RoutingQuantizer(routed, sizes, quantizer.reconstruct_n(0, ivf.nlist))


def write_routing_files(out: Location, folder: str, index, dim: int) -> list[str]:
    """Write ``index``'s routing quantizer and list sizes into ``folder``; returns the names written
    (none for an index that is not IVF)."""
    routing = routing_quantizer(index, dim)
    if routing is None:
        return []
    write_index_file(out, f"{folder}/{QUANTIZER_FILE}", routing.quantizer)
    buf = io.BytesIO()
    np.save(buf, routing.list_sizes)
    write_bytes_atomic(out, f"{folder}/{LIST_SIZES_FILE}", buf.getvalue())
    return list(ROUTING_FILES)


def has_routing_files(out: Location, folder: str) -> bool:
    return all(exists(out, f"{folder}/{name}") for name in ROUTING_FILES)


def read_routing_quantizer(out: Location, folder: str) -> tuple[RoutingQuantizer | None, bytes]:
    """The routing view the index stage wrote into ``folder`` and the quantizer file's bytes, or
    (None, b"") for an index version without routing files (not IVF, or older than them)."""
    import faiss

    if not has_routing_files(out, folder):
        return None, b""
    data = read_bytes(out, f"{folder}/{QUANTIZER_FILE}")
    quantizer = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    inner = faiss.downcast_index(quantizer.index if isinstance(quantizer, faiss.IndexPreTransform) else quantizer)
    sizes = np.load(io.BytesIO(read_bytes(out, f"{folder}/{LIST_SIZES_FILE}")))
    return RoutingQuantizer(quantizer, sizes, inner.reconstruct_n(0, inner.ntotal)), data
