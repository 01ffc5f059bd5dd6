"""The fused Triton kernel behind :func:`models.topk_matmul.matmul_topk`: query x key score tiles on tensor
cores with each query's running top-k kept in registers, so the (queries x keys) score matrix is never
written to memory.

How it keeps the top-k on chip: a score and its key id are packed into one int64 whose order is the
score's order (the float32 bits made monotone in the high half, ``2^32 - 1 - id`` in the low half, so
equal scores prefer the smaller id). Every program keeps an unsorted (BLOCK_M, KP) block of packed values
and its per-query minimum (the k-th best so far). For each tile of BLOCK_N keys, only scores above a
query's k-th best are candidates (past the first tiles, rarely more than one or two per query and tile);
they are inserted best first, each replacing the query's current minimum, in rounds of two row
reductions, until no query has a candidate left (faiss' WarpSelect filters the same way). Programs split
a batch row's keys when there are too few query blocks to fill the GPU; one ``torch.topk`` over the
packed values merges the splits and sorts.

Importing this module imports Triton: :mod:`models.topk_matmul` does so lazily, only where
:func:`models.triton_support.kernels_run_on` says the kernel can run (CUDA, or the CPU under Triton's
interpreter, which is how the tests check it without a GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from models.triton_support import interpreted, jit

# Whether the kernels below run in Triton's CPU interpreter (decided when triton was imported).
INTERPRETED = interpreted()
# Largest k the kernel keeps on chip (in registers: BLOCK_M x k int64); larger k takes the reference.
MAX_K = 128
# Key ids live in the low 32 bits of a packed value.
MAX_KEYS = 1 << 31

# tl.max / tl.min without their wrapper: the interpreter runs these as one numpy reduction, but spends
# milliseconds entering every nested jit function (the kernel's loop would call them thousands of times).
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_F32_MASK = 0x7FFFFFFF
_LOW_MASK = 0xFFFFFFFF


def _sentinel() -> int:
    """The packed value of an empty slot: -inf's monotone bits in the high half, 0 in the low half, so it
    lies below every packed key, excluded ones included (computed as the kernel packs a score)."""
    bits = torch.tensor([float("-inf")], dtype=torch.float32).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & _F32_MASK)
    return int(ordered.to(torch.int64)[0]) << 32


SENTINEL = _sentinel()


def _configs() -> list[triton.Config]:
    if INTERPRETED:  # one config: the interpreter would time every config on the CPU
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3),
                             (64, 256, 8, 2))
    ]


@triton.autotune(configs=_configs(), key=["D", "KP", "N_BUCKET", "HAS_GROUPS", "IEEE"])
@jit
def _matmul_topk_kernel(
    q_ptr, k_ptr, bias_ptr, qg_ptr, kg_ptr, count_ptr, out_ptr,
    M, N, D, N_BUCKET,
    sq_b, sq_m, sq_d, sk_b, sk_n, sk_d, sbias_b, sbias_n, sqg_b, sqg_m, skg_b, skg_n, so_b, so_m,
    SENT: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_COUNT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query block, batch row, key split): the top KP packed (score, id) of each query, unsorted."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_end = N
    if HAS_COUNT:
        n_end = tl.minimum(tl.load(count_ptr + b).to(tl.int32), N)
    per_split = ((n_end + splits - 1) // splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * per_split
    stop = tl.minimum(start + per_split, n_end)
    if HAS_GROUPS:
        q_group = tl.load(qg_ptr + b * sqg_b + offs_m * sqg_m, mask=m_ok, other=0)
    # distinct empty slots (SENT + slot), all below any key, so that `best == kth` picks one slot
    best = tl.full([BLOCK_M, KP], SENT, tl.int64) + tl.arange(0, KP)[None, :].to(tl.int64)
    q_rows = q_ptr + b * sq_b + offs_m.to(tl.int64)[:, None] * sq_m
    if ONE_D:  # the whole query block stays in registers across key tiles
        q_all = tl.load(q_rows + tl.arange(0, BLOCK_D)[None, :] * sq_d,
                        mask=m_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :], other=0.0)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        k_cols = k_ptr + b * sk_b + offs_n.to(tl.int64)[None, :] * sk_n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            if ONE_D:
                q = q_all
            else:
                q = tl.load(q_rows + offs_d[None, :] * sq_d, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(k_cols + offs_d[:, None] * sk_d, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
            if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.9): take its product in float32
                acc = tl.dot(q.to(tl.float32), kt.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(q, kt, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, kt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + b * sbias_b + offs_n * sbias_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        valid = n_ok[None, :] & m_ok[:, None]
        if HAS_GROUPS:
            k_group = tl.load(kg_ptr + b * skg_b + offs_n * skg_n, mask=n_ok, other=0)
            valid = valid & (q_group[:, None] != k_group[None, :])
        bits = acc.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of these ints == float order
        low = tl.full([BLOCK_N], 0xFFFFFFFF, tl.int64) - offs_n.to(tl.int64)  # smaller id ranks higher
        packed = (ordered.to(tl.int64) << 32) | low[None, :]
        packed = tl.where(valid, packed, SENT)
        # insert the tile's keys that beat a query's k-th best, best first, each over that query's k-th best
        kth = tl.reduce(best, 1, _MIN)  # (BLOCK_M,)
        cand = tl.where(packed > kth[:, None], packed, SENT)
        top = tl.reduce(cand, 1, _MAX)  # (BLOCK_M,)
        while tl.reduce((top > kth).to(tl.int32), 0, _MAX) > 0:
            best = tl.where((top > kth)[:, None] & (best == kth[:, None]), top[:, None], best)
            cand = tl.where(cand == top[:, None], SENT, cand)
            kth = tl.reduce(best, 1, _MIN)
            top = tl.reduce(cand, 1, _MAX)
    offs_k = split * KP + tl.arange(0, KP)
    tl.store(out_ptr + b * so_b + offs_m[:, None] * so_m + offs_k[None, :], best, mask=m_ok[:, None])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _splits(device: torch.device, row_programs: int, n: int) -> int:
    """Key splits per batch row: enough programs for about two waves of the GPU's multiprocessors, and
    at least 8 tiles of 128 keys per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // max(1, row_programs)), n // 1024))


def decode(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values -> (float32 scores, int64 ids), ``-inf`` / -1 where no key was found."""
    high = (packed >> 32).to(torch.int32)
    scores = (high ^ ((high >> 31) & _F32_MASK)).view(torch.float32)
    ids = _LOW_MASK - (packed & _LOW_MASK)
    ids = ids.masked_fill(scores == float("-inf"), -1)
    return scores, ids


def matmul_topk_triton(queries: torch.Tensor, keys: torch.Tensor, k: int, key_count: Optional[torch.Tensor],
                       key_bias: Optional[torch.Tensor], query_groups: Optional[torch.Tensor],
                       key_groups: Optional[torch.Tensor], splits: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused top-k of (B, M, D) queries against (B, N, D) keys, both of one dtype; the arguments are
    those of :func:`models.topk_matmul.matmul_topk`, already checked and made 3-D there.

    Args:
        splits: programs per batch row along the keys (default: enough to fill the GPU); tests force it
            to exercise the cross-split merge.

    Returns:
        (scores float32, ids int64), each (B, M, k), best first.
    """
    B, M, D = queries.shape
    N = keys.shape[1]
    if N >= MAX_KEYS:
        raise ValueError(f"the fused top-k takes fewer than {MAX_KEYS} keys per row, got {N}")
    kp = max(2, _next_pow2(k))
    dev = queries.device
    if splits is None:
        splits = _splits(dev, B * triton.cdiv(M, 64), N)
    out = torch.empty(B, M, splits * kp, dtype=torch.int64, device=dev)
    dummy = out  # stands in for absent optional tensors (never read: their HAS_* flag is off)
    bias = key_bias if key_bias is not None else dummy
    qg = query_groups if query_groups is not None else dummy
    kg = key_groups if key_groups is not None else dummy
    count = key_count.to(device=dev, dtype=torch.int64) if key_count is not None else dummy
    block_d = max(16, min(128, _next_pow2(D)))

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(M, meta["BLOCK_M"]), B, splits

    _matmul_topk_kernel[grid](
        queries, keys, bias, qg, kg, count, out,
        M, N, D, max(1, N).bit_length(),
        queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        bias.stride(0), bias.stride(-1), qg.stride(0), qg.stride(-1), kg.stride(0), kg.stride(-1),
        out.stride(0), out.stride(1),
        SENT=SENTINEL, KP=kp, BLOCK_D=block_d,
        HAS_BIAS=key_bias is not None, HAS_GROUPS=query_groups is not None, HAS_COUNT=key_count is not None,
        IEEE=queries.dtype == torch.float32, UPCAST=INTERPRETED and queries.dtype == torch.bfloat16,
        ONE_D=D <= block_d,
    )
    return decode(out.topk(k, dim=2).values)
