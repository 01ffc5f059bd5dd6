"""Chunk semantics, checked token for token against an independent reading of docs/design.md."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.text.chunking import doc_to_chunks, num_chunks, seq_starts


def reference_chunks(ids: list[int], c: int) -> list[list[int]]:
    """docs/design.md read literally: ceil((L-1)/c) chunks; chunk i = tokens [i*c,(i+1)*c) padded with 0,
    then token (i+1)*c (0 past the end)."""
    n = math.ceil((len(ids) - 1) / c)
    tok = lambda j: ids[j] if j < len(ids) else 0  # noqa: E731
    return [[tok(j) for j in range(i * c, (i + 1) * c)] + [tok((i + 1) * c)] for i in range(n)]


def test_document_shorter_than_one_chunk():
    ids = [101, 7, 8, 9, 102]
    got = doc_to_chunks(np.array(ids), 8)
    assert got.tolist() == [[101, 7, 8, 9, 102, 0, 0, 0, 0]]


def test_exact_multiple_gets_no_extra_padding_chunk():
    c = 4
    ids = list(range(1, 2 * c + 2))  # L = 2c+1, so L-1 is an exact multiple of c
    got = doc_to_chunks(np.array(ids), c)
    assert got.shape == (2, c + 1)  # the seed would add a third, all-padding chunk
    assert got.tolist() == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]]


def test_continuation_is_next_chunks_first_token():
    ids = list(range(1, 30))
    got = doc_to_chunks(np.array(ids), 8)
    assert (got[:-1, -1] == got[1:, 0]).all()
    assert got[-1, -1] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30000), min_size=2, max_size=400), st.sampled_from([1, 2, 3, 8, 64]))
def test_matches_reference(ids, c):
    got = doc_to_chunks(np.array(ids, dtype=np.int32), c)
    assert got.dtype == np.int32
    assert got.tolist() == reference_chunks(ids, c)
    assert len(got) == num_chunks(len(ids), c)


def test_seq_starts_every_seq_len_over_chunk_size_chunks():
    assert seq_starts(100, 70, 64, 2048).tolist() == [100, 132, 164]
    assert seq_starts(5, 1, 64, 2048).tolist() == [5]
