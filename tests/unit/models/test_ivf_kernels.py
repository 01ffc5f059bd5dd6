"""The numba list-scan kernels against brute force: same top-k when every list is probed."""

import numpy as np
import pytest
import torch

from models import ivf_kernels


def _brute_force(queries: np.ndarray, keys: np.ndarray, live: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, slots) over the live slots, best first."""
    scores = np.einsum("rqd,rcd->rqc", queries.astype(np.float64), keys.astype(np.float64))
    scores[:, :, ~live] = -np.inf
    slots = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(scores, slots, -1), slots


def test_build_lists_is_a_csr_of_assigned_slots():
    assign = np.array([[2, -1, 0, 2, 1, -1, 2]], dtype=np.int32)
    offsets, members = ivf_kernels.build_lists(assign, 4)
    assert offsets.tolist() == [[0, 1, 2, 5, 5]]
    assert members[0, :5].tolist() == [2, 4, 0, 3, 6]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probing_every_list_equals_brute_force(dtype):
    rng = np.random.default_rng(0)
    R, C, d, Q, k, nlist = 2, 300, 16, 41, 7, 9  # 41 queries: blocks of 4 and a remainder
    keys = rng.standard_normal((R, C, d)).astype(np.float32)
    if dtype == "bfloat16":  # the kernel sees bfloat16 bits; the reference the same rounded values
        bits = torch.from_numpy(keys).bfloat16()
        keys = bits.float().numpy()
        keys_arg = bits.view(torch.int16).numpy().view(np.uint16)
    else:
        keys_arg = keys
    assign = rng.integers(0, nlist, (R, C)).astype(np.int32)
    assign[:, 250:] = -1  # empty slots are never returned
    queries = rng.standard_normal((R, Q, d)).astype(np.float32)
    probes = np.tile(rng.permutation(nlist), (R, Q, 1)).astype(np.int64)
    offsets, members = ivf_kernels.build_lists(assign, nlist)
    scores, slots = ivf_kernels.ivf_search(queries, probes, offsets, members, keys_arg, k)
    ref_scores, ref_slots = _brute_force(queries, keys, assign[0] >= 0, k)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert (np.sort(slots, -1) == np.sort(ref_slots, -1)).mean() > 0.99  # ties may swap
    assert (np.diff(scores, axis=-1) <= 0).all()


def test_queries_see_only_their_probed_lists_and_short_results_are_padded():
    rng = np.random.default_rng(1)
    C, d, nlist, k = 50, 8, 5, 6
    keys = rng.standard_normal((1, C, d)).astype(np.float32)
    assign = (np.arange(C) % nlist).astype(np.int32)[None]  # 10 slots per list
    queries = rng.standard_normal((1, 3, d)).astype(np.float32)
    probes = np.array([[[0, -1], [1, 3], [4, -1]]], dtype=np.int64)
    offsets, members = ivf_kernels.build_lists(assign, nlist)
    scores, slots = ivf_kernels.ivf_search(queries, probes, offsets, members, keys, 12)
    for i, lists in enumerate([[0], [1, 3], [4]]):
        found = slots[0, i][slots[0, i] >= 0]
        assert set(assign[0, found].tolist()) <= set(lists)
        assert len(found) == min(12, 10 * len(lists))
        assert (slots[0, i][len(found):] == -1).all() and np.isneginf(scores[0, i][len(found):]).all()
    # exactly the best of the probed entries
    cand = np.flatnonzero(np.isin(assign[0], [1, 3]))
    best = cand[np.argsort(-(keys[0, cand] @ queries[0, 1]))[:k]]
    assert set(slots[0, 1, :k].tolist()) == set(best.tolist())
