"""The BERT-family chunk embedder (single device, no Ray).

Input per chunk: [CLS] + the chunk's first chunk_size tokens (the continuation token is dropped),
attention over non-pad tokens. Output: the mean of the last hidden state over the non-pad tokens
after [CLS] (RETRO-pytorch's default), or the [CLS] state with ``pooling="cls"``.

Speed: on CPUs with bfloat16 instructions (AVX512-BF16 or AMX) the weights are cast to bfloat16
(about 3-4x the float32 matmul rate here, every embedding within cosine 0.9999 of float32); pooling
is always done in float32. On GPUs bfloat16 (or float16 where bf16 is missing).

Padding: a document's last chunk is partly padding (pad only at the end of a row). ``embed_rows`` keeps
the full-length rows in their order and batches, sorts the shorter rows by length and runs each of
their batches trimmed to its longest row, so no batch computes on pad positions it does not need. Pad
keys are masked out of attention either way, so a trimmed row's embedding is the same up to float
rounding (benchmarks/length_grouping.py measures it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
POOLINGS = ("mean", "cls")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU runs bfloat16 matmuls natively."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@dataclass
class EncoderConfig:
    """How chunks are embedded."""

    name_or_path: str  # Hugging Face name or local folder (resolved by the caller)
    pooling: str = "mean"  # "mean" over non-pad tokens after [CLS], or "cls"
    compute_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    cls_id: int = 101
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")


def row_lengths(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    """(n, c + 1) token rows -> (n,) int64: tokens of each chunk up to its last non-pad one (0 if all pad);
    the continuation column is not part of the chunk."""
    nonpad = tokens[:, :-1] != pad_id
    width = nonpad.shape[1]
    last = width - np.argmax(nonpad[:, ::-1], axis=1)  # index after the last non-pad token
    return np.where(nonpad.any(axis=1), last, 0).astype(np.int64)


@dataclass(frozen=True)
class LengthBatch:
    """One forward pass: which input rows, and how many chunk tokens of each it computes ([CLS] on top)."""

    rows: np.ndarray  # (m,) int64 indices into the input rows
    width: int


def plan_length_batches(lengths: np.ndarray, width: int, batch_size: int) -> list[LengthBatch]:
    """Full-length rows in their order and batches of ``batch_size``; then the shorter rows sorted by length,
    in batches trimmed to their longest row (at least 1 token, so an all-pad row keeps a key)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    full = np.flatnonzero(lengths >= width)
    short = np.flatnonzero(lengths < width)
    short = short[np.argsort(lengths[short], kind="stable")]
    batches = [LengthBatch(full[i:i + batch_size], width) for i in range(0, len(full), batch_size)]
    for i in range(0, len(short), batch_size):
        rows = short[i:i + batch_size]
        batches.append(LengthBatch(rows, max(1, int(lengths[rows[-1]]))))
    return batches


class ChunkEncoder:
    """Loads the encoder once; ``embed`` maps (n, chunk_size+1) token rows to (n, dim) float32."""

    def __init__(self, config: EncoderConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.config = config
        want = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        self.dtype = resolve_compute_dtype(config.compute_dtype, self.device)
        try:
            model = AutoModel.from_pretrained(config.name_or_path, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - name the encoder in the one-line error
            raise ValueError(f"cannot load encoder {config.name_or_path!r}: {type(e).__name__}: {e}") from None
        self.model = model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed_rows(self, tokens: np.ndarray, batch_size: int, out: np.ndarray | None = None) -> np.ndarray:
        """(n, chunk_size + 1) token rows -> (n, dim) embeddings in the rows' order, batched by length
        (``plan_length_batches``) so that batches of short rows compute no pad positions they do not need.

        Args:
            tokens: chunk rows as stored (the last column is the continuation token).
            batch_size: rows per forward pass.
            out: optional (n, dim) array to fill (its dtype is the storage cast); a float32 one is made otherwise.
        Returns:
            ``out``.
        """
        if out is None:
            out = np.empty((len(tokens), self.dim), dtype=np.float32)
        if len(tokens) == 0:  # an empty part reads as shape (0, 0)
            return out
        for batch in plan_length_batches(row_lengths(tokens, self.config.pad_id), tokens.shape[1] - 1, batch_size):
            out[batch.rows] = self.embed(tokens[batch.rows], width=batch.width)
        return out

    @torch.inference_mode()
    def embed(self, tokens: np.ndarray, width: int | None = None) -> np.ndarray:
        """(n, chunk_size + 1) int token rows -> (n, dim) float32 embeddings; ``width`` computes only each
        chunk's first ``width`` tokens (the caller knows the rest are pad)."""
        chunk = torch.from_numpy(np.array(tokens[:, :-1][:, :width], dtype=np.int64))  # (n, w): drop the continuation
        cls = torch.full((chunk.shape[0], 1), self.config.cls_id, dtype=torch.long)
        ids = torch.cat([cls, chunk], dim=1).to(self.device)  # (n, w + 1)
        mask = ids != self.config.pad_id  # (n, c + 1); [CLS] is never pad
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, w + 1, dim)
        if self.config.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            m = mask[:, 1:, None].float()  # (n, w, 1): non-pad tokens after [CLS]
            pooled = (hidden[:, 1:].float() * m).sum(dim=1) / (m.sum(dim=1) + 1e-8)  # (n, dim)
        return pooled.cpu().numpy()
