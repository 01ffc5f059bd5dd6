"""Retrieval for generation through a running `jobs.serve` service (``POST /search``) instead of a local build.

Why: a sampling process that loads the encoder and the index itself costs seconds and gigabytes per process;
a service already holds them (on a GPU, behind replicas, following ``LATEST``). The generator only needs, per
completed chunk, k neighbors as tokens, which this module rebuilds from the service's answer.

What differs from the local :class:`pipelines.inference.generate.ChunkRetriever`: the service takes text, so a
chunk is detokenized and embedded as a document's first chunk would be, and each neighbor's text is tokenized
again (special tokens such as [CLS] are not in the text). ``/search`` does not return the continuation chunk, so
the second half of each neighbor (RETRO's continuation) is padding, as at the end of a document.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

TIMEOUT_S = 60.0


class RetrievalServiceError(ValueError):
    """The service could not be reached or refused a search; the message says which URL and why, in one line
    (a ValueError: like a missing build, it is bad input the job reports as one ``error:`` line)."""


def search(url: str, texts: list[str], k: int, timeout_s: float = TIMEOUT_S) -> list[list[dict]]:
    """``POST {url}/search`` with ``{"texts": texts, "k": k}``: one list of hits per text (the service's JSON).

    Args:
        url: the service's base URL (``http://host:port``).
        texts: non-empty texts to search for.
        k: hits per text (the service allows 1..100).
        timeout_s: seconds to wait for the answer.

    Returns:
        For each text, its hits best first, each with at least ``chunk_id`` and ``text``.
    """
    body = json.dumps({"texts": texts, "k": k}).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/search", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", "")
        except ValueError:
            reason = ""
        raise RetrievalServiceError(f"{url}/search answered {e.code}: {reason or e.reason}") from None
    except (OSError, ValueError) as e:  # refused, timed out, not JSON
        raise RetrievalServiceError(f"cannot search {url}/search: {getattr(e, 'reason', None) or e}") from None
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != len(texts):
        raise RetrievalServiceError(f"{url}/search did not answer one result list per text: is it a jobs.serve service?")
    return results


@dataclass
class RemoteRetriever:
    """Chunk tokens -> k neighbors as (chunk + padding) tokens, through a jobs.serve service.

    ``tokenizer`` is the build's :class:`pipelines.text.tokenizer.ChunkTokenizer`; ``last_ids`` holds the chunk
    ids of the last call (-1 where fewer than k came back), as ChunkRetriever's does."""

    url: str
    tokenizer: object
    chunk_size: int
    k: int
    timeout_s: float = TIMEOUT_S
    last_ids: Optional[np.ndarray] = field(default=None, init=False)
    last_texts: list[list[str]] = field(default_factory=list, init=False)

    def _tokens(self, text: str) -> np.ndarray:
        ids = self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids[: self.chunk_size]
        out = np.zeros(self.chunk_size, np.int64)
        out[: len(ids)] = ids
        return out

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(n, c) chunk tokens -> (n, k, 2c) int64 neighbor tokens (0 where fewer than k exist, and the continuation)."""
        c = self.chunk_size
        texts = [self.tokenizer.tokenizer.decode([int(t) for t in row if t], skip_special_tokens=True) for row in chunks]
        out = np.zeros((len(chunks), self.k, 2 * c), np.int64)
        ids = np.full((len(chunks), self.k), -1, np.int64)
        asked = [i for i, t in enumerate(texts) if t.strip()]  # a chunk of special tokens only has nothing to search
        self.last_texts = [[] for _ in chunks]
        if asked:
            for i, hits in zip(asked, search(self.url, [texts[i] for i in asked], self.k, self.timeout_s)):
                for j, hit in enumerate(hits[: self.k]):
                    out[i, j, :c] = self._tokens(hit["text"])
                    ids[i, j] = int(hit["chunk_id"])
                    self.last_texts[i].append(hit["text"])
        self.last_ids = ids
        return out


def check_healthy(url: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`RetrievalServiceError` unless ``GET {url}/healthz`` answers 200 (before a model is sampled)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=timeout_s) as r:
            if r.status == 200:
                return
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        raise RetrievalServiceError(f"cannot reach {url}/healthz: {getattr(e, 'reason', None) or e}") from None
    raise RetrievalServiceError(f"{url}/healthz answered {status}: the service is not ready")


def connect_retriever(url: str, data_url: str, k: int, model_chunk_size: int) -> RemoteRetriever:
    """A :class:`RemoteRetriever` for a healthy service. With ``data_url``, the build's chunks manifest names the
    tokenizer and chunk size and its ``LATEST`` the default k (two small files; no index, encoder or parts);
    without it, the default tokenizer, the model's chunk size and ``k`` (then required) are used.

    Args:
        url: the service (``http://host:port``).
        data_url: the build the service serves, or "".
        k: neighbors per chunk; 0 = the build's k.
        model_chunk_size: the checkpoint's chunk size (checked against the build's).

    Returns:
        The retriever; a service that does not answer or a chunk size mismatch raises ``ValueError``.
    """
    from pipelines.artifacts.manifest import require_manifest
    from pipelines.artifacts.storage import open_location
    from pipelines.artifacts.versions import resolve_latest
    from pipelines.text.tokenizer import DEFAULT_ENCODER, load_tokenizer

    chunk_size, name = model_chunk_size, DEFAULT_ENCODER
    if data_url:
        data = open_location(data_url)
        chunks = require_manifest(data, "chunks", "generation")
        chunk_size, name = int(chunks["chunk_size"]), chunks.get("tokenizer", {}).get("name", DEFAULT_ENCODER)
        k = k or int(resolve_latest(data)["k"])
    if chunk_size != model_chunk_size:
        raise ValueError(f"the model reads chunks of {model_chunk_size} tokens, the build has {chunk_size}")
    check_healthy(url)
    return RemoteRetriever(url.rstrip("/"), load_tokenizer(name), chunk_size, k)
