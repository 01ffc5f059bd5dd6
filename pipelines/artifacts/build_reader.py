"""Read a build's ``chunks/`` by chunk id and ``docs/`` sources by doc id, a few parts at a time: how training,
generation and queries see a build."""
from __future__ import annotations

import numpy as np

from pipelines.artifacts.storage import Location, open_location


def part_offsets(manifest: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(part paths, rows, first id of each part) of a folder whose ids are dense and written in part order."""
    rows = np.asarray([int(p["rows"]) for p in manifest["parts"]], dtype=np.int64)
    return [p["path"] for p in manifest["parts"]], rows, np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)


class BuildReader:
    """Read-only access to a build's ``chunks/`` by chunk id, a few parts at a time (never the whole table).

    Ids are dense and parts are written in id order (docs/design.md), so part i holds ids
    ``[offsets[i], offsets[i] + rows[i])``: the manifest alone locates any id. Each part read is checked
    against that (its first chunk_id), so a build that broke the rule fails loudly instead of feeding
    wrong tokens to a model.
    """

    def __init__(self, data: Location | str, cache_parts: int = 4):
        from pipelines.artifacts.manifest import require_manifest

        self.data = open_location(data) if isinstance(data, str) else data
        m = require_manifest(self.data, "chunks", "training")
        self.manifest = m
        self.chunk_size = int(m["chunk_size"])
        self.seq_len = int(m["seq_len"])
        self.tokenizer = dict(m.get("tokenizer", {}))
        self.parts, self.rows, self.offsets = part_offsets(m)
        self.n_chunks = int(self.rows.sum())
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_parts = max(1, cache_parts)
        self._tombstones = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get("vocab_size", 0))

    def part_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def read_part(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (rows, c+1) int32, doc_id (rows,) int64) of chunks part ``i`` (cached)."""
        from pipelines.artifacts.parquet import read_table

        if i in self._cache:
            return self._cache[i]
        t = read_table(self.data, f"chunks/{self.parts[i]}", columns=["chunk_id", "doc_id", "tokens"])
        n = t.num_rows
        ids = t.column("chunk_id").to_numpy()
        if n != self.rows[i] or (n and ids[0] != self.offsets[i]):
            raise ValueError(f"{self.data.url_of('chunks', self.parts[i])}: expected {self.rows[i]} rows from chunk id "
                             f"{self.offsets[i]}, found {n} from {ids[0] if n else '-'} (chunk ids must be dense, in part order)")
        flat = t.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False)
        tokens = flat.reshape(n, self.chunk_size + 1).astype(np.int32, copy=False)
        doc = t.column("doc_id").to_numpy().astype(np.int64, copy=False)
        if len(self._cache) >= self._cache_parts:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = (tokens, doc)
        return tokens, doc

    def dead(self, ids: np.ndarray) -> np.ndarray:
        """Which chunk ids a re-index tombstoned (readers skip them; ``tombstones/`` exists only after one)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._tombstones is None:
            from pipelines.artifacts.manifest import read_manifest

            if read_manifest(self.data, "tombstones") is None:
                self._tombstones = False
            else:
                from pipelines.artifacts.tombstones import Tombstones

                self._tombstones = Tombstones.load(self.data)
        return self._tombstones.dead(ids) if self._tombstones else np.zeros(ids.shape, bool)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, c+1), doc_id (n,)) for any chunk ids in [0, n_chunks), reading only the parts they hit."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_chunks):
            raise IndexError(f"chunk ids must lie in [0, {self.n_chunks})")
        tokens = np.zeros((len(ids), self.chunk_size + 1), np.int32)
        doc = np.zeros(len(ids), np.int64)
        owner = self.part_of(ids)
        for p in np.unique(owner).tolist():
            sel = owner == p
            t, d = self.read_part(p)
            local = ids[sel] - self.offsets[p]
            tokens[sel], doc[sel] = t[local], d[local]
        return tokens, doc


class DocSources:
    """``docs/`` source by doc id (doc ids are dense, in part order), reading only the parts the ids fall in."""

    def __init__(self, data: Location):
        from pipelines.artifacts.manifest import require_manifest

        self.data = data
        self.parts, _, self.offsets = part_offsets(require_manifest(data, "docs", "queries"))
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, doc_ids: np.ndarray) -> list[str]:
        from pipelines.artifacts.parquet import read_table

        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        owner = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty(len(ids), dtype=object)
        for p in np.unique(owner).tolist():
            if p not in self._cache:
                column = read_table(self.data, f"docs/{self.parts[p]}", columns=["source"]).column("source")
                self._cache[p] = np.asarray(column.to_pylist(), dtype=object)
            sel = owner == p
            out[sel] = self._cache[p][ids[sel] - self.offsets[p]]
        return out.tolist()
