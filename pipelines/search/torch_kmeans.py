"""k-means in PyTorch on any device: the IVF coarse quantizer's centroids, trained on a GPU when the
cluster has one (faiss' own k-means runs on CPUs only here; faiss-gpu wheels are CUDA-12 only and large).

The centroids are loaded into the faiss index's quantizer by the caller, so the index file stays a faiss
index. Assignment is the top-1 of a matrix product (:func:`models.topk_matmul.matmul_topk`, fused on CUDA),
batched so memory is bounded by ``ASSIGN_ROWS`` rows, never the score matrix of all points. The metric
follows faiss' IVF training: L2 k-means for an L2 index, spherical k-means (unit centroids, inner-product
assignment) for an inner-product one. No Ray and no faiss here: the GPU benchmark imports this alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.topk_matmul import matmul_topk

ASSIGN_ROWS = 65536  # points assigned per matrix product
DEFAULT_ITERATIONS = 20


@dataclass
class KMeansResult:
    """Centroids (float32, (nlist, d), on the input's device), the last assignment, and what it cost."""

    centroids: torch.Tensor
    assignment: torch.Tensor
    iterations: int
    seconds: float
    empty_reseeded: int  # clusters that came out empty and were given a far point, over all iterations


def assign(x: torch.Tensor, centroids: torch.Tensor, *, spherical: bool, dtype: torch.dtype | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x`` and its score (larger is nearer: ``x.c - |c|^2/2`` for L2,
    ``x.c`` for spherical), in blocks of ``ASSIGN_ROWS`` rows.

    Args:
        x: (n, d) float32. centroids: (nlist, d) float32, same device.
        spherical: inner-product assignment. dtype: matrix-product dtype (default: x's).
    Returns:
        (labels int64 (n,), scores float32 (n,)).
    """
    dtype = dtype or x.dtype
    bias = None if spherical else -0.5 * (centroids * centroids).sum(1)
    keys = centroids.to(dtype)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    scores = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for start in range(0, len(x), ASSIGN_ROWS):
        rows = slice(start, min(len(x), start + ASSIGN_ROWS))
        best = matmul_topk(x[rows].to(dtype), keys, 1, key_bias=bias)
        labels[rows], scores[rows] = best.ids[:, 0], best.scores[:, 0]
    return labels, scores


def kmeans(x: torch.Tensor, nlist: int, *, spherical: bool = False, iterations: int = DEFAULT_ITERATIONS,
           seed: int = 0, dtype: torch.dtype | None = None) -> KMeansResult:
    """Lloyd's k-means with a seeded start from distinct sample points.

    A cluster left empty takes the point currently farthest from its centroid (distinct points for
    several empty clusters), so all ``nlist`` lists stay in use, as faiss does by splitting big clusters.

    Args:
        x: (n, d) training sample, n >= nlist; float32 (or float16/bfloat16: used as float32).
        nlist: clusters. spherical: unit-norm centroids and inner-product assignment (an ``ip`` index).
        iterations: Lloyd iterations. seed: the start's seed (the same seed gives the same centroids).
        dtype: assignment matrix-product dtype (default float32; bfloat16 on tensor cores is faster).
    Returns:
        A :class:`KMeansResult`.
    Raises:
        ValueError: fewer points than clusters, or a bad shape.
    """
    if x.dim() != 2 or nlist < 1:
        raise ValueError(f"k-means needs a (n, d) sample and nlist >= 1, got {tuple(x.shape)} and {nlist}")
    if len(x) < nlist:
        raise ValueError(f"k-means of {nlist} clusters needs at least {nlist} points, got {len(x)}")
    t = time.perf_counter()
    x = x.float()
    gen = torch.Generator().manual_seed(int(seed))
    start = torch.randperm(len(x), generator=gen)[:nlist].to(x.device)
    centroids = x[start].clone()
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    reseeded = 0
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(iterations):
        labels, scores = assign(x, centroids, spherical=spherical, dtype=dtype)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=nlist)
        empty = torch.nonzero(counts == 0).flatten()
        centroids = sums / counts.clamp(min=1).unsqueeze(1).float()
        if len(empty):
            # the worst-served points: largest distance to their own centroid (lowest score)
            far = torch.topk(-scores, len(empty)).indices
            centroids[empty] = x[far]
            reseeded += len(empty)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return KMeansResult(centroids, labels, iterations, time.perf_counter() - t, reseeded)
