"""The BERT-family chunk embedder (single device, no Ray).

Input per chunk: [CLS] + the chunk's first chunk_size tokens (the continuation token is dropped),
attention over non-pad tokens. Output: the mean of the last hidden state over the non-pad tokens
after [CLS] (RETRO-pytorch's default), or the [CLS] state with ``pooling="cls"``.

Speed: on CPUs with bfloat16 instructions (AVX512-BF16 or AMX) the weights are cast to bfloat16
(about 3-4x the float32 matmul rate here, every embedding within cosine 0.9999 of float32); pooling
is always done in float32. On GPUs bfloat16 (or float16 where bf16 is missing).
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

    @torch.inference_mode()
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(n, chunk_size + 1) int token rows -> (n, dim) float32 embeddings."""
        chunk = torch.from_numpy(np.array(tokens[:, :-1], dtype=np.int64))  # (n, c): drop the continuation
        cls = torch.full((chunk.shape[0], 1), self.config.cls_id, dtype=torch.long)
        ids = torch.cat([cls, chunk], dim=1).to(self.device)  # (n, c + 1)
        mask = ids != self.config.pad_id  # (n, c + 1); [CLS] is never pad
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, c + 1, dim)
        if self.config.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            m = mask[:, 1:, None].float()  # (n, c, 1): non-pad tokens after [CLS]
            pooled = (hidden[:, 1:].float() * m).sum(dim=1) / (m.sum(dim=1) + 1e-8)  # (n, dim)
        return pooled.cpu().numpy()
