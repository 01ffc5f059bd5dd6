"""The Memorizing Transformer (Wu et al. 2022), after lucidrains' memorizing-transformers-pytorch.

A decoder-only transformer over token segments that a training loop streams per batch row (consecutive
segments of one document per row). Two memories carry context past the segment:

* XL memory (chosen layers): the (key, value) pairs of the last ``xl_max_memories`` positions that the
  layer saw, prepended to the segment's keys, as in Transformer-XL (no gradient flows into them);
* kNN memory (memorizing layers): pairs that fell out of the XL window (or, without XL, the segment's own
  pairs) go into a per-row :class:`models.knn_memory.KNNMemory`; every query retrieves its
  ``num_retrieved_memories`` most similar keys from it and attends to them jointly with local attention
  (one softmax over retrieved + local scores, cosine similarity with a learned per-head temperature).

Attention is multi-query as in the seed (``heads`` query heads share one key/value head of width
``dim_head``), with a T5 relative position bias and a causal mask. Training uses a fused attention
function (heads folded into one bmm, bf16 probabilities, gradient for the learned bias, log-sum-exp merge
of retrieved memories); inference without gradients uses ``scaled_dot_product_attention`` in ordinary
layers. Everything runs under bf16 autocast. Any layer's feed-forward block can be a product-key memory
(``pkm_layers``, :mod:`models.pkm`).

Streaming API (what a training loop needs)::

    model = MemorizingTransformer(MemorizingConfig.preset("readme"))
    memory = model.create_memory(batch_size)              # MemoryState: kNN + XL memories per row
    out = model(tokens, memory, labels=labels,            # tokens/labels (b, n)
                new_doc=starts,                           # (b,) bool: clear these rows first
                doc_ended=ends)                           # (b,) bool: clear these rows afterwards
    out.loss.backward()
    # eval_loss_no_memory: stream the eval rows with kNN retrieval off (XL memory still advances);
    # use a separate MemoryState for evaluation streams, or None for no memory at all
    eval_mem = model.create_memory(eval_batch)
    loss = model(tokens, eval_mem, labels=labels, use_knn=False).loss

``memory.state_dict()`` / ``memory.load_state_dict()`` round-trip the whole memory state (checkpoint
resume gives identical logits); ``memory.clear()`` resets it.

Departures from the seed, on purpose: memories are cleared per row at document boundaries (the seed's
clear-on-token never fired), the kNN memory is a correct FIFO (the seed's reset itself when full), XL
memory is cleared with its row and its invalid slots are masked, and relative positions count the XL
memory (the seed measured XL keys from the segment start, so they all fell in the nearest buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.knn_memory import KNNMemory, KNNMemoryConfig
from models.pkm import PKMConfig, ProductKeyMemory

__all__ = [
    "MemorizingConfig",
    "MemorizingTransformer",
    "MemoryState",
    "MemorizingOutput",
    "T5RelativePositionBias",
]


@dataclass(kw_only=True)
class MemorizingConfig:
    """Shape and memory settings of a Memorizing Transformer. Layer numbers count from 1, as in the seed."""

    num_tokens: int = 256
    """Vocabulary size (256: bytes)."""

    dim: int = 512
    """Model width."""

    depth: int = 8
    """Number of transformer blocks."""

    heads: int = 8
    """Query heads of ordinary attention layers."""

    knn_heads: Optional[int] = None
    """Query heads of memorizing layers; ``None`` means ``heads``."""

    dim_head: int = 64
    """Width of each head and of the single shared key/value head (and of kNN memory entries)."""

    ff_mult: int = 4
    """Feed-forward hidden width is ``ff_mult * dim``."""

    attn_dropout: float = 0.0
    """Dropout on attention weights."""

    ff_dropout: float = 0.0
    """Dropout inside feed-forward blocks."""

    memorizing_layers: tuple[int, ...] = (4, 5)
    """Layers with kNN attention over the kNN memory."""

    max_knn_memories: int = 65536
    """kNN memory capacity per batch row and memorizing layer (FIFO beyond it)."""

    num_retrieved_memories: int = 32
    """Entries each query retrieves from the kNN memory."""

    knn_attn_scale_init: float = 20.0
    """Initial temperature of the cosine-similarity attention in memorizing layers (learned, per head)."""

    gate_output: bool = False
    """Gate memorizing layers' output with ``tanh(g)``, g initialised at 0 (Flamingo style, for retrofitting)."""

    xl_memory_layers: tuple[int, ...] = (2, 3, 4, 5)
    """Layers that prepend the previous positions' keys/values (Transformer-XL memory)."""

    xl_max_memories: int = 512
    """Positions kept in each XL memory; 0 turns XL memory off."""

    rel_pos_num_buckets: int = 32
    """T5 relative position buckets."""

    rel_pos_max_distance: int = 128
    """Distance beyond which T5 buckets saturate."""

    pad_id: int = 0
    """Label id ignored by the loss."""

    pkm_layers: tuple[int, ...] = ()
    """Layers whose feed-forward block is a product-key memory instead of an MLP."""

    pkm: PKMConfig = field(default_factory=PKMConfig)
    """Settings of the PKM blocks (see :class:`models.pkm.PKMConfig`)."""

    knn_backend: str = "auto"
    """kNN search backend: ``"auto"``, ``"exact"``, ``"ivf"`` or ``"faiss"`` (see :class:`KNNMemoryConfig`)."""

    knn_faiss_min_entries: int = 8192
    """Rows with at least this many entries use an IVF index on CPU (see :class:`KNNMemoryConfig`)."""

    knn_nprobe: int = 4
    """IVF lists probed per query on the IVF paths."""

    knn_ivf_codec: str = "flat"
    """IVF list storage on the faiss path: ``"flat"`` or ``"sq8"`` (see :class:`KNNMemoryConfig`)."""

    knn_storage_dtype: str = "float32"
    """dtype of the kNN memory buffers (``"bfloat16"`` halves memory and retrieval traffic)."""

    knn_exact_dtype: str = "float32"
    """dtype of the exact kNN search matmul (``"bfloat16"`` is faster on bf16-capable hardware)."""

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "max_knn_memories",
                     "num_retrieved_memories", "rel_pos_num_buckets", "rel_pos_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knn_heads is not None and self.knn_heads < 1:
            raise ValueError(f"knn_heads must be >= 1 or None, got {self.knn_heads}")
        if self.xl_max_memories < 0:
            raise ValueError(f"xl_max_memories must be >= 0, got {self.xl_max_memories}")
        if self.knn_attn_scale_init <= 0:
            raise ValueError(f"knn_attn_scale_init must be > 0, got {self.knn_attn_scale_init}")
        for name in ("attn_dropout", "ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("memorizing_layers", "xl_memory_layers", "pkm_layers"):
            layers = tuple(getattr(self, name))
            object.__setattr__(self, name, layers)
            bad = [i for i in layers if not isinstance(i, int) or not 1 <= i <= self.depth]
            if bad:
                raise ValueError(f"{name} must be layer numbers in [1, {self.depth}], got {bad}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name} has duplicates: {layers}")
        if self.rel_pos_num_buckets < 2:
            raise ValueError("rel_pos_num_buckets must be >= 2")
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id must be a token id in [0, {self.num_tokens}), got {self.pad_id}")
        if not isinstance(self.pkm, PKMConfig):
            raise ValueError("pkm must be a PKMConfig")
        # let KNNMemoryConfig validate the kNN settings now rather than at create_memory()
        self.knn_memory_config()

    def knn_memory_config(self) -> KNNMemoryConfig:
        """The :class:`KNNMemoryConfig` of each memorizing layer's memory."""
        return KNNMemoryConfig(
            dim=self.dim_head,
            capacity=self.max_knn_memories,
            backend=self.knn_backend,
            faiss_min_entries=self.knn_faiss_min_entries,
            nprobe=self.knn_nprobe,
            ivf_codec=self.knn_ivf_codec,
            storage_dtype=self.knn_storage_dtype,
            exact_dtype=self.knn_exact_dtype,
        )

    @property
    def active_xl_layers(self) -> tuple[int, ...]:
        """XL layers in order (none when ``xl_max_memories`` is 0)."""
        return tuple(sorted(self.xl_memory_layers)) if self.xl_max_memories > 0 else ()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MemorizingConfig:
        """``"tiny"`` (unit tests) or ``"readme"`` (the seed README's model on bytes), plus overrides."""
        if name == "readme":
            base = cls(
                num_tokens=256, dim=512, depth=8, heads=8, dim_head=64, memorizing_layers=(4, 5),
                max_knn_memories=65536, num_retrieved_memories=32, xl_memory_layers=(2, 3, 4, 5),
                xl_max_memories=512, knn_storage_dtype="bfloat16", knn_exact_dtype="bfloat16",
            )
        elif name == "tiny":
            base = cls(
                num_tokens=256, dim=32, depth=3, heads=2, dim_head=16, ff_mult=2, memorizing_layers=(2,),
                max_knn_memories=64, num_retrieved_memories=4, xl_memory_layers=(1, 2), xl_max_memories=8,
                rel_pos_num_buckets=8, rel_pos_max_distance=32, knn_backend="exact",
                pkm=PKMConfig(num_keys=8, topk=2, heads=2, dim_head=8),
            )
        else:
            raise ValueError(f"unknown preset {name!r}; choose 'tiny' or 'readme'")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown MemorizingConfig fields: {sorted(unknown)}")
        return replace(base, **overrides)


# ---------------------------------------------------------------------------------------------- memory


class MemoryState:
    """Everything a model carries between segments: one kNN memory per memorizing layer and one XL memory
    (keys/values of the last positions, with a validity mask) per XL layer, all per batch row."""

    def __init__(self, batch_size: int, knn: list[KNNMemory], num_xl_layers: int, device: torch.device):
        self.batch_size = batch_size
        self.knn = knn
        self.device = device
        self.xl: list[Optional[torch.Tensor]] = [None] * num_xl_layers  # each (b, L, 2, d)
        self.xl_valid: list[Optional[torch.Tensor]] = [None] * num_xl_layers  # each (b, L) bool

    def _row_mask(self, rows: Any) -> torch.Tensor:
        if rows is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        rows_t = torch.as_tensor(rows, device=self.device)
        if rows_t.dtype == torch.bool:
            if rows_t.shape != (self.batch_size,):
                raise ValueError(f"row mask must be ({self.batch_size},), got {tuple(rows_t.shape)}")
            return rows_t
        mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        mask[rows_t.long().flatten()] = True
        return mask

    @torch.no_grad()
    def clear(self, rows: Any = None) -> None:
        """Forget everything of the chosen rows (all by default): bool mask (b,), indices, or None."""
        mask = self._row_mask(rows)
        if not bool(mask.any()):
            return
        for mem in self.knn:
            mem.clear(mask.cpu())
        for i, valid in enumerate(self.xl_valid):
            if valid is not None:
                self.xl_valid[i] = valid & ~mask[:, None]
                self.xl[i] = self.xl[i].masked_fill(mask[:, None, None, None], 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All memory tensors, for checkpoints (``torch.save`` it beside the model's state_dict)."""
        out: dict[str, torch.Tensor] = {}
        for i, mem in enumerate(self.knn):
            for k, v in mem.state_dict().items():
                out[f"knn.{i}.{k}"] = v
        for i, (kv, valid) in enumerate(zip(self.xl, self.xl_valid)):
            if kv is not None:
                out[f"xl.{i}.kv"] = kv
                out[f"xl.{i}.valid"] = valid
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` taken from a memory of the same model and batch size."""
        for i, mem in enumerate(self.knn):
            mem.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"knn.{i}.")})
        for i in range(len(self.xl)):
            kv = state.get(f"xl.{i}.kv")
            self.xl[i] = None if kv is None else kv.to(self.device).clone()
            valid = state.get(f"xl.{i}.valid")
            self.xl_valid[i] = None if valid is None else valid.to(self.device).clone()


@dataclass
class MemorizingOutput:
    """What the forward returns."""

    logits: torch.Tensor
    """(b, n, num_tokens)."""

    loss: Optional[torch.Tensor] = None
    """Mean cross-entropy over labels that are not ``pad_id`` (when labels were given)."""


# ---------------------------------------------------------------------------------------------- layers


class T5RelativePositionBias(nn.Module):
    """Causal T5 bucketed relative position bias: (n queries, S keys) -> (1, heads, n, S).

    The queries are the last n of the S key positions (keys = XL memory then the segment).
    """

    def __init__(self, heads: int, scale: float, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.scale = scale
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        """Buckets of key-minus-query offsets (only the past matters: future offsets share bucket 0)."""
        n = (-relative_position).clamp(min=0)
        max_exact = self.num_buckets // 2
        is_small = n < max_exact
        large = max_exact + (
            torch.log(n.float().clamp(min=1) / max_exact)
            / math.log(self.max_distance / max_exact)
            * (self.num_buckets - max_exact)
        ).long()
        large = large.clamp(max=self.num_buckets - 1)
        return torch.where(is_small, n, large)

    def forward(self, n: int, S: int, device: torch.device) -> torch.Tensor:
        # the bias depends on the offset key - query only: look up the S + n - 1 offsets once, then lay
        # them out as (n, S) sliding windows (a view); backward sums the windows instead of scattering
        # n * S embedding gradients
        offsets = torch.arange(-(S - 1), n, device=device)  # (S + n - 1,) key minus query position
        per_offset = self.relative_attention_bias(self.bucket(offsets)).t() * self.scale  # (h, S + n - 1)
        windows = per_offset.unfold(1, S, 1)  # (h, n, S): windows[:, w] = offsets from w - (S - 1)
        # query i (absolute position S - n + i) sees key j at offset j - (S - n + i): window n - 1 - i
        return windows.flip(1).unsqueeze(0)  # (1, h, n, S)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for ``t`` (its own dtype outside autocast)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _SharedKVAttention(torch.autograd.Function):
    """``softmax(q k^T + bias) v`` for multi-query attention (all query heads share one key/value head).

    Returns the output and, when ``need_lse``, each row's log-sum-exp (differentiable), so that memorizing
    layers can merge retrieved memories into the same softmax. Heads are folded into the query axis (one
    bmm per batch row against the shared keys), elementwise passes over the (b, h, n, S) scores are kept
    to a minimum and only the bf16 probabilities are saved for backward. Unlike SDPA's fused CPU kernel
    it returns the gradient of ``bias`` (the T5 relative position bias is learned), which otherwise sends
    SDPA to its slower unfused path. Every query must see at least one unmasked key (the causal diagonal).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, need_lse: bool):
        # q (b, h, n, d) pre-scaled; k, v (b, S, d); bias (1 or b, h, n, S) float with -inf where masked
        b, h, n, d = q.shape
        S = k.shape[1]
        cdt = _compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, vc = q.reshape(b, h * n, d).to(cdt), k.to(cdt), v.to(cdt)
            # scores stay in the matmul dtype (CPU softmax kernels accumulate reduced precision in fp32);
            # mixed-dtype elementwise ops are many times slower on CPU than same-dtype ones
            s = torch.bmm(qc, kc.transpose(1, 2)).view(b, h, n, S).add_(bias.to(cdt))  # (b, h, n, S)
            p = torch.softmax(s, dim=-1)  # (b, h, n, S)
            lse = None
            if need_lse:
                # p = exp(s - lse), so lse = s_j - log p_j at any j; at the row maximum p_j >= 1/S, so
                # its log is well defined and accurate to p's relative precision
                s_max, j = s.max(dim=-1, keepdim=True)  # (b, h, n, 1)
                lse = (s_max.float() - p.gather(-1, j).float().log()).squeeze(-1)  # (b, h, n)
            del s
            o = torch.bmm(p.view(b, h * n, S), vc).view(b, h, n, d)  # (b, h, n, d)
        ctx.save_for_backward(qc, kc, vc, p, o)
        ctx.q_dtype, ctx.k_dtype, ctx.v_dtype = q.dtype, k.dtype, v.dtype
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        if lse is None:
            lse = torch.zeros(b, h, n, device=q.device)
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: Optional[torch.Tensor], dlse: Optional[torch.Tensor]):
        qc, kc, vc, p, o = ctx.saved_tensors
        b, h, n, d = o.shape
        S = kc.shape[1]
        cdt = p.dtype
        with torch.autocast(o.device.type, enabled=False):
            if do is None:
                do = torch.zeros_like(o)
            doc = do.to(cdt).reshape(b, h * n, d)
            dp = torch.bmm(doc, vc.transpose(1, 2)).view(b, h, n, S)  # (b, h, n, S)
            ds = torch._softmax_backward_data(dp, p, -1, cdt)  # p * (dp - sum_j p_j dp_j)
            del dp
            if dlse is not None:  # d lse / d s = p
                ds.addcmul_(p, dlse.to(cdt).unsqueeze(-1))
            dbias = None
            if ctx.needs_input_grad[3]:
                if ctx.bias_shape[0] == 1 and b > 1:  # sum over the batch as a GEMV (fp32 accumulation)
                    dbias = (torch.ones(1, b, dtype=cdt, device=ds.device) @ ds.view(b, -1)).view(1, h, n, S)
                else:
                    dbias = ds
                dbias = dbias.to(ctx.bias_dtype)
            dsc = ds.view(b, h * n, S)
            del ds
            dq = torch.bmm(dsc, kc).view(b, h, n, d).to(ctx.q_dtype)
            dk = torch.bmm(dsc.transpose(1, 2), qc).to(ctx.k_dtype)  # (b, S, d)
            dv = torch.bmm(p.view(b, h * n, S).transpose(1, 2), doc).to(ctx.v_dtype)  # (b, S, d)
        return dq, dk, dv, dbias, None


class _MemoryAttention(torch.autograd.Function):
    """Scores of each query against its own retrieved keys, and the weighted sum of retrieved values.

    ``scores(q, mem_k)``: (B, d), (B, k, d) -> (B, k); ``combine(p, mem_v)``: (B, k), (B, k, d) -> (B, d).
    Retrieved pairs get no gradient; writing both directions as bmm against the un-transposed (B, k, d)
    tensors avoids the transposed copies that autograd's bmm backward would make of them.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mem: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.save_for_backward(mem)
        ctx.mode, ctx.x_dtype = mode, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(mem.dtype)
            if mode == "scores":
                return torch.bmm(mem, xc.unsqueeze(-1)).squeeze(-1)  # (B, k)
            return torch.bmm(xc.unsqueeze(1), mem).squeeze(1)  # (B, d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (mem,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(mem.dtype)
            if ctx.mode == "scores":  # d q = sum_j g_j k_j
                dx = torch.bmm(g.unsqueeze(1), mem).squeeze(1)  # (B, d)
            else:  # d p_j = <g, v_j>
                dx = torch.bmm(mem, g.unsqueeze(-1)).squeeze(-1)  # (B, k)
        return dx.to(ctx.x_dtype), None, None


def shared_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        need_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (b, h, n, d), log-sum-exp (b, h, n), zeros unless ``need_lse``) of multi-query attention;
    see :class:`_SharedKVAttention`."""
    return _SharedKVAttention.apply(q, k, v, bias, need_lse)


class Attention(nn.Module):
    """Multi-query causal attention (optionally over an XL memory); kNN attention when ``knn`` is set.

    Returns the output (b, n, dim) and the kv pairs (b, n, 2, d) of this segment (detached), which the
    model turns into the next XL memory and the kNN memory's new entries.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, *, knn: bool,
                 num_retrieved: int = 0, attn_scale_init: float = 20.0, gate_output: bool = False):
        super().__init__()
        self.heads, self.dim_head, self.knn, self.num_retrieved = heads, dim_head, knn, num_retrieved
        self.dropout = dropout
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=not knn)
        if knn:
            self.scale = nn.Parameter(torch.full((heads, 1, 1), math.log(attn_scale_init)))  # (h, 1, 1)
            self.output_gate = nn.Parameter(torch.zeros(1)) if gate_output else None

    def forward(
        self,
        x: torch.Tensor,  # (b, n, dim)
        bias: torch.Tensor,  # (1 or b, h, n, S): relative position bias + causal / invalid-XL masks (-inf)
        xl_kv: Optional[torch.Tensor] = None,  # (b, L, 2, d), S = L + n
        knn_memory: Optional[KNNMemory] = None,
        reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)  # (b, h, n, d)
        kv = self.to_kv(x).view(b, n, 2, d)  # (b, n, 2, d)
        if self.knn:  # cosine-similarity attention (the paper normalises keys for stability)
            q = F.normalize(q, dim=-1)
            kv = torch.stack((F.normalize(kv[:, :, 0], dim=-1), kv[:, :, 1]), dim=2)
        new_kv = kv.detach()
        if xl_kv is not None:
            kv = torch.cat((xl_kv.to(kv.dtype), kv), dim=1)  # (b, S, 2, d)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (b, S, d) each
        p = self.dropout if self.training else 0.0
        # the fused path has no attention dropout; the reference path (plain autograd ops) has
        reference = reference or p > 0

        if not self.knn:
            q = q * self.dim_head**-0.5
            if not reference and bias.requires_grad and torch.is_grad_enabled():
                out, _ = shared_kv_attention(q, k, v, bias)
            elif not reference:  # nothing needs the bias gradient: SDPA's fused kernel
                out = F.scaled_dot_product_attention(
                    q, k.unsqueeze(1), v.unsqueeze(1), attn_mask=bias.to(q.dtype), scale=1.0, enable_gqa=True
                )  # (b, h, n, d)
            else:
                out = self._reference(q, k, v, bias, None, p)
        else:
            q = q * self.scale.exp()  # learned temperature (h, 1, 1) of the cosine similarities
            found = knn_memory.search(q, self.num_retrieved) if knn_memory is not None else None
            out = self._reference(q, k, v, bias, found, p) if reference else self._merged(q, k, v, bias, found)
            if self.output_gate is not None:
                out = out * self.output_gate.tanh()
        out = out.transpose(1, 2).reshape(b, n, h * d)  # (b, n, h*d)
        return self.to_out(out), new_kv

    @staticmethod
    def _memory_scores(q: torch.Tensor, found) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of each query against its own retrieved keys: (b, h, n, k) float, and the values."""
        b, h, n, d = q.shape
        cdt = _compute_dtype(q)
        kk = found.keys.shape[-2]
        mem_k = found.keys.to(cdt).reshape(b * h * n, kk, d)  # (B, k, d), contiguous
        mem_v = found.values.to(cdt).reshape(b * h * n, kk, d)
        sim = _MemoryAttention.apply(q.reshape(b * h * n, d), mem_k, "scores").view(b, h, n, kk).float()
        return sim.masked_fill(~found.mask, float("-inf")), mem_v

    def _merged(self, q, k, v, bias, found) -> torch.Tensor:
        """Local attention via the fused function, retrieved memories merged into the same softmax."""
        out, lse = shared_kv_attention(q, k, v, bias, need_lse=found is not None)  # (b, h, n, d), (b, h, n)
        if found is None:
            return out
        b, h, n, d = q.shape
        sim_mem, mem_v = self._memory_scores(q, found)  # (b, h, n, k)
        # joint normaliser over [retrieved; local]; the local lse is finite, so no NaN on empty memories
        total = torch.logsumexp(torch.cat((sim_mem, lse.unsqueeze(-1)), dim=-1), dim=-1)  # (b, h, n)
        w_local = (lse - total).exp().unsqueeze(-1)  # (b, h, n, 1)
        p_mem = (sim_mem - total.unsqueeze(-1)).exp()  # (b, h, n, k)
        mem_out = _MemoryAttention.apply(p_mem.reshape(b * h * n, -1), mem_v, "combine").view(b, h, n, d)
        return out * w_local.to(out.dtype) + mem_out.to(out.dtype)

    def _reference(self, q, k, v, bias, found, p: float) -> torch.Tensor:
        """Plain autograd version (one softmax over [retrieved; local]), with attention dropout."""
        b, h, n, d = q.shape
        S = k.shape[1]
        sim = torch.bmm(q.reshape(b, h * n, d), k.transpose(1, 2).to(q.dtype)).view(b, h, n, S).float() + bias
        if found is None:
            attn = F.dropout(sim.softmax(dim=-1), p, self.training)
            return torch.bmm(attn.view(b, h * n, S).to(v.dtype), v).view(b, h, n, d)
        sim_mem, mem_v = self._memory_scores(q, found)
        kk = sim_mem.shape[-1]
        attn = torch.cat((sim_mem, sim), dim=-1).softmax(dim=-1)  # (b, h, n, k + S)
        attn = F.dropout(attn, p, self.training)
        local = torch.bmm(attn[..., kk:].reshape(b, h * n, S).to(v.dtype), v).view(b, h, n, d)
        mem = torch.bmm(attn[..., :kk].reshape(b * h * n, 1, kk).to(mem_v.dtype), mem_v).view(b, h, n, d)
        return local + mem.to(local.dtype)


# ---------------------------------------------------------------------------------------------- model


class MemorizingTransformer(nn.Module):
    """Decoder-only LM over streamed segments with XL and kNN memories (see the module docstring)."""

    def __init__(self, config: MemorizingConfig):
        super().__init__()
        self.config = cfg = config
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        knn_heads = cfg.knn_heads or cfg.heads
        self.rel_pos_bias = T5RelativePositionBias(
            cfg.heads, cfg.dim_head**0.5, cfg.rel_pos_num_buckets, cfg.rel_pos_max_distance
        )
        self.knn_rel_pos_bias = T5RelativePositionBias(
            knn_heads, cfg.dim_head**0.5, cfg.rel_pos_num_buckets, cfg.rel_pos_max_distance
        )
        self.attn_norms = nn.ModuleList()
        self.attns = nn.ModuleList()
        self.ff_norms = nn.ModuleList()
        self.ffs = nn.ModuleList()
        for layer in range(1, cfg.depth + 1):
            knn = layer in cfg.memorizing_layers
            self.attn_norms.append(nn.LayerNorm(cfg.dim))
            self.attns.append(
                Attention(
                    cfg.dim, knn_heads if knn else cfg.heads, cfg.dim_head, cfg.attn_dropout, knn=knn,
                    num_retrieved=cfg.num_retrieved_memories, attn_scale_init=cfg.knn_attn_scale_init,
                    gate_output=cfg.gate_output,
                )
            )
            self.ff_norms.append(nn.LayerNorm(cfg.dim))
            if layer in cfg.pkm_layers:
                self.ffs.append(ProductKeyMemory(cfg.dim, cfg.pkm))
            else:
                self.ffs.append(FeedForward(cfg.dim, cfg.ff_mult, cfg.ff_dropout))
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.num_tokens)
        self.memorizing_layers = tuple(sorted(cfg.memorizing_layers))
        self.xl_layers = cfg.active_xl_layers

    def create_memory(self, batch_size: int, device: Union[str, torch.device, None] = None) -> MemoryState:
        """A fresh (empty) memory state for ``batch_size`` streamed rows, on the model's device by default."""
        if device is None:
            device = next(self.parameters()).device
        device = torch.device(device)
        knn_cfg = self.config.knn_memory_config()
        knn = [KNNMemory(batch_size, knn_cfg, device=device) for _ in self.memorizing_layers]
        return MemoryState(batch_size, knn, len(self.xl_layers), device)

    def _mask_bias(self, rel: T5RelativePositionBias, n: int, valid_prefix: Optional[torch.Tensor],
                   device: torch.device) -> torch.Tensor:
        """Relative bias plus causal mask (and masked invalid XL slots): (1 or b, h, n, S)."""
        L = 0 if valid_prefix is None else valid_prefix.shape[1]
        S = L + n
        bias = rel(n, S, device)  # (1, h, n, S)
        causal = torch.ones(n, S, dtype=torch.bool, device=device).triu(L + 1)  # key after query
        bias = bias.masked_fill(causal, float("-inf"))
        if valid_prefix is not None and not bool(valid_prefix.all()):
            invalid = torch.cat(
                (~valid_prefix, torch.zeros(valid_prefix.shape[0], n, dtype=torch.bool, device=device)), dim=1
            )  # (b, S)
            bias = bias.masked_fill(invalid[:, None, None, :], float("-inf"))  # (b, h, n, S)
        return bias

    def forward(
        self,
        tokens: torch.Tensor,
        memory: Optional[MemoryState] = None,
        *,
        labels: Optional[torch.Tensor] = None,
        use_knn: bool = True,
        add_to_memory: bool = True,
        new_doc: Optional[torch.Tensor] = None,
        doc_ended: Optional[torch.Tensor] = None,
    ) -> MemorizingOutput:
        """Run one segment.

        Args:
            tokens: (b, n) token ids of the next segment of each row's stream.
            memory: the rows' :class:`MemoryState` (updated in place), or None for no memory at all.
            labels: (b, n) next-token targets; ``pad_id`` labels are ignored by the loss.
            use_knn: False skips kNN retrieval (and adding), e.g. for an ``eval_loss_no_memory`` metric.
            add_to_memory: False keeps the kNN memories unchanged (XL memories still advance).
            new_doc: (b,) bool, rows that start a new document with this segment: cleared first.
            doc_ended: (b,) bool, rows whose document ends with this segment: cleared afterwards.
        """
        b, n = tokens.shape
        device = tokens.device
        if memory is not None and memory.batch_size != b:
            raise ValueError(f"memory was created for batch size {memory.batch_size}, got {b}")
        if memory is not None and new_doc is not None:
            memory.clear(new_doc)
        cfg = self.config
        x = self.token_emb(tokens)  # (b, n, dim)

        xl_in = {layer: (memory.xl[i], memory.xl_valid[i]) if memory is not None else (None, None)
                 for i, layer in enumerate(self.xl_layers)}
        knn_mem = {layer: memory.knn[i] for i, layer in enumerate(self.memorizing_layers)} if memory is not None else {}
        biases: dict[tuple, torch.Tensor] = {}
        new_xl: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        for idx in range(cfg.depth):
            layer = idx + 1
            attn = self.attns[idx]
            xl_kv, xl_valid = xl_in.get(layer, (None, None))
            key = (attn.knn, None if xl_valid is None else id(xl_valid))
            if key not in biases:
                rel = self.knn_rel_pos_bias if attn.knn else self.rel_pos_bias
                biases[key] = self._mask_bias(rel, n, xl_valid, device)
            search_mem = knn_mem.get(layer) if (attn.knn and use_knn) else None
            out, seg_kv = attn(self.attn_norms[idx](x), biases[key], xl_kv, search_mem)
            x = x + out
            x = x + self.ffs[idx](self.ff_norms[idx](x))

            if memory is None:
                continue
            # the pairs the layer held (XL memory, then this segment), oldest first, and which are real
            seg_valid = torch.ones(b, n, dtype=torch.bool, device=device)
            if xl_kv is not None:
                all_kv = torch.cat((xl_kv.to(seg_kv.dtype), seg_kv), dim=1)  # (b, L + n, 2, d)
                all_valid = torch.cat((xl_valid, seg_valid), dim=1)  # (b, L + n)
            else:
                all_kv, all_valid = seg_kv, seg_valid
            keep = min(cfg.xl_max_memories, all_kv.shape[1]) if layer in self.xl_layers else 0
            if keep:
                new_xl[layer] = (all_kv[:, -keep:], all_valid[:, -keep:])
            if attn.knn and use_knn and add_to_memory and layer in knn_mem:
                out_kv, out_valid = all_kv[:, : all_kv.shape[1] - keep], all_valid[:, : all_kv.shape[1] - keep]
                if out_kv.shape[1]:
                    m = None if bool(out_valid.all()) else out_valid
                    knn_mem[layer].add(out_kv[:, :, 0], out_kv[:, :, 1], m)

        if memory is not None:
            for i, layer in enumerate(self.xl_layers):
                if layer in new_xl:
                    memory.xl[i], memory.xl_valid[i] = new_xl[layer]
            if doc_ended is not None:
                memory.clear(doc_ended)

        logits = self.to_logits(self.final_norm(x))  # (b, n, num_tokens)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(b * n, -1), labels.reshape(b * n), ignore_index=cfg.pad_id
            )
        return MemorizingOutput(logits=logits, loss=loss)
