"""The top-k of a matrix product without the score matrix: the primitive shared by the Memorizing
Transformer's kNN memory and the all-chunks neighbor search.

``matmul_topk(queries, keys, k)`` returns, for every query, the ``k`` keys with the largest
``query . key + key_bias``, skipping keys past a row's ``key_count`` and keys whose group equals the
query's group (a chunk's own document). Writing all scores to memory and reading them back for ``topk``
costs far more than the arithmetic at the sizes these callers use, so on CUDA a fused Triton kernel
(:mod:`models.triton_topk`, when Triton is installed) keeps the running top-k on chip; everywhere else (and as the reference the kernel is tested against) the product
is taken in blocks of keys with a running merge, so memory stays bounded by the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.triton_support import kernels_run_on

# Scores of keys that may not be chosen; ids of empty result slots.
EXCLUDED_SCORE = float("-inf")
NO_KEY = -1
# Keys per block of the reference path: bounds its score buffer at (rows x queries x KEY_BLOCK) floats.
KEY_BLOCK = 8192


@dataclass
class TopK:
    """The result of ``matmul_topk``: float32 ``scores`` and int64 ``ids`` of shape (B, M, k), each query's
    best first; slots without a key hold ``EXCLUDED_SCORE`` and ``NO_KEY``."""

    scores: torch.Tensor
    ids: torch.Tensor


def matmul_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, key_count: Optional[torch.Tensor] = None,
                key_bias: Optional[torch.Tensor] = None, query_groups: Optional[torch.Tensor] = None,
                key_groups: Optional[torch.Tensor] = None) -> TopK:
    """The ``k`` best keys of each query by inner product.

    Args:
        queries: (B, M, D) or (M, D), float32, bfloat16 or float16.
        keys: (B, N, D) or (N, D), the same dtype; a (N, D) pair with (M, D) queries is one batch.
        k: results per query (>= 1); fewer valid keys leave ``NO_KEY`` slots at the end.
        key_count: (B,) int; only the first ``key_count[b]`` keys of batch ``b`` are searched.
        key_bias: (B, N) float32 added to every score of that key (``-|key|^2 / 2`` turns the largest
            inner product into the smallest L2 distance).
        query_groups, key_groups: (B, M) and (B, N) int64; a key whose group equals the query's is skipped.

    Returns:
        ``TopK`` with (B, M, k) tensors, or (M, k) for 2-D inputs; scores accumulate in float32.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (query_groups is None) != (key_groups is None):
        raise ValueError("query_groups and key_groups go together")
    flat = queries.dim() == 2
    if flat:
        queries, keys = queries.unsqueeze(0), keys.unsqueeze(0)
        key_bias = None if key_bias is None else key_bias.unsqueeze(0)
        query_groups = None if query_groups is None else query_groups.unsqueeze(0)
        key_groups = None if key_groups is None else key_groups.unsqueeze(0)
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match")
    if _fused_kernel_fits(queries, keys, k):
        from models.triton_topk import matmul_topk_triton

        scores, ids = matmul_topk_triton(queries, keys, k, key_count, key_bias, query_groups, key_groups)
        result = TopK(scores, ids)
    else:
        result = _reference(queries, keys, k, key_count, key_bias, query_groups, key_groups)
    return TopK(result.scores[0], result.ids[0]) if flat else result


def _fused_kernel_fits(queries: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    """Whether the Triton kernel takes this search: a device it runs on, a float dtype shared by both
    sides, and k small enough to keep on chip."""
    if keys.dtype != queries.dtype or queries.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not kernels_run_on(queries.device):
        return False
    from models import triton_topk

    return k <= triton_topk.MAX_K and keys.shape[1] < triton_topk.MAX_KEYS


def _reference(queries: torch.Tensor, keys: torch.Tensor, k: int, key_count: Optional[torch.Tensor],
               key_bias: Optional[torch.Tensor], query_groups: Optional[torch.Tensor],
               key_groups: Optional[torch.Tensor]) -> TopK:
    """Blocks of keys, each block's scores merged into the running top-k: the path for any device."""
    B, M, _ = queries.shape
    N = keys.shape[1]
    best = torch.full((B, M, k), EXCLUDED_SCORE, dtype=torch.float32, device=queries.device)
    best_ids = torch.full((B, M, k), NO_KEY, dtype=torch.long, device=queries.device)
    for start in range(0, N, KEY_BLOCK):
        stop = min(N, start + KEY_BLOCK)
        scores = torch.matmul(queries, keys[:, start:stop].transpose(1, 2)).float()  # (B, M, n)
        if key_bias is not None:
            scores += key_bias[:, None, start:stop].float()
        ids = torch.arange(start, stop, device=queries.device)
        if key_count is not None:
            scores.masked_fill_(ids[None, None, :] >= key_count.to(queries.device)[:, None, None], EXCLUDED_SCORE)
        if query_groups is not None:
            scores.masked_fill_(query_groups[:, :, None] == key_groups[:, None, start:stop], EXCLUDED_SCORE)
        both = torch.cat([best, scores], dim=2)
        both_ids = torch.cat([best_ids, ids.expand(B, M, -1)], dim=2)
        best, at = both.topk(min(k, both.shape[2]), dim=2)
        best_ids = both_ids.gather(2, at)
    best_ids = best_ids.masked_fill(best == EXCLUDED_SCORE, NO_KEY)
    return TopK(best, best_ids)
