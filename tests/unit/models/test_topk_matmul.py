"""The fused Triton top-k of a matrix product (models/triton_topk.py, behind models/topk_matmul.py) against
float64 brute force: the kernel runs compiled on a GPU, else in Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch

from models import topk_matmul
from models.topk_matmul import NO_KEY, TopK, matmul_topk
from tests.unit.models.triton_setup import kernel_device  # noqa: F401  (a fixture)


def _brute_force(queries, keys, key_count=None, key_bias=None, query_groups=None, key_groups=None) -> torch.Tensor:
    """(B, M, N) float64 scores of the inputs as stored, -inf where a key may not be chosen."""
    scores = queries.double() @ keys.double().transpose(1, 2)
    if key_bias is not None:
        scores += key_bias.double()[:, None, :]
    n = torch.arange(keys.shape[1], device=keys.device)
    if key_count is not None:
        scores.masked_fill_(n[None, None, :] >= key_count.to(keys.device)[:, None, None], float("-inf"))
    if query_groups is not None:
        scores.masked_fill_(query_groups[:, :, None] == key_groups[:, None, :], float("-inf"))
    return scores


def _assert_topk(got: TopK, scores: torch.Tensor, k: int, atol: float) -> None:
    """Tie-robust: the returned scores are the k best (sorted), every id holds the score returned with it,
    ids of one query are distinct, and slots without a valid key are NO_KEY."""
    want = scores.topk(k, dim=-1).values  # (B, M, k)
    found = got.ids >= 0
    assert torch.equal(found, want > float("-inf")), "valid slots differ"
    assert torch.all(got.ids[~found] == NO_KEY)
    assert torch.allclose(got.scores[found].double(), want[found], atol=atol, rtol=0)
    assert torch.all(got.scores[:, :, :-1] >= got.scores[:, :, 1:]), "not best first"
    held = scores.gather(-1, got.ids.clamp_min(0))  # exact score of each returned id
    assert torch.allclose(held[found], got.scores[found].double(), atol=atol, rtol=0), "an id has another score"
    ids = torch.where(found, got.ids, -1 - torch.arange(k, device=got.ids.device))  # distinct fill per slot
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all(), "an id came back twice"


def _inputs(device, dtype, B: int, M: int, N: int, D: int, groups: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, M, D, generator=g).to(dtype)
    keys = torch.randn(B, N, D, generator=g)
    keys[:, N // 2 : N // 2 + 8] = keys[:, :8]  # exact ties: equal keys must come back as distinct ids
    keys = keys.to(dtype)
    bias = torch.randn(B, N, generator=g)
    qg = torch.randint(0, 4, (B, M), generator=g) if groups else None
    kg = torch.randint(0, 4, (B, N), generator=g) if groups else None
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return move(q), move(keys), move(bias), move(qg), move(kg)


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.bfloat16, 3), (torch.float16, 2)])
def test_fused_topk_equals_brute_force_with_counts_bias_and_groups(kernel_device, dtype, splits):  # noqa: F811
    """Every option at once: rows searched up to their key_count, a per-key bias, own-group keys skipped,
    keys split across programs and merged; equal to float64 brute force on the stored inputs, up to ties."""
    from models.triton_topk import matmul_topk_triton

    q, keys, bias, qg, kg = _inputs(kernel_device, dtype, B=2, M=37, N=300, D=24, groups=True)
    count = torch.tensor([300, 130], device=kernel_device)
    scores, ids = matmul_topk_triton(q, keys, 5, count, bias, qg, kg, splits=splits)
    _assert_topk(TopK(scores, ids), _brute_force(q, keys, count, bias, qg, kg), 5, atol=1e-4)


def test_k32_wide_rows_and_rows_with_fewer_keys_than_k(kernel_device):  # noqa: F811
    """The memory's k (32) over a dim wider than one tile of the product (160), a row with 20 keys (the
    last 12 slots empty) and an empty row."""
    from models.triton_topk import matmul_topk_triton

    q, keys, _, _, _ = _inputs(kernel_device, torch.float32, B=3, M=20, N=96, D=160, groups=False, seed=1)
    count = torch.tensor([96, 20, 0], device=kernel_device)
    scores, ids = matmul_topk_triton(q, keys, 32, count, None, None, None)
    _assert_topk(TopK(scores, ids), _brute_force(q, keys, count), 32, atol=1e-4)
    assert torch.all(ids[1, :, 20:] == NO_KEY) and torch.all(ids[2] == NO_KEY)


def test_matmul_topk_dispatches_to_the_kernel(kernel_device, monkeypatch):  # noqa: F811
    """Where the kernel runs, ``matmul_topk`` (the contract callers use, 2-D form here) takes it, not the
    blockwise reference; on a plain CPU (no TRITON_INTERPRET) it takes the reference."""
    q, keys, bias, _, _ = _inputs(kernel_device, torch.float32, B=1, M=18, N=50, D=16, groups=False, seed=2)
    def no_reference(*args: object, **kwargs: object) -> TopK:
        raise AssertionError("the reference ran where the kernel should")

    with monkeypatch.context() as m:
        m.setattr(topk_matmul, "_reference", no_reference)
        got = matmul_topk(q[0], keys[0], 4, key_bias=bias[0])
    assert got.scores.shape == (18, 4) and got.ids.shape == (18, 4)
    _assert_topk(TopK(got.scores[None], got.ids[None]), _brute_force(q, keys, key_bias=bias), 4, atol=1e-4)
    if kernel_device.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        ref = matmul_topk(q[0], keys[0], 4, key_bias=bias[0])  # the reference now: the same top-k
        assert torch.allclose(ref.scores, got.scores, atol=1e-5) and torch.equal(ref.ids, got.ids)
