"""Triton kernels for the product-key memory's value read: a weighted gather of value rows and its backward.

Forward: ``out[t] = sum_j weights[t, j] * table[indices[t, j]]``, one program per (token, column block),
the rows read in the table's dtype (bf16 in mixed-precision training) and summed in float32 (float64 for
a float64 table, so that gradcheck can check the kernels).

Backward: the weight gradient ``grad_weights[t, j] = grad_out[t] . table[indices[t, j]]`` re-gathers the
rows a token read. The table gradient ``grad_table[r] = sum over (t, j) with indices[t, j] == r of
weights[t, j] * grad_out[t]`` runs without atomics, as Meta's "Memory Layers at Scale" (Berges et al.
2024) does: the (token, slot) pairs are sorted by value row once (the reverse index), and one program
per (row, column block) sums its row's pairs and writes the row, untouched rows as zeros. Each row's sum
is thus taken in one place, in float32, in a fixed order: no float atomics, deterministic.

Importing this module imports Triton; :mod:`models.pkm` does so only where
:func:`models.triton_support.kernels_run_on` says the kernels can run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.triton_support import interpreted, jit

# Whether the kernels below run in Triton's CPU interpreter (decided when triton was imported).
INTERPRETED = interpreted()
# Columns per program; pairs of a row summed per step of the table-gradient loop.
BLOCK_D = 32 if INTERPRETED else 128
BLOCK_E = 16 if INTERPRETED else 32
# Warps of the gather programs: a (slots x BLOCK_D) float32 tile is 64 KB at 128 slots.
GATHER_WARPS = 8


@jit
def _gather_fwd_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, J, DIM,
                       BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[t, cols] = sum_j w[t, j] * table[idx[t, j], cols], summed in ACC (float32, or float64)."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_J)
    j_ok = offs_j < J
    d_ok = offs_d < DIM
    rows = tl.load(idx_ptr + t * J + offs_j, mask=j_ok, other=0)
    w = tl.load(w_ptr + t * J + offs_j, mask=j_ok, other=0.0).to(ACC)
    v = tl.load(table_ptr + rows[:, None] * DIM + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(v.to(ACC) * w[:, None], axis=0)
    tl.store(out_ptr + t * DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@jit
def _grad_weights_kernel(idx_ptr, grad_ptr, table_ptr, gw_ptr, J, DIM,
                         BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """gw[t, j] = grad[t] . table[idx[t, j]], summed in ACC."""
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    j_ok = offs_j < J
    rows = tl.load(idx_ptr + t * J + offs_j, mask=j_ok, other=0)
    acc = tl.zeros([BLOCK_J], dtype=ACC)
    for d0 in range(0, DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < DIM
        g = tl.load(grad_ptr + t * DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
        v = tl.load(table_ptr + rows[:, None] * DIM + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc += tl.sum(v.to(ACC) * g[None, :], axis=1)
    tl.store(gw_ptr + t * J + offs_j, acc.to(gw_ptr.dtype.element_ty), mask=j_ok)


@jit
def _grad_table_kernel(order_ptr, starts_ptr, w_ptr, grad_ptr, gt_ptr, J, DIM,
                       BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """gt[r, cols] = sum of w[p] * grad[p // J, cols] over the pairs p of row r (order[starts[r]:starts[r+1]])."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    start = tl.load(starts_ptr + r)
    stop = tl.load(starts_ptr + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for e0 in range(start, stop, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_ok = offs_e < stop
        pair = tl.load(order_ptr + offs_e, mask=e_ok, other=0)
        w = tl.load(w_ptr + pair, mask=e_ok, other=0.0).to(ACC)
        g = tl.load(grad_ptr + (pair // J)[:, None] * DIM + offs_d[None, :], mask=e_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc += tl.sum(g.to(ACC) * w[:, None], axis=0)
    tl.store(gt_ptr + r * DIM + offs_d, acc.to(gt_ptr.dtype.element_ty), mask=d_ok)


def _acc(table: torch.Tensor) -> tl.dtype:
    """float32 sums, float64 for a float64 table (gradcheck)."""
    return tl.float64 if table.dtype == torch.float64 else tl.float32


def _block_j(j: int) -> int:
    return max(2, 1 << (j - 1).bit_length())


class _WeightedGather(torch.autograd.Function):
    """Autograd for :func:`weighted_gather` (indices get no gradient)."""

    @staticmethod
    def forward(ctx, indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        T, J = indices.shape
        dim = table.shape[1]
        out = torch.empty(T, dim, dtype=table.dtype, device=table.device)
        if T:
            _gather_fwd_kernel[(T, triton.cdiv(dim, BLOCK_D))](indices, weights, table, out, J, dim,
                                                                BLOCK_J=_block_j(J), BLOCK_D=BLOCK_D, ACC=_acc(table), num_warps=GATHER_WARPS)
        ctx.save_for_backward(indices, weights, table)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        indices, weights, table = ctx.saved_tensors
        T, J = indices.shape
        R, dim = table.shape
        grad_out = grad_out.contiguous()
        grad_weights = grad_table = None
        if ctx.needs_input_grad[1]:
            grad_weights = torch.empty_like(weights)
            if T:
                _grad_weights_kernel[(T,)](indices, grad_out, table, grad_weights, J, dim,
                                           BLOCK_J=_block_j(J), BLOCK_D=BLOCK_D, ACC=_acc(table), num_warps=GATHER_WARPS)
        if ctx.needs_input_grad[2]:
            flat = indices.reshape(-1)
            order = torch.argsort(flat)  # the reverse index: pairs grouped by value row
            starts = torch.zeros(R + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=R), 0, out=starts[1:])
            grad_table = torch.empty_like(table)
            _grad_table_kernel[(R, triton.cdiv(dim, BLOCK_D))](order, starts, weights, grad_out, grad_table, J, dim,
                                                               BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, ACC=_acc(table))
        return None, grad_weights, grad_table


def weighted_gather(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * table[indices[t, j]]``: ``F.embedding_bag(indices, table, mode="sum",
    per_sample_weights=weights)`` with float32 sums whatever the table's dtype, differentiable in
    ``weights`` and ``table``.

    Args:
        indices: (T, J) int64 rows of ``table``.
        weights: (T, J) float weights (their gradient comes back in their dtype).
        table: (R, dim) values, float32, bfloat16 or float16 (the output and its gradient take this dtype).

    Returns:
        (T, dim) in ``table``'s dtype.
    """
    if indices.dim() != 2 or weights.shape != indices.shape or table.dim() != 2:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must be one (T, J) "
                         f"shape and table {tuple(table.shape)} 2-D")
    return _WeightedGather.apply(indices.contiguous(), weights.contiguous(), table.contiguous())
