"""A compact output vocabulary: the token ids a build uses, renumbered (``--vocab corpus``)."""
from __future__ import annotations

import json

import numpy as np

from pipelines.artifacts.build_reader import BuildReader
from pipelines.artifacts.storage import Location, read_bytes, write_bytes_atomic
from pipelines.runtime.redact import redact
from pipelines.train.data_order import fingerprint


class TokenMap:
    """The token ids a build uses, renumbered densely (pad 0 stays 0): models predict over these only.

    Why: the output layer and softmax over a 30522-token BERT vocabulary dominate a small model's step on CPU,
    and a small corpus uses a few thousand of those ids. Ids outside the map (a prompt's rare words) become the
    tokenizer's [UNK]."""

    def __init__(self, ids: np.ndarray, unk_id: int = 100):
        self.ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0 or self.ids[0] != 0 or np.any(np.diff(self.ids) <= 0):
            raise ValueError("a token map must be sorted, unique, and start with the pad id 0")
        self._lut = np.zeros(int(self.ids[-1]) + 1, np.int64)
        self._lut[self.ids] = np.arange(len(self.ids))
        hit = np.searchsorted(self.ids, unk_id)
        self.unk = int(hit) if hit < len(self.ids) and self.ids[hit] == unk_id else 0

    def __len__(self) -> int:
        return len(self.ids)

    def to_compact(self, tokens: np.ndarray) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64)
        inside = (t >= 0) & (t < len(self._lut))
        out = np.where(inside, self._lut[np.clip(t, 0, len(self._lut) - 1)], self.unk)
        known = inside & (self.ids[out] == t)
        return np.where(known, out, self.unk)

    def to_full(self, tokens: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(tokens, dtype=np.int64)]


def _part_token_ids(data_url: str, part: int) -> np.ndarray:
    tokens, _ = BuildReader(data_url, cache_parts=1).read_part(part)
    return np.unique(tokens)


def corpus_vocab(data: Location, out: Location) -> np.ndarray:
    """The sorted token ids of every chunk (plus pad and the special tokens): one Ray task per chunks part,
    only the unique ids come back. Cached under ``--out/vocab/`` by the chunks' fingerprint."""
    import ray

    reader = BuildReader(data)
    rel = f"vocab/{fingerprint([p['sha256'] for p in reader.manifest['parts']])}.json"
    try:
        return np.asarray(json.loads(read_bytes(out, rel))["ids"], dtype=np.int64)
    except FileNotFoundError:
        pass
    task = ray.remote(num_cpus=1)(_part_token_ids)
    found = ray.get([task.remote(data.url, i) for i in range(len(reader.parts))])
    special = [reader.tokenizer.get(k) for k in ("pad_id", "cls_id", "sep_id")] + [100]
    ids = np.union1d(np.concatenate(found + [np.zeros(1, np.int64)]),
                     np.asarray([s for s in special if s is not None], np.int64))
    write_bytes_atomic(out, rel, json.dumps({"ids": ids.tolist(), "data": redact(data.url)}).encode())
    return ids
