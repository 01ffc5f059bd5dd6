"""Product-key memory (PKM) layer, after Lample et al. 2019, "Large Memory Layers with Product Keys".

A PKM layer is a drop-in replacement for a transformer feed-forward block: each token makes a query per
head, the query is split in two halves, each half is scored against its own small codebook of
``num_keys`` sub-keys, and the ``topk`` best of the ``num_keys ** 2`` product keys are found from the two
per-half top-k lists (so only ``2 * num_keys + topk ** 2`` scores are computed, never ``num_keys ** 2``).
The selected value rows of one large table (an ``nn.EmbeddingBag`` with ``num_keys ** 2`` rows) are summed
with softmax weights, over all heads: on GPUs by the Triton kernels of :mod:`models.triton_pkm` (float32
sums, a backward without atomics), elsewhere (or with sparse value gradients) by ``F.embedding_bag``.

The value table is large and sparsely touched, so it usually wants its own (higher) learning rate:
:meth:`ProductKeyMemory.value_parameters` and :func:`param_groups` make that easy.

Public API (imported by other models, keep it stable):
    ``PKMConfig``, ``ProductKeyMemory(dim, config)``, ``ProductKeyMemory.forward(x)``,
    ``ProductKeyMemory.value_parameters()``, ``param_groups(model, lr, pkm_value_lr)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.triton_support import kernels_run_on

__all__ = ["PKMConfig", "ProductKeyMemory", "param_groups", "pkm_value_parameters"]


@dataclass(kw_only=True)
class PKMConfig:
    """Hyper-parameters of a product-key memory layer."""

    num_keys: int = 256
    """Sub-keys per half-query and head; the memory holds ``num_keys ** 2`` value slots."""

    topk: int = 32
    """Value slots read per head and token (also the per-half candidate count)."""

    heads: int = 4
    """Independent query heads; they share the one value table and their reads are summed."""

    dim_head: Optional[int] = None
    """Width of each half-query and sub-key; ``None`` means ``min(128, dim)`` (the seed's 128 at dim >= 128)."""

    query_norm: bool = True
    """LayerNorm each half-query before scoring (the seed's default; batch norm would break causality)."""

    pre_layernorm: bool = False
    """LayerNorm the input first; leave off when the layer already sits behind a pre-norm residual."""

    output_norm: bool = False
    """LayerNorm the output (arXiv 2302.06461 reports this helps softmax key/value layers)."""

    input_dropout: float = 0.0
    """Dropout on the layer input."""

    query_dropout: float = 0.0
    """Dropout on the normalised queries."""

    attn_dropout: float = 0.0
    """Dropout on the softmax weights of the selected slots."""

    value_dropout: float = 0.0
    """Dropout on the layer output."""

    sparse_values: bool = False
    """Give the value table sparse gradients (needs an optimizer that takes them, e.g. ``SparseAdam``)."""

    def __post_init__(self) -> None:
        if self.num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {self.num_keys}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.topk > self.num_keys:
            raise ValueError(f"topk ({self.topk}) must be <= num_keys ({self.num_keys})")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.dim_head is not None and self.dim_head < 1:
            raise ValueError(f"dim_head must be >= 1 or None, got {self.dim_head}")
        for name in ("input_dropout", "query_dropout", "attn_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    def resolved_dim_head(self, dim: int) -> int:
        """The half-query width used for a model of width ``dim``."""
        return self.dim_head if self.dim_head is not None else min(128, dim)


@lru_cache(maxsize=32)
def _candidate_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (i, j) in the k x k grid of sorted half-scores that can hold a top-k product score.

    Both half-score lists are sorted descending, so pair (i, j) is dominated by the (i + 1) * (j + 1)
    pairs above-left of it: only pairs with (i + 1) * (j + 1) <= k can be among the k best (about
    k * ln k pairs instead of k ** 2; exact, ties included up to the choice among equal scores).
    """
    ii, jj = [], []
    for i in range(k):
        for j in range(k // (i + 1)):
            ii.append(i)
            jj.append(j)
    return torch.tensor(ii, dtype=torch.long), torch.tensor(jj, dtype=torch.long)


class ProductKeyMemory(nn.Module):
    """Multi-head product-key memory: ``(b, n, dim) -> (b, n, dim)``, causal (every token is independent)."""

    def __init__(self, dim: int, config: PKMConfig) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.config = config
        h, K = config.heads, config.num_keys
        dh = config.resolved_dim_head(dim)
        self.dim_head = dh

        self.pre_norm = nn.LayerNorm(dim) if config.pre_layernorm else nn.Identity()
        # one projection for both halves of all heads: (dim) -> (2 halves, h, dh)
        self.to_queries = nn.Linear(dim, 2 * h * dh, bias=False)
        self.query_norm = nn.LayerNorm(dh) if config.query_norm else nn.Identity()
        # sub-keys laid out (2 * h, dh, K) so that scoring is one batched matmul
        self.keys = nn.Parameter(torch.randn(2 * h, dh, K) / math.sqrt(dh))  # (2h, dh, K)
        self.values = nn.EmbeddingBag(K * K, dim, mode="sum", sparse=config.sparse_values)
        nn.init.normal_(self.values.weight, mean=0.0, std=1.0 / math.sqrt(dim))
        self.out_norm = nn.LayerNorm(dim) if config.output_norm else nn.Identity()

        self.input_dropout = nn.Dropout(config.input_dropout)
        self.query_dropout = nn.Dropout(config.query_dropout)
        self.attn_dropout = nn.Dropout(config.attn_dropout)
        self.value_dropout = nn.Dropout(config.value_dropout)

    def value_parameters(self) -> Iterator[nn.Parameter]:
        """The value table's parameters (to give them their own learning rate)."""
        return self.values.parameters()

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Find the slots each token reads.

        Returns ``indices`` (T, h * topk) int64 in ``[0, num_keys ** 2)`` and ``weights`` (T, h * topk)
        float32, softmax-normalised per head, where ``T = b * n``.
        """
        cfg = self.config
        h, K, k, dh = cfg.heads, cfg.num_keys, cfg.topk, self.dim_head
        x = self.input_dropout(self.pre_norm(x))
        T = x.shape[0] * x.shape[1]
        q = self.to_queries(x.reshape(T, self.dim))  # (T, 2*h*dh)
        q = self.query_dropout(self.query_norm(q.view(T, 2 * h, dh)))  # (T, 2h, dh)
        # score every half-query against its codebook: (2h, T, dh) @ (2h, dh, K) -> (2h, T, K)
        dots = torch.bmm(q.transpose(0, 1), self.keys.to(q.dtype))
        scores, idx = dots.topk(k, dim=-1)  # (2h, T, k) each, in the matmul dtype (bf16 topk is faster)
        scores = scores.float()
        scores = scores.view(2, h, T, k)
        idx = idx.view(2, h, T, k)
        # the best product keys lie within the Cartesian product of the two sorted per-half top-k lists,
        # and only the ~k ln k grid pairs with (i+1)(j+1) <= k can make it (see _candidate_pairs)
        ci, cj = (t.to(x.device) for t in _candidate_pairs(k))  # (C,), (C,)
        cand = scores[0][..., ci] + scores[1][..., cj]  # (h, T, C)
        best, best_pos = cand.topk(k, dim=-1)  # (h, T, k)
        i_x = idx[0].gather(-1, ci[best_pos])  # (h, T, k)
        i_y = idx[1].gather(-1, cj[best_pos])  # (h, T, k)
        indices = i_x * K + i_y  # (h, T, k)
        weights = self.attn_dropout(best.softmax(dim=-1))  # (h, T, k), float32
        indices = indices.permute(1, 0, 2).reshape(T, h * k)  # (T, h*k)
        weights = weights.permute(1, 0, 2).reshape(T, h * k)  # (T, h*k)
        return indices, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Read the memory for every token of ``x`` (b, n, dim); returns (b, n, dim) in ``x``'s dtype."""
        b, n, _ = x.shape
        indices, weights = self.select(x)  # (T, h*k), (T, h*k)
        w = self.values.weight
        if not self.config.sparse_values and kernels_run_on(w.device):
            from models.triton_pkm import weighted_gather

            out = weighted_gather(indices, weights.to(w.dtype), w)  # (T, dim), summed in float32
        else:
            out = F.embedding_bag(
                indices, w, mode="sum", per_sample_weights=weights.to(w.dtype), sparse=self.config.sparse_values
            )  # (T, dim)
        out = self.value_dropout(self.out_norm(out))
        return out.view(b, n, self.dim).to(x.dtype)


def pkm_value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every PKM value-table parameter inside ``model`` (each once)."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            for p in m.value_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def param_groups(
    model: nn.Module,
    lr: float,
    pkm_value_lr: float,
    *,
    weight_decay: float = 0.0,
    pkm_value_weight_decay: float = 0.0,
) -> list[dict]:
    """Split ``model``'s trainable parameters into two optimizer groups.

    The first group holds everything except PKM value tables (learning rate ``lr``), the second the PKM
    value tables (``pkm_value_lr``; the PKM paper trains them faster, and without weight decay).
    An empty group is left out, so a model without PKM gives a single group.
    """
    values = [p for p in pkm_value_parameters(model) if p.requires_grad]
    value_ids = {id(p) for p in values}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
    groups: list[dict] = []
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"})
    if values:
        groups.append(
            {"params": values, "lr": pkm_value_lr, "weight_decay": pkm_value_weight_decay, "name": "pkm_values"}
        )
    return groups
