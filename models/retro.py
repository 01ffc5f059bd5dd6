"""RETRO: a decoder-only transformer that reads retrieved neighbors through chunked cross-attention.

After Borgeaud et al. 2021, "Improving language models by retrieving from trillions of tokens", and
lucidrains' RETRO-pytorch (same forward interface, same default sizes). Single-device PyTorch, no Ray.

The sequence (b, n) is cut into chunks of ``chunk_size`` (c) tokens. Each completed chunk j comes with
``k`` retrieved neighbors, each a database chunk plus its continuation (``2 * c`` tokens, pad id 0).

* Decoder: pre-norm RMSNorm blocks (self-attention with rotary positions, optional chunked cross-attention
  (CCA), feed-forward or product-key memory). DeepNet post-norm (residual scaled by alpha, beta-scaled
  init, LayerNorm) is an option.
* Encoder: a small bidirectional transformer over each neighbor (pad tokens masked out). At its
  cross-attention layers a neighbor of chunk j attends to the decoder's hidden states of chunk j, taken at
  the first CCA layer. All neighbors of all chunks of the batch run as one batch: no Python loop over chunks.
* Causality (the paper's rule): the neighbors of chunk j were retrieved with the whole of chunk j, so only
  tokens at or after the last token of chunk j may see them. CCA shifts the decoder's hidden states left by
  ``c - 1``: the attending chunk j holds positions ``j*c + c - 1 .. j*c + 2c - 2`` (the last token of chunk
  j and the first c-1 tokens of chunk j+1) and attends to the neighbors of chunk j. The first ``c - 1``
  tokens attend to nothing (their CCA output is zero; the residual passes them through). A learned null
  key/value lets a token attend to "nothing" when all its neighbors are padding.
* Any length n (generation): ``retrieved`` always holds the neighbors of the ``R = n // c`` completed chunks
  (``RETRO.num_completed_chunks(n)``). Inside CCA the shifted hidden states are zero-padded at the end so
  that the R attending chunks are whole (R * c rows; the last one always runs past the end), and the CCA
  output is cut back to n rows. Tokens of an unfinished last chunk read the neighbors of the previous,
  completed chunk, exactly as inside a longer sequence, so a prefix's logits equal those of the same
  positions of any longer sequence. Generation: call ``next_token_logits(prefix, retrieved)``; each time the
  prefix completes a chunk, retrieve that chunk's neighbors and append them along dim 1 of ``retrieved``.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (``attn_impl="sdpa"``; what the
default ``"auto"`` uses on GPU) or, with ``attn_impl="matmul"`` (what ``"auto"`` uses on CPU), through two
plain matmuls around a softmax (float32 accumulation), which is faster on CPU at these sizes (see ``attend``). Projections are fused (QKV; KV for cross-attention), and all
chunks and neighbors of a batch run as one batch. The model runs under
``torch.autocast(device_type, dtype=torch.bfloat16)``: the residual stream stays float32, matmuls run in bf16.

On GPU: RMSNorm goes through ``F.rms_norm``, the loss through the blocked cross-entropy (no float32 copy
of the logits), nothing in a step waits for the device (the "is anything padded" test that picks unmasked
kernels runs on CPU only), ``RETRO.compile_blocks()`` compiles every residual block with torch.compile
(one graph each, shared by the blocks of one kind), and ``model.activation_checkpointing = True``
recomputes each block's activations in the backward pass.

Decoding with a cache: ``cache = model.new_cache()``, then ``model.extend(cache, new_tokens, retrieved)`` for
the prompt and for each token after it. Self-attention keeps its keys and values; the first CCA layer keeps
the states a chunk's neighbors attend to, so a chunk's neighbors are encoded once, when it completes, and
every CCA layer keeps their keys and values. A token then costs one position, and the logits are those of
``next_token_logits`` over the whole sequence (the chunked cross-attention takes the first position of the
new tokens, ``start``, and reads the attending chunks those positions lie in).

Public API: ``RetroConfig``, ``retro_config(preset, **overrides)``, ``PRESETS``, ``RETRO(config)``,
``RETRO.forward(seq, retrieved=None, labels=None, return_loss=False, reduction="mean")``,
``RETRO.hidden_states``, ``RETRO.next_token_logits``, ``RETRO.new_cache``, ``RETRO.extend``,
``RETRO.compile_blocks``, ``RETRO.num_completed_chunks``; helpers ``cross_entropy``, ``attend``, ``RMSNorm``,
``rms_norm``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from models.pkm import PKMConfig

__all__ = ["RetroConfig", "retro_config", "PRESETS", "RETRO", "DecodeCache", "attend", "cross_entropy", "RMSNorm",
           "rms_norm"]

BERT_UNCASED_VOCAB = 30522  # vocabulary of the default chunk tokenizer (all-MiniLM-L6-v2, bert-base-uncased)


# --------------------------------------------------------------------------------------------------
# config


def _layer_tuple(name: str, value: Any, depth: int) -> tuple[int, ...]:
    """Normalise a list of 1-based layer numbers (TOML gives lists) and check it against the depth."""
    if isinstance(value, int) or isinstance(value, str):
        raise ValueError(f"{name} must be a sequence of 1-based layer numbers, got {value!r}")
    try:
        layers = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of 1-based layer numbers, got {value!r}") from exc
    if any(not 1 <= layer <= depth for layer in layers):
        raise ValueError(f"{name}={layers}: every layer must lie in 1..{depth}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}={layers}: duplicate layer numbers")
    return tuple(sorted(layers))


@dataclass(kw_only=True)
class RetroConfig:
    """Sizes and options of a RETRO model. Defaults: the RETRO-pytorch README sizes, without its dropout."""

    num_tokens: int = BERT_UNCASED_VOCAB
    """Vocabulary size; must match the tokenizer that made the chunks."""

    max_seq_len: int = 2048
    """Longest input the model accepts (rotary positions need no table; this only guards inputs)."""

    chunk_size: int = 64
    """Tokens per chunk (c): one retrieval per completed chunk."""

    enc_dim: int = 896
    """Width of the neighbor encoder; token embeddings have this width too (as in RETRO-pytorch)."""

    enc_depth: int = 2
    """Layers of the neighbor encoder."""

    enc_cross_attn_layers: Optional[tuple[int, ...]] = None
    """1-based encoder layers whose neighbors cross-attend to the decoder chunk; None means all."""

    dec_dim: int = 796
    """Width of the decoder (the language model)."""

    dec_depth: int = 12
    """Layers of the decoder."""

    dec_cross_attn_layers: tuple[int, ...] = (3, 6, 9, 12)
    """1-based decoder layers with chunked cross-attention; the encoder runs at the first one."""

    heads: int = 8
    """Attention heads in every attention layer."""

    dim_head: int = 64
    """Width of one attention head."""

    rotary_dim: int = 32
    """Per-head dimensions that get rotary positions (partial rotary, as in RETRO-pytorch); even."""

    rotary_base: float = 10000.0
    """Base of the rotary frequencies."""

    ff_mult: float = 4.0
    """Feed-forward hidden width as a multiple of the model width."""

    enc_attn_dropout: float = 0.0
    """Attention-probability dropout in the encoder."""

    enc_ff_dropout: float = 0.0
    """Dropout inside the encoder feed-forward blocks."""

    dec_attn_dropout: float = 0.0
    """Attention-probability dropout in the decoder (self-attention and CCA)."""

    dec_ff_dropout: float = 0.0
    """Dropout inside the decoder feed-forward blocks."""

    pad_id: int = 0
    """Padding token id: masked out of the neighbors and ignored by the loss."""

    attn_impl: str = "auto"
    """Attention kernel: "sdpa" (F.scaled_dot_product_attention), "matmul" (faster on CPU), or "auto" (SDPA on
    GPU, matmul on CPU); see attend()."""

    norm_eps: float = 1e-6
    """Epsilon of RMSNorm / LayerNorm."""

    use_deepnet: bool = False
    """DeepNet post-norm (Wang et al. 2022): x <- LayerNorm(alpha * x + f(x)) and beta-scaled init."""

    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights (pre-norm only; DeepNet uses its own init)."""

    pkm_layers: tuple[int, ...] = ()
    """1-based decoder layers whose feed-forward block is replaced by a product-key memory."""

    pkm: Optional[PKMConfig] = None
    """Product-key memory settings: a models.pkm.PKMConfig or a dict of its fields (from TOML); None means
    PKMConfig() when pkm_layers is set."""

    def __post_init__(self) -> None:
        positive = ("num_tokens", "max_seq_len", "chunk_size", "enc_dim", "enc_depth", "dec_dim",
                    "dec_depth", "heads", "dim_head")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.enc_cross_attn_layers is not None:
            self.enc_cross_attn_layers = _layer_tuple("enc_cross_attn_layers", self.enc_cross_attn_layers,
                                                      self.enc_depth)
        self.dec_cross_attn_layers = _layer_tuple("dec_cross_attn_layers", self.dec_cross_attn_layers,
                                                  self.dec_depth)
        self.pkm_layers = _layer_tuple("pkm_layers", self.pkm_layers, self.dec_depth)
        if (not isinstance(self.rotary_dim, int) or self.rotary_dim < 0 or self.rotary_dim % 2
                or self.rotary_dim > self.dim_head):
            raise ValueError(f"rotary_dim must be an even int in 0..dim_head={self.dim_head}, "
                             f"got {self.rotary_dim!r}")
        if not self.rotary_base > 1:
            raise ValueError(f"rotary_base must be > 1, got {self.rotary_base!r}")
        if not self.ff_mult > 0:
            raise ValueError(f"ff_mult must be > 0, got {self.ff_mult!r}")
        for name in ("enc_attn_dropout", "enc_ff_dropout", "dec_attn_dropout", "dec_ff_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id must be a token id in 0..{self.num_tokens - 1}, got {self.pad_id!r}")
        if self.attn_impl not in ("auto", "sdpa", "matmul"):
            raise ValueError(f'attn_impl must be "auto", "sdpa" or "matmul", got {self.attn_impl!r}')
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        if self.pkm is not None and not self.pkm_layers:
            raise ValueError("pkm is set but pkm_layers is empty: name the decoder layers that use it")
        if self.pkm is not None:
            from models.pkm import PKMConfig

            if isinstance(self.pkm, dict):
                try:
                    self.pkm = PKMConfig(**self.pkm)
                except TypeError as exc:
                    raise ValueError(f"bad pkm settings {self.pkm!r}: {exc}") from exc
            if not isinstance(self.pkm, PKMConfig):
                raise ValueError(f"pkm must be a models.pkm.PKMConfig or a dict, got {type(self.pkm).__name__}")


PRESETS: dict[str, dict[str, Any]] = {
    # for unit tests: about 130k parameters, 4-token chunks
    "tiny": dict(num_tokens=64, max_seq_len=64, chunk_size=4, enc_dim=32, enc_depth=2, dec_dim=48,
                 dec_depth=3, dec_cross_attn_layers=(1, 3), heads=2, dim_head=16, rotary_dim=8),
    # the RETRO-pytorch README model (its num_tokens 28996 is bert-base-cased; ours is the default tokenizer's)
    "readme": dict(num_tokens=BERT_UNCASED_VOCAB, max_seq_len=2048, chunk_size=64, enc_dim=896, enc_depth=2,
                   dec_dim=796, dec_depth=12, dec_cross_attn_layers=(3, 6, 9, 12), heads=8, dim_head=64,
                   dec_attn_dropout=0.25, dec_ff_dropout=0.25),
    # the paper's smallest RETRO ("172M" in its Table; here 215M parameters with the 30522-token vocabulary,
    # input embedding and output projection each 27M): d=896, 12 layers, 16 heads of 64, ffw 3584, RETRO
    # blocks every 3rd layer from layer 6, a 2-layer encoder of width 896, chunks of 64, 2048 tokens
    "paper_172m": dict(num_tokens=BERT_UNCASED_VOCAB, max_seq_len=2048, chunk_size=64, enc_dim=896,
                       enc_depth=2, dec_dim=896, dec_depth=12, dec_cross_attn_layers=(6, 9, 12), heads=16,
                       dim_head=64, ff_mult=4.0),
}


def retro_config(preset: str, **overrides: Any) -> RetroConfig:
    """A RetroConfig from a named preset (``tiny``, ``readme``, ``paper_172m``) with fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown RETRO preset {preset!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(RetroConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown RetroConfig field(s): {unknown}")
    return RetroConfig(**{**PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------------------
# building blocks


def rotary_cos_sin(positions: torch.Tensor, rot_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables (n, rot_dim) for positions (n,), float32 (cast by the user).

    The sin table carries rotate-half's sign (-sin on the first half), so a rotation is
    ``t * cos + swap_halves(t) * sin``: one roll instead of chunk, neg and cat.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float32)
                               / rot_dim))  # (rot_dim/2,)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (n, rot_dim/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)  # (n, rot_dim)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (n, rot_dim)
    return cos, sin


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim features of t (..., n, [extra dims,] d) by position; the rest pass through.

    cos and sin are (n, rot_dim), or already shaped to broadcast against t[..., :rot_dim].
    """
    rot_dim = cos.shape[-1]
    if rot_dim == 0:
        return t
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    # split, not slicing: split's backward is one cat, slicing's fills a zero tensor per slice
    t_rot, t_pass = t.split([rot_dim, t.shape[-1] - rot_dim], dim=-1)  # (..., rot_dim), (..., d - rot_dim)
    rotated = t_rot * cos + t_rot.roll(rot_dim // 2, dims=-1) * sin  # (..., rot_dim)
    return torch.cat((rotated, t_pass), dim=-1)  # (..., d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None,
           causal: bool = False, dropout_p: float = 0.0, impl: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention: softmax(q k^T / sqrt(dh)) v, keys masked by key_mask (True = attend).

    impl "sdpa": torch's scaled_dot_product_attention (flash / memory-efficient kernels: the choice on GPU
    and for long sequences). impl "matmul": two plain matmuls (bf16 under autocast) around a softmax that
    accumulates in float32; on CPU with AMX this is about 2x faster than SDPA's CPU kernels (forward +
    backward) at RETRO's 64-512-token sizes, where SDPA took about 14% of a training step. impl "auto":
    SDPA on GPU, matmul on CPU (a whole RETRO training step 1.2x faster here: benchmarks/retro_model_speed.py).
    """
    # q: (B, h, n, dh); k, v: (B, h, m, dh); key_mask: (B, m) bool -> out (B, h, n, dh)
    if impl == "auto":
        impl = "matmul" if q.device.type == "cpu" else "sdpa"
    n, m = q.shape[-2], k.shape[-2]
    if impl == "sdpa":
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, m)
        if causal and n != m:  # queries are the last n of m positions (a decoding cache): bottom-right causal
            # SDPA's is_causal aligns top-left; one query (n == 1) sees every key and needs no mask at all
            if n > 1:
                seen = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)  # (n, m)
                mask = seen if mask is None else mask & seen
            causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    # scores stay in the matmul's dtype: softmax accumulates in float32 internally even for bf16 input,
    # and its output would be rounded to bf16 for the next matmul anyway
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, h, n, m)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if causal:
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1)  # (n, m)
        scores = scores.masked_fill(future, float("-inf"))
    attn = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)  # (B, h, n, m)
    return torch.matmul(attn.to(v.dtype), v)  # (B, h, n, dh)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight in float32 math, with a hand-written backward (fewer passes than autograd's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,  # type: ignore[override]
                out_dtype: torch.dtype) -> torch.Tensor:
        # x: (..., d) float32; weight: (d,)
        d = x.shape[-1]
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()  # (..., 1) sum of squares
        r = torch.rsqrt(sq.div_(d).add_(eps))  # (..., 1) 1 / rms
        y = (x * r).to(out_dtype) * weight.to(out_dtype)  # (..., d)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, weight, r = ctx.saved_tensors  # (..., d), (d,), (..., 1)
        d = x.shape[-1]
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (x * r).mul_(gy).sum(dim=tuple(range(x.dim() - 1))).to(weight.dtype)  # (d,)
        if ctx.needs_input_grad[0]:
            gw = gy * weight  # (..., d) float32
            c = torch.linalg.vecdot(gw, x, dim=-1).unsqueeze(-1).mul_(r.pow(3)).div_(d)  # (..., 1)
            dx = torch.addcmul(gw.mul_(r), x, c, value=-1.0)  # r * gw - x * r^3 <gw, x> / d
        return dx, dw, None, None


class RMSNorm(nn.Module):
    """Pre-norm RMSNorm. Under autocast it hands back the autocast dtype: its only consumers are matmuls
    (and CCA's shift), which would cast anyway, so the float32 copy and a cast pass are saved."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., dim) -> (..., dim)
        device_type = x.device.type
        out_dtype = x.dtype
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        if device_type != "cpu" or torch.compiler.is_compiling():
            # PyTorch's fused kernel on GPU; under torch.compile the compiler fuses it with its neighbors
            return rms_norm(x, self.weight, self.eps, out_dtype)
        return _RMSNormFunction.apply(x.float(), self.weight, self.eps, out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm through F.rms_norm in float32, cast to out_dtype (RMSNorm's path on GPU and under compile)."""
    # autocast would run F.rms_norm in float32 anyway; keep it explicit and outside autocast's casts
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(out_dtype)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the labels that are not ignore_index, from bf16 or float32 logits.

    Same value and gradient as F.cross_entropy (float32 math), but computed in row blocks: no float32 copy
    of the whole (N, vocab) logits, no saved log-softmax, no zero-filled gradient; about 2x faster on CPU
    for a 30k vocabulary. With no valid label the loss is 0 (F.cross_entropy gives NaN). With ``mean``
    False it is the sum over valid labels (what a trainer that weights tokens across workers needs).
    No host synchronisation: the label count stays on the device.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,  # type: ignore[override]
                block: int, mean: bool) -> torch.Tensor:
        # logits: (N, V) float; labels: (N,) int64
        valid = labels != ignore_index  # (N,)
        safe = labels.masked_fill(~valid, 0)  # (N,)
        count = valid.sum().clamp(min=1) if mean else torch.ones((), dtype=torch.int64, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        for s in range(0, logits.shape[0], block):
            blk = logits[s:s + block]  # (blk, V)
            top = blk.max(dim=-1, keepdim=True).values.float()  # (blk, 1), exact in any dtype
            # blk - top promotes to float32 inside the subtraction: no separate float32 copy
            lse[s:s + block] = torch.sub(blk, top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
        target = logits.gather(1, safe[:, None]).squeeze(1).float()  # (N,)
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.block = block
        return ((lse - target) * valid).sum() / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None, None]:  # type: ignore[override]
        logits, safe, valid, lse, count = ctx.saved_tensors
        scale = (grad / count) * valid  # (N,)
        out = torch.empty_like(logits)  # (N, V)
        for s in range(0, logits.shape[0], ctx.block):
            p = torch.sub(logits[s:s + ctx.block], lse[s:s + ctx.block, None]).exp_()  # (blk, V) softmax, float32
            p[torch.arange(p.shape[0], device=p.device), safe[s:s + ctx.block]] -= 1.0
            p *= scale[s:s + ctx.block, None]
            out[s:s + ctx.block] = p
        return out, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy, labels equal to ignore_index left out; logits (..., V), labels (...).

    reduction "mean" (over the valid labels) or "sum". Rows go in blocks of 64 on CPU (cache-sized) and of
    about 2^25 logits on GPU (few, large kernels; the float32 temporary stays near 128 MB).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    vocab = logits.shape[-1]
    block = 64 if logits.device.type == "cpu" else max(64, (1 << 25) // vocab)
    return _CrossEntropy.apply(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index, block,
                               reduction == "mean")


class Residual(nn.Module):
    """Pre-norm (x + f(norm(x))) or DeepNet post-norm (norm(alpha * x + f(x))) around a sublayer."""

    def __init__(self, dim: int, fn: nn.Module, *, post_norm: bool, alpha: float, eps: float) -> None:
        super().__init__()
        self.fn = fn
        self.post_norm = post_norm
        self.alpha = alpha
        self.norm: nn.Module = nn.LayerNorm(dim, eps=eps) if post_norm else RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # x: (b, n, dim)
        if self.post_norm:
            return self.norm(x * self.alpha + self.fn(x, *args, **kwargs))
        return x + self.fn(self.norm(x), *args, **kwargs)


class FeedForward(nn.Module):
    """The standard GELU MLP (as in RETRO-pytorch)."""

    def __init__(self, dim: int, mult: float, dropout: float) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.w_in = nn.Linear(dim, inner)
        self.w_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, n, dim) -> (b, n, dim)
        return self.w_out(self.dropout(F.gelu(self.w_in(x))))


class KVCache:
    """One self-attention layer's keys and values during decoding, in buffers of max_len positions (no copy of
    the past per token)."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length = max_len, 0
        self.k: Optional[torch.Tensor] = None  # (B, h, max_len, dh)
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, h, n, dh) after the cached positions; return all keys and values (B, h, length, dh)."""
        B, h, n, dh = k.shape
        if self.k is None:
            self.k = k.new_empty(B, h, self.max_len, dh)
            self.v = v.new_empty(B, h, self.max_len, dh)
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"the decoding cache holds {self.max_len} positions; {end} asked for")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, rotary positions and SDPA."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, causal: bool, dropout: float,
                 impl: str = "auto") -> None:
        super().__init__()
        self.heads, self.dim_head, self.causal, self.dropout, self.impl = heads, dim_head, causal, dropout, impl
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        # x: (B, n, dim); cos, sin: (n, rot); key_mask: (B, n) bool, True = attend
        # cache: the keys and values of the positions before these n (decoding); these n are appended
        B, n, _ = x.shape
        qkv = self.to_qkv(x).view(B, n, 3, self.heads, self.dim_head)  # (B, n, 3, h, dh)
        # rotate q and k together (one set of kernels): tables broadcast over the (q|k, head) dims
        qk, v = qkv.split([2, 1], dim=2)  # (B, n, 2, h, dh), (B, n, 1, h, dh)
        qk = apply_rotary(qk, cos[:, None, None], sin[:, None, None])  # (B, n, 2, h, dh)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, n, dh) each
        v = v.squeeze(2).transpose(1, 2)  # (B, h, n, dh)
        if self.causal and key_mask is not None:
            raise ValueError("causal self-attention takes no key mask (pads only ever follow real tokens)")
        if cache is not None:
            k, v = cache.append(k, v)  # (B, h, past + n, dh) each
        out = attend(q, k, v, key_mask=key_mask, causal=self.causal, impl=self.impl,
                     dropout_p=self.dropout if self.training else 0.0)  # (B, h, n, dh)
        out = out.transpose(1, 2).reshape(B, n, self.heads * self.dim_head)  # (B, n, h*dh)
        return self.to_out(out)  # (B, n, dim)


class CrossAttention(nn.Module):
    """Multi-head cross-attention (fused KV projection, rotary on both sides, optional null key/value)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, *, dropout: float,
                 null_kv: bool, impl: str = "auto") -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout, self.impl = heads, dim_head, dropout, impl
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # a learned "nothing" to attend to, so a query whose neighbors are all padding stays finite
        self.null_kv = nn.Parameter(torch.randn(2, heads, 1, dim_head) * 0.02) if null_kv else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, q_rot: tuple[torch.Tensor, torch.Tensor],
                k_rot: tuple[torch.Tensor, torch.Tensor], key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: (B, n, dim); context: (B, m, context_dim); q_rot: 2 x (n, rot); k_rot: 2 x (m, rot)
        # key_mask: (B, m) bool, True = attend
        return self.attend_to(x, *self.keys_values(context, k_rot), q_rot, key_mask)

    def keys_values(self, context: torch.Tensor, k_rot: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, h, m, dh) of a context (B, m, context_dim); a decoding cache keeps them."""
        B, m, _ = context.shape
        kv = self.to_kv(context).view(B, m, 2, self.heads, self.dim_head)  # (B, m, 2, h, dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, m, dh) each
        return apply_rotary(k, *k_rot), v

    def attend_to(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: tuple[torch.Tensor, torch.Tensor],
                  key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries from x (B, n, dim) attend to keys_values' k, v (B, h, m, dh) (and the null key/value)."""
        B, n, _ = x.shape
        q = self.to_q(x).view(B, n, self.heads, self.dim_head).transpose(1, 2)  # (B, h, n, dh)
        q = apply_rotary(q, *q_rot)
        if self.null_kv is not None:
            null_k, null_v = self.null_kv.to(k.dtype).unbind(0)  # (h, 1, dh) each
            k = torch.cat((null_k.expand(B, -1, -1, -1), k), dim=2)  # (B, h, 1 + m, dh)
            v = torch.cat((null_v.expand(B, -1, -1, -1), v), dim=2)  # (B, h, 1 + m, dh)
            if key_mask is not None:
                key_mask = F.pad(key_mask, (1, 0), value=True)  # (B, 1 + m)
        out = attend(q, k, v, key_mask=key_mask, impl=self.impl,
                     dropout_p=self.dropout if self.training else 0.0)  # (B, h, n, dh)
        out = out.transpose(1, 2).reshape(B, n, self.heads * self.dim_head)  # (B, n, h*dh)
        return self.to_out(out)  # (B, n, dim)


class ChunkedCrossAttention(nn.Module):
    """CCA: attending chunk j (positions j*c+c-1 .. j*c+2c-2) cross-attends to the neighbors of chunk j.

    The shift by c - 1 is the paper's causality rule; chunks are folded into the batch dimension.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, chunk_size: int, *, dropout: float,
                 impl: str = "auto") -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.attn = CrossAttention(dim, dim, heads, dim_head, dropout=dropout, null_kv=True, impl=impl)

    def forward(self, x: torch.Tensor, neighbors: EncodedNeighbors, start: int = 0,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        # x: (b, n, dim) at positions start .. start+n-1 -> (b, n, dim); zero where a token has no completed
        # chunk to read from. neighbors: the chunks first_chunk .. first_chunk+G-1, which must cover every
        # attending chunk these positions lie in (all of them from 0 when start is 0). kv: their keys and
        # values (b*G, h, k*L, dh) when a decoding cache holds them; else projected from neighbors.hidden
        b, n, dim = x.shape
        c, G = self.chunk_size, neighbors.num_chunks
        span = G * c  # attending positions lo .. lo+span-1
        lo = c - 1 + neighbors.first_chunk * c  # first position of attending chunk first_chunk
        off = start - lo  # x row i is position start + i, i.e. attending row off + i
        shifted = x[:, -off:] if off < 0 else F.pad(x, (0, 0, off, 0))  # row r = attending row r
        shifted = shifted[:, :span]
        if shifted.shape[1] < span:  # the last attending chunk runs past the end (zero-pad it)
            shifted = F.pad(shifted, (0, 0, 0, span - shifted.shape[1]))
        shifted = shifted.reshape(b * G, c, dim)  # (b*G, c, dim)
        if kv is None:
            kv = self.attn.keys_values(neighbors.hidden, neighbors.k_rot)  # 2 x (b*G, h, k*L, dh)
        out = self.attn.attend_to(shifted, *kv, neighbors.q_rot, neighbors.key_mask)  # (b*G, c, dim)
        out = out.reshape(b, span, dim)  # (b, G*c, dim): attending row r
        if off < 0:
            out = F.pad(out, (0, 0, -off, 0))  # x row i reads row i
        else:
            out = out[:, off:]
        if out.shape[1] >= n:
            return out[:, :n]  # (b, n, dim)
        return F.pad(out, (0, 0, 0, n - out.shape[1]))  # (b, n, dim)


@dataclass
class EncodedNeighbors:
    """The encoder's output, laid out for CCA (chunks in the batch dimension, neighbors concatenated)."""

    hidden: Optional[torch.Tensor]  # (b*R, k*L, dec_dim); None when a decoding cache holds each CCA's keys
    key_mask: Optional[torch.Tensor]  # (b*R, k*L) bool, True = real token; None when nothing is padded
    q_rot: tuple[torch.Tensor, torch.Tensor]  # 2 x (c, rot): query positions c-1 .. 2c-2 within chunk j
    k_rot: tuple[torch.Tensor, torch.Tensor]  # 2 x (k*L, rot): positions 0..L-1 inside each neighbor
    num_chunks: int  # R
    first_chunk: int = 0  # the chunk index of the first of the R


class EncoderLayer(nn.Module):
    """Neighbor self-attention, optional cross-attention to the decoder chunk, feed-forward."""

    def __init__(self, cfg: RetroConfig, *, cross: bool, alpha: float) -> None:
        super().__init__()
        d, post, eps = cfg.enc_dim, cfg.use_deepnet, cfg.norm_eps
        self.attn = Residual(d, SelfAttention(d, cfg.heads, cfg.dim_head, causal=False, dropout=cfg.enc_attn_dropout,
                                              impl=cfg.attn_impl), post_norm=post, alpha=alpha, eps=eps)
        self.cross = Residual(d, CrossAttention(d, cfg.dec_dim, cfg.heads, cfg.dim_head,
                                                dropout=cfg.enc_attn_dropout, null_kv=False, impl=cfg.attn_impl),
                              post_norm=post, alpha=alpha, eps=eps) if cross else None
        self.ff = Residual(d, FeedForward(d, cfg.ff_mult, cfg.enc_ff_dropout), post_norm=post, alpha=alpha,
                           eps=eps)


class DecoderLayer(nn.Module):
    """Causal self-attention, optional CCA, then feed-forward or product-key memory."""

    def __init__(self, cfg: RetroConfig, *, cca: bool, pkm: bool, alpha: float) -> None:
        super().__init__()
        d, post, eps = cfg.dec_dim, cfg.use_deepnet, cfg.norm_eps
        self.attn = Residual(d, SelfAttention(d, cfg.heads, cfg.dim_head, causal=True, dropout=cfg.dec_attn_dropout,
                                              impl=cfg.attn_impl), post_norm=post, alpha=alpha, eps=eps)
        self.cca = Residual(d, ChunkedCrossAttention(d, cfg.heads, cfg.dim_head, cfg.chunk_size,
                                                     dropout=cfg.dec_attn_dropout, impl=cfg.attn_impl),
                            post_norm=post, alpha=alpha, eps=eps) if cca else None
        if pkm:
            from models.pkm import PKMConfig, ProductKeyMemory

            block: nn.Module = ProductKeyMemory(d, cfg.pkm if cfg.pkm is not None else PKMConfig())
        else:
            block = FeedForward(d, cfg.ff_mult, cfg.dec_ff_dropout)
        self.ff = Residual(d, block, post_norm=post, alpha=alpha, eps=eps)


# --------------------------------------------------------------------------------------------------
# the model


class RETRO(nn.Module):
    """RETRO language model: ``RETRO(config)``; see the module docstring for the layout and causality."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.chunk_size, self.pad_id = cfg.chunk_size, cfg.pad_id
        self.seq_len = cfg.max_seq_len  # RETRO-pytorch's name, used by its training wrapper
        N, M = cfg.enc_depth, cfg.dec_depth
        if cfg.use_deepnet:  # DeepNet encoder-decoder constants (Wang et al. 2022, Figure 2)
            enc_alpha, enc_beta = 0.81 * (N ** 4 * M) ** (1 / 16), 0.87 * (N ** 4 * M) ** (-1 / 16)
            dec_alpha, dec_beta = (3 * M) ** (1 / 4), (12 * M) ** (-1 / 4)
        else:
            enc_alpha = enc_beta = dec_alpha = dec_beta = 1.0

        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.enc_dim)  # shared by the sequence and the neighbors
        self.to_dec = nn.Linear(cfg.enc_dim, cfg.dec_dim) if cfg.enc_dim != cfg.dec_dim else nn.Identity()
        enc_cross = set(range(1, N + 1)) if cfg.enc_cross_attn_layers is None else set(cfg.enc_cross_attn_layers)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, cross=i in enc_cross, alpha=enc_alpha)
                                     for i in range(1, N + 1))
        self.enc_norm = nn.Identity() if cfg.use_deepnet else RMSNorm(cfg.enc_dim, eps=cfg.norm_eps)
        # the decoder's residual stream grows with depth: normalise it before neighbors attend to it
        self.ctx_norm = nn.Identity() if cfg.use_deepnet else RMSNorm(cfg.dec_dim, eps=cfg.norm_eps)
        self.enc_out = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, cca=i in cfg.dec_cross_attn_layers, pkm=i in cfg.pkm_layers, alpha=dec_alpha)
            for i in range(1, M + 1))
        self.dec_norm = nn.Identity() if cfg.use_deepnet else RMSNorm(cfg.dec_dim, eps=cfg.norm_eps)
        self.to_logits = nn.Linear(cfg.dec_dim, cfg.num_tokens, bias=False)
        self._init_weights(enc_beta, dec_beta)
        self.activation_checkpointing = False  # a training setting, not part of the config (see _run)

    def compile_blocks(self, **options: Any) -> RETRO:
        """torch.compile every residual block (attention, CCA, feed-forward) of the encoder and decoder in place.

        Per block, not the whole model: the retrieval bookkeeping between blocks (chunk shapes, the encoder
        running at the first CCA layer) stays eager Python, each block compiles to one graph with no host
        synchronisation, and the parameter names (checkpoints) do not change. options go to torch.compile.
        """
        for layer in [*self.encoder, *self.decoder]:
            for block in (getattr(layer, name, None) for name in ("attn", "cross", "cca", "ff")):
                if block is not None:
                    block.compile(**options)
        return self

    def _init_weights(self, enc_beta: float, dec_beta: float) -> None:
        """Normal(0, init_std) for pre-norm; DeepNet's xavier-normal with gain beta on v/out/ff for post-norm."""
        pkm_modules = [m for m in self.modules() if type(m).__name__ == "ProductKeyMemory"]
        pkm_params = {id(p) for m in pkm_modules for p in m.parameters()}  # PKM keeps its own init
        nn.init.normal_(self.token_emb.weight, std=self.config.init_std)
        for part, beta in ((self.encoder, enc_beta), (self.decoder, dec_beta)):
            for name, module in part.named_modules():
                if not isinstance(module, nn.Linear) or id(module.weight) in pkm_params:
                    continue
                if self.config.use_deepnet:
                    if name.endswith(("to_kv", "to_qkv")):  # gain 1 on q/k rows, beta on v rows
                        w = module.weight.data
                        nn.init.xavier_normal_(w)
                        v_rows = w.shape[0] // (2 if name.endswith("to_kv") else 3)
                        w[-v_rows:].mul_(beta)
                    else:
                        gain = beta if name.endswith(("to_out", "w_in", "w_out")) else 1.0
                        nn.init.xavier_normal_(module.weight.data, gain=gain)
                else:
                    nn.init.normal_(module.weight, std=self.config.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in (self.to_dec, self.enc_out, self.to_logits):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- helpers for callers (training job, generation)

    def num_completed_chunks(self, n: int) -> int:
        """How many retrieved chunks a sequence of n tokens takes: its completed chunks, n // chunk_size."""
        return n // self.chunk_size

    def _rot(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_base)

    def _check_retrieved(self, retrieved: Optional[torch.Tensor], b: int, n: int) -> Optional[torch.Tensor]:
        """Validate (b, R, k, L) neighbor tokens; (b, R, L) means one neighbor. None when no chunk is complete."""
        if retrieved is None:
            return None
        if retrieved.dim() == 3:
            retrieved = retrieved.unsqueeze(2)  # (b, R, 1, L)
        if retrieved.dim() != 4:
            raise ValueError(f"retrieved must be (batch, chunks, neighbors, tokens), got {tuple(retrieved.shape)}")
        if retrieved.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"retrieved must hold int token ids, got {retrieved.dtype}")
        want = self.num_completed_chunks(n)
        if retrieved.shape[0] != b or retrieved.shape[1] != want:
            raise ValueError(f"a sequence of {n} tokens needs retrieved of shape ({b}, {want}, k, L) "
                             f"(one entry per completed chunk of {self.chunk_size}), got {tuple(retrieved.shape)}")
        if retrieved.shape[-1] < self.chunk_size:
            raise ValueError(f"retrieved neighbors must hold at least chunk_size={self.chunk_size} tokens "
                             f"(normally 2 * chunk_size: neighbor and continuation), got {retrieved.shape[-1]}")
        if retrieved.shape[2] == 0 or want == 0:
            return None
        return retrieved.long()

    def _encode(self, retrieved: torch.Tensor, h: torch.Tensor, chunk_hidden: torch.Tensor) -> EncodedNeighbors:
        """Encode all neighbors at once; each cross-attends to the decoder states of the chunk it serves."""
        # retrieved: (b, R, k, L) int64; h: (b*R*k, L, enc_dim) their embeddings;
        # chunk_hidden: (b, R*c, dec_dim), the decoder at the first CCA layer
        b, R, k, L = retrieved.shape
        c, device = self.chunk_size, retrieved.device
        tokens = retrieved.reshape(b * R * k, L)  # (b*R*k, L)
        real = tokens != self.pad_id  # (b*R*k, L)
        # no padding anywhere: run attention unmasked (faster kernels). Asking is a host synchronisation, so
        # only on CPU (where it costs nothing) and never under torch.compile (it would break the graph)
        all_real = (real.device.type == "cpu" and not torch.compiler.is_compiling()) and bool(real.all())
        # an all-padding neighbor (fewer than k found) attends over its pads rather than over nothing (NaN)
        self_mask = None if all_real else real | ~real.any(dim=-1, keepdim=True)  # (b*R*k, L)
        context = self.ctx_norm(chunk_hidden).reshape(b * R, c, -1)  # (b*R, c, dec_dim)
        nb_rot = self._rot(torch.arange(L, device=device))  # 2 x (L, rot)
        ctx_rot = self._rot(torch.arange(c, device=device))  # 2 x (c, rot)
        grouped_rot = tuple(t.repeat(k, 1) for t in nb_rot)  # 2 x (k*L, rot)
        for layer in self.encoder:
            h = self._run(layer.attn, h, *nb_rot, self_mask)  # (b*R*k, L, enc_dim)
            if layer.cross is not None:
                # the k neighbors of a chunk share its context: fold them into the query length
                hg = h.reshape(b * R, k * L, -1)  # (b*R, k*L, enc_dim)
                h = self._run(layer.cross, hg, context, grouped_rot, ctx_rot).reshape(b * R * k, L, -1)
            h = self._run(layer.ff, h)  # (b*R*k, L, enc_dim)
        h = self.enc_out(self.enc_norm(h))  # (b*R*k, L, dec_dim)
        # CCA queries of attending chunk j sit at offsets c-1 .. 2c-2 from the start of chunk j, so a query
        # and the neighbor token aligned with it (neighbor i ~ chunk token i, continuation ~ next chunk) are close
        q_rot = self._rot(torch.arange(c - 1, 2 * c - 1, device=device))  # 2 x (c, rot)
        return EncodedNeighbors(hidden=h.reshape(b * R, k * L, -1),
                                key_mask=None if all_real else real.reshape(b * R, k * L),
                                q_rot=q_rot, k_rot=grouped_rot, num_chunks=R)

    def hidden_states(self, seq: torch.Tensor, retrieved: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final (normalised) decoder states (b, n, dec_dim) for token ids seq (b, n)."""
        if seq.dim() != 2:
            raise ValueError(f"seq must be (batch, tokens), got {tuple(seq.shape)}")
        b, n = seq.shape
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_seq_len={self.config.max_seq_len}")
        retrieved = self._check_retrieved(retrieved, b, n)  # (b, R, k, L) or None
        if not self.config.dec_cross_attn_layers:
            retrieved = None
        if retrieved is None:
            emb = self.token_emb(seq)  # (b, n, enc_dim)
        else:
            # one lookup for sequence and neighbors: one dense embedding gradient (a 27M-float zero-fill) not two
            both = self.token_emb(torch.cat((seq.reshape(-1), retrieved.reshape(-1))))  # (b*n + b*R*k*L, enc_dim)
            emb, nb_emb = both.split([b * n, retrieved.numel()])
            emb = emb.view(b, n, -1)  # (b, n, enc_dim)
            nb_emb = nb_emb.view(-1, retrieved.shape[-1], nb_emb.shape[-1])  # (b*R*k, L, enc_dim)
        # the residual stream stays float32 under autocast (to_dec would hand back bf16)
        x = self.to_dec(emb).float()  # (b, n, dec_dim)
        cos, sin = self._rot(torch.arange(n, device=seq.device))  # (n, rot) each
        neighbors: Optional[EncodedNeighbors] = None
        for layer in self.decoder:
            x = self._run(layer.attn, x, cos, sin)  # (b, n, dec_dim)
            if layer.cca is not None and retrieved is not None:
                if neighbors is None:
                    R = retrieved.shape[1]
                    neighbors = self._encode(retrieved, nb_emb, x[:, :R * self.chunk_size])
                x = self._run(layer.cca, x, neighbors)  # (b, n, dec_dim)
            x = self._run(layer.ff, x)  # (b, n, dec_dim)
        return self.dec_norm(x)  # (b, n, dec_dim)

    def _run(self, block: nn.Module, *args: Any) -> Any:
        """block(*args), recomputed in the backward pass instead of kept when activation checkpointing is on."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, seq: torch.Tensor, retrieved: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_loss: bool = False,
                reduction: str = "mean") -> torch.Tensor:
        """Logits (b, n, num_tokens), or the cross-entropy (label pad_id ignored) when training.

        seq: (b, n) int64 token ids. retrieved: (b, n // chunk_size, k, 2 * chunk_size) int64 neighbor tokens
        (neighbor + continuation, pad id 0) or None to run without retrieval. With ``return_loss=True`` and
        no ``labels``, seq holds n + 1 tokens and is split into inputs seq[:, :-1] and labels seq[:, 1:]
        (as in RETRO-pytorch); retrieved then covers the n inputs. With ``labels`` (b, n) the loss is returned:
        the mean over the labels that count, or their sum with ``reduction="sum"``.
        """
        if labels is None and return_loss:
            seq, labels = seq[:, :-1], seq[:, 1:]  # (b, n), (b, n)
        logits = self.to_logits(self.hidden_states(seq, retrieved))  # (b, n, num_tokens)
        if labels is None:
            return logits
        if labels.shape != seq.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match the inputs {tuple(seq.shape)}")
        return cross_entropy(logits, labels, self.pad_id, reduction=reduction)  # float32 math on bf16 logits

    @torch.no_grad()
    def next_token_logits(self, prefix: torch.Tensor, retrieved: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (b, num_tokens) for the token after prefix (b, n), any n >= 1.

        retrieved holds the neighbors of the prefix's completed chunks, (b, n // chunk_size, k, L), or None.
        Only the last position goes through the output projection. Recomputes the whole prefix (``extend``
        keeps a cache instead).
        """
        hidden = self.hidden_states(prefix, retrieved)  # (b, n, dec_dim)
        return self.to_logits(hidden[:, -1])  # (b, num_tokens)

    # ---- decoding with a key/value cache (generation)

    def new_cache(self) -> DecodeCache:
        """An empty decoding cache for ``extend`` (one per generated batch of sequences)."""
        return DecodeCache(layers=[KVCache(self.config.max_seq_len) for _ in self.decoder])

    @torch.no_grad()
    def extend(self, cache: DecodeCache, tokens: torch.Tensor, retrieved: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """Logits (b, num_tokens) for the token after cache's positions followed by tokens (b, t).

        The same logits as ``next_token_logits`` of the whole sequence (up to float rounding), at the cost
        of the t new positions: every self-attention keeps its keys and values, the first CCA layer keeps
        the states its chunks' neighbors attend to, and each CCA layer keeps the keys and values of the
        neighbors encoded so far. retrieved is what ``next_token_logits`` takes for the whole sequence:
        the neighbors of its completed chunks (b, n // chunk_size, k, L), or None; only chunks completed
        since the last call are encoded. t may be the whole prompt (prefill) or one token.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be (batch, new tokens) with at least one, got {tuple(tokens.shape)}")
        b, t = tokens.shape
        start, c = cache.length, self.chunk_size
        n = start + t
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence of {n} tokens is longer than max_seq_len={self.config.max_seq_len}")
        retrieved = self._check_retrieved(retrieved, b, n)  # (b, n // c, k, L) or None
        cca_layers = self.config.dec_cross_attn_layers
        x = self.to_dec(self.token_emb(tokens)).float()  # (b, t, dec_dim)
        cos, sin = self._rot(torch.arange(start, n, device=tokens.device))  # (t, rot) each
        # position p >= c - 1 reads the neighbors of chunk (p - c + 1) // c: positions start .. n-1 read
        # chunks lo_chunk .. n // c - 1 (none before position c - 1)
        lo_chunk = max(0, start - c + 1) // c
        num_read = n // c - lo_chunk
        for i, layer in enumerate(self.decoder):
            x = layer.attn(x, cos, sin, cache=cache.layers[i])  # (b, t, dec_dim)
            if layer.cca is None:
                x = layer.ff(x)
                continue
            if i + 1 == cca_layers[0]:
                cache.context = x if cache.context is None else torch.cat((cache.context, x), dim=1)  # (b, n, d)
                if retrieved is not None:
                    self._encode_into(cache, retrieved)
            if retrieved is not None and num_read > 0:
                kv = tuple(t_[:, lo_chunk: lo_chunk + num_read].flatten(0, 1) for t_ in cache.cca_kv[i])
                mask = cache.cca_mask[:, lo_chunk: lo_chunk + num_read].flatten(0, 1)  # (b*G, k*L)
                view = EncodedNeighbors(hidden=None, key_mask=mask, q_rot=cache.q_rot, k_rot=cache.k_rot,
                                        num_chunks=num_read, first_chunk=lo_chunk)
                x = layer.cca(x, view, start, kv)  # (b, t, dec_dim)
            x = layer.ff(x)  # (b, t, dec_dim)
        cache.length = n
        return self.to_logits(self.dec_norm(x[:, -1]))  # (b, num_tokens)

    def _encode_into(self, cache: DecodeCache, retrieved: torch.Tensor) -> None:
        """Encode the chunks completed since the cache last saw retrieved; keep every CCA layer's keys/values."""
        b, R, k, L = retrieved.shape
        done, c = cache.chunks, self.chunk_size
        if R <= done:
            return
        new = retrieved[:, done:]  # (b, G, k, L)
        nb_emb = self.token_emb(new.reshape(-1)).view(-1, L, self.config.enc_dim)  # (b*G*k, L, enc_dim)
        enc = self._encode(new, nb_emb, cache.context[:, done * c: R * c])  # hidden (b*G, k*L, dec_dim)
        G = R - done
        mask = enc.key_mask if enc.key_mask is not None else torch.ones(
            b * G, k * L, dtype=torch.bool, device=retrieved.device)
        cache.cca_mask = _cat_chunks(cache.cca_mask, mask.view(b, G, k * L))
        for i, layer in enumerate(self.decoder):
            if layer.cca is not None:
                kv = layer.cca.fn.attn.keys_values(enc.hidden, enc.k_rot)  # 2 x (b*G, h, k*L, dh)
                old = cache.cca_kv.get(i, (None, None))
                cache.cca_kv[i] = tuple(_cat_chunks(o, t_.unflatten(0, (b, G))) for o, t_ in zip(old, kv))
        cache.q_rot, cache.k_rot, cache.chunks = enc.q_rot, enc.k_rot, R


def _cat_chunks(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Append per-chunk tensors along dim 1 (chunks)."""
    return new if old is None else torch.cat((old, new), dim=1)


@dataclass
class DecodeCache:
    """What ``RETRO.extend`` keeps between calls: everything about the positions it has seen."""

    layers: list[KVCache]  # per decoder layer: self-attention keys and values
    length: int = 0  # positions seen
    context: Optional[torch.Tensor] = None  # (b, length, dec_dim) the first CCA layer's input states
    chunks: int = 0  # chunks whose neighbors are encoded
    cca_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    # per CCA layer index: keys and values (b, chunks, h, k*L, dh) of every encoded chunk's neighbors
    cca_mask: Optional[torch.Tensor] = None  # (b, chunks, k*L) bool, True = real neighbor token
    q_rot: tuple[torch.Tensor, ...] = ()  # CCA's rotary tables (see EncodedNeighbors)
    k_rot: tuple[torch.Tensor, ...] = ()
