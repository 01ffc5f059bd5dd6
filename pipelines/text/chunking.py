"""Chunking semantics of docs/design.md, as pure numpy functions over token ids.

A document of L tokens (with [CLS] ... [SEP]) becomes ceil((L-1)/c) chunks. Chunk i holds tokens
[i*c, (i+1)*c) padded with 0, then its continuation token (i+1)*c (0 past the end), so each row has
c+1 tokens. Unlike the seed, no extra all-padding chunk is added when (L-1) is a multiple of c.
"""
from __future__ import annotations

import numpy as np

PAD_ID = 0


def num_chunks(num_tokens: int, chunk_size: int) -> int:
    """ceil((L-1)/c): the last token of a document is only ever a continuation."""
    return max(0, -(-(num_tokens - 1) // chunk_size))


def doc_to_chunks(ids: np.ndarray, chunk_size: int) -> np.ndarray:
    """(L,) token ids -> (n, chunk_size + 1) int32 chunks with continuation tokens."""
    n = num_chunks(len(ids), chunk_size)
    padded = np.zeros(n * chunk_size + 1, dtype=np.int32)  # room for the last continuation
    usable = min(len(ids), len(padded))
    padded[:usable] = ids[:usable]
    body = padded[: n * chunk_size].reshape(n, chunk_size)
    continuation = padded[chunk_size :: chunk_size][:n, None]  # token (i+1)*c of each chunk
    return np.concatenate([body, continuation], axis=1)


def seq_starts(first_chunk_id: int, n_chunks: int, chunk_size: int, seq_len: int) -> np.ndarray:
    """Chunk ids where training sequences start: every seq_len/chunk_size chunks of a document."""
    return np.arange(first_chunk_id, first_chunk_id + n_chunks, seq_len // chunk_size, dtype=np.int64)
