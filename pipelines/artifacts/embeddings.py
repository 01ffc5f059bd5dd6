"""Reading the embed stage's output (``embeddings/``) and the document bounds (``docs/``) in pieces.

The index and neighbors stages never load all embeddings at once: they read one part, or a row
range of one part, or a few sampled rows. ``.npy`` parts are read through fsspec with a seek past
the header, so the same code serves a local folder and object storage, and a worker's memory is
bounded by the rows it asked for. Documents are reduced to their first chunk ids (8 bytes each):
chunk ids are dense and a document's chunks contiguous, so that is enough to tell whether two
chunks share a document.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.artifacts.manifest import read_manifest, require_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import Location

EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class EmbeddingPart:
    """One ``embeddings/part-NNNNN.npy``: rows ``[offset, offset + rows)`` in chunk id order."""

    index: int
    path: str  # relative to embeddings/
    ids_path: str
    rows: int
    offset: int
    sha256: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingPart":
        return cls(**d)


@dataclass(frozen=True)
class EmbeddingsInfo:
    parts: tuple[EmbeddingPart, ...]
    n: int
    dim: int
    dtype: str
    fingerprint: str  # changes whenever any part or the shape changes

    def part_of(self, ids: np.ndarray) -> np.ndarray:
        """Index (into ``parts``) of the part holding each chunk id."""
        offsets = np.asarray([p.offset for p in self.parts], dtype=np.int64)
        return np.searchsorted(offsets, ids, side="right") - 1


def load_embeddings_info(out: Location, needed_by: str = "the index stage") -> EmbeddingsInfo:
    """Parts, offsets and a fingerprint from ``embeddings/_manifest.json`` (checked against chunks/)."""
    m = require_manifest(out, EMBEDDINGS, needed_by)
    dim = int(m.get("dim") or m["totals"]["dim"])
    dtype = str(m.get("dtype", "float16"))
    parts, offset = [], 0
    for i, e in enumerate(m["parts"]):
        parts.append(EmbeddingPart(i, e["path"], e.get("ids_path", f"ids/{e['path'].rsplit('.', 1)[0]}.parquet"),
                                   int(e["rows"]), offset, e["sha256"]))
        offset += int(e["rows"])
    n = int(m["totals"].get("chunks", offset))
    if n != offset:
        raise ValueError(f"{out.url_of(EMBEDDINGS)}: manifest totals say {n} chunks but its parts hold {offset} rows")
    chunks = read_manifest(out, "chunks")
    if chunks is not None and int(chunks["totals"]["chunks"]) != n:
        raise ValueError(f"embeddings hold {n} rows but chunks/ has {chunks['totals']['chunks']} chunks: "
                         "rerun the embed stage")
    if n == 0:
        raise ValueError(f"{out.url_of(EMBEDDINGS)} holds no embeddings")
    h = hashlib.sha256(json.dumps({"parts": [[p.path, p.rows, p.sha256] for p in parts], "dim": dim, "dtype": dtype},
                                  sort_keys=True).encode())
    return EmbeddingsInfo(tuple(parts), n, dim, dtype, h.hexdigest())


class NpyPart:
    """Row access to one ``.npy`` file on any fsspec filesystem (header parsed once)."""

    def __init__(self, out: Location, rel: str):
        self.fs, self.path, self.is_local = out.fs, out.path(rel), out.is_local
        with self.fs.open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.header_bytes = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a C-ordered 2-d array, got shape {shape}")
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.dim * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 (faiss' input type)."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.fs.open(self.path, "rb") as f:
            f.seek(self.header_bytes + start * self.row_bytes)
            data = f.read((stop - start) * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.dim).astype(np.float32)

    def blocks(self, block_rows: int):
        """(start, rows) for consecutive blocks: memory bounded by ``block_rows``."""
        for start in range(0, self.rows, block_rows):
            yield start, self.read(start, start + block_rows)

    def take(self, local_rows: np.ndarray, block_rows: int = 65536) -> np.ndarray:
        """Rows at sorted local positions: seeks for a sparse sample, block scans for a dense one."""
        local_rows = np.asarray(local_rows, dtype=np.int64)
        out = np.empty((len(local_rows), self.dim), dtype=np.float32)
        if len(local_rows) == 0:
            return out
        if self.is_local:  # the page cache serves any pattern; only the touched pages are read
            mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.header_bytes,
                               shape=(self.rows, self.dim))
            out[:] = mapped[local_rows]
            return out
        if len(local_rows) * 64 < self.rows:  # sparse: one small read per row
            with self.fs.open(self.path, "rb") as f:
                for j, r in enumerate(local_rows.tolist()):
                    f.seek(self.header_bytes + r * self.row_bytes)
                    out[j] = np.frombuffer(f.read(self.row_bytes), dtype=self.dtype)
            return out
        for start, block in self.blocks(block_rows):
            lo, hi = np.searchsorted(local_rows, [start, start + len(block)])
            out[lo:hi] = block[local_rows[lo:hi] - start]
        return out


def part_rel(part: EmbeddingPart) -> str:
    return f"{EMBEDDINGS}/{part.path}"


def read_part_ids(out: Location, part: EmbeddingPart) -> np.ndarray:
    """The chunk ids of a part, checked to be the dense range the layout promises."""
    ids = read_table(out, f"{EMBEDDINGS}/{part.ids_path}", columns=["chunk_id"]).column(0).to_numpy()
    expected = np.arange(part.offset, part.offset + part.rows, dtype=np.int64)
    if len(ids) != part.rows or not np.array_equal(ids, expected):
        raise ValueError(f"{out.url_of(EMBEDDINGS, part.ids_path)}: chunk ids are not the range "
                         f"[{part.offset}, {part.offset + part.rows}) that the manifest implies")
    return ids


def gather_rows(out: Location, info: EmbeddingsInfo, ids: np.ndarray) -> np.ndarray:
    """Embeddings of sorted chunk ``ids`` (a training or recall sample), read part by part."""
    ids = np.asarray(ids, dtype=np.int64)
    result = np.empty((len(ids), info.dim), dtype=np.float32)
    owner = info.part_of(ids)
    for p in np.unique(owner).tolist():
        sel = np.nonzero(owner == p)[0]
        part = info.parts[p]
        result[sel] = NpyPart(out, part_rel(part)).take(ids[sel] - part.offset)
    return result


def uniform_sample(n: int, size: int, seed: str | int) -> np.ndarray:
    """A sorted uniform sample of ``size`` distinct ids in [0, n), reproducible from ``seed``."""
    key = int(hashlib.sha256(str(seed).encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng(key)
    size = min(size, n)
    if size == n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


class DocBounds:
    """Which chunk ids share a document: the sorted first chunk id of every non-empty document."""

    def __init__(self, first: np.ndarray, n_chunks: int):
        self.first = np.asarray(first, dtype=np.int64)
        self.n_chunks = int(n_chunks)

    @classmethod
    def load(cls, out: Location, n_chunks: int) -> "DocBounds":
        m = require_manifest(out, "docs", "the neighbor filter")
        firsts, counts = [], []
        for e in m["parts"]:
            t = read_table(out, f"docs/{e['path']}", columns=["first_chunk_id", "num_chunks"])
            firsts.append(t.column(0).to_numpy())
            counts.append(t.column(1).to_numpy())
        first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        count = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        keep = count > 0
        first, count = first[keep], count[keep]
        order = np.argsort(first, kind="stable")
        first, count = first[order], count[order]
        if int(count.sum()) != n_chunks or (len(first) and (first[0] != 0 or np.any(first[1:] != (first + count)[:-1]))):
            raise ValueError(f"{out.url_of('docs')}: documents do not tile chunk ids [0, {n_chunks}) contiguously")
        return cls(first, n_chunks)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.first.tobytes() + str(self.n_chunks).encode()).hexdigest()

    def range_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi)``: the chunk id range of each id's document."""
        pos = np.searchsorted(self.first, ids, side="right") - 1
        lo = self.first[pos]
        nxt = np.minimum(pos + 1, len(self.first) - 1)
        hi = np.where(pos + 1 < len(self.first), self.first[nxt], self.n_chunks)
        return lo, hi
