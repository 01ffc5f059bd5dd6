"""Published versions: ``index/vNNNN/``, ``neighbors/vNNNN/`` and the ``LATEST`` pointer (docs/design.md).

A version is complete when its ``_manifest.json`` exists; it is never modified afterwards, so
readers can use any complete version while a new one is being built. ``LATEST`` is replaced last
and atomically, and names only complete versions. Readers (the RETRO training job, the re-index
job) go through :func:`resolve_latest`, :func:`open_index` and :class:`NeighborsReader`; only
:func:`pipelines.artifacts.publish.publish` writes ``LATEST``.

A version folder holds a ``_fingerprint.json`` from the moment it is started: a rerun with the
same inputs and settings resumes that folder instead of starting another one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid

import numpy as np

from pipelines.artifacts.manifest import MANIFEST_NAME, read_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import (Location, exists, list_names, open_input, open_location, read_bytes, remove_tree,
                                         retry, size, write_bytes_atomic)

LATEST = "LATEST"
FINGERPRINT = "_fingerprint.json"
_VERSION = re.compile(r"^v(\d{4,})$")


# ----------------------------------------------------------------------------- versions


def version_number(version: str) -> int:
    """``vNNNN`` -> NNNN: versions are ordered by number, never by name."""
    return int(version[1:])


def list_versions(out: Location, kind: str) -> list[str]:
    """Version folder names under ``kind`` (complete or not), oldest first."""
    return sorted((n for n in list_names(out, kind) if _VERSION.match(n)), key=version_number)


def is_complete(out: Location, kind: str, version: str) -> bool:
    return exists(out, f"{kind}/{version}/{MANIFEST_NAME}")


def complete_versions(out: Location, kind: str) -> list[str]:
    return [v for v in list_versions(out, kind) if is_complete(out, kind, v)]


def version_fingerprint(out: Location, kind: str, version: str) -> str | None:
    m = read_manifest(out, f"{kind}/{version}")
    if m is not None:
        return m.get("fingerprint")
    rel = f"{kind}/{version}/{FINGERPRINT}"
    return json.loads(read_bytes(out, rel))["fingerprint"] if exists(out, rel) else None


def find_complete(out: Location, kind: str, fingerprint: str) -> str | None:
    """The newest complete version built from exactly these inputs and settings."""
    for v in reversed(complete_versions(out, kind)):
        if version_fingerprint(out, kind, v) == fingerprint:
            return v
    return None


def start_version(out: Location, kind: str, fingerprint: str) -> tuple[str, bool]:
    """The folder to build into: an unfinished one with the same fingerprint (resume), else a new
    number. Unfinished folders of other builds are removed (one writer per ``--out``); complete
    versions are never touched."""
    resumed = None
    for v in list_versions(out, kind):
        if is_complete(out, kind, v):
            continue
        if resumed is None and version_fingerprint(out, kind, v) == fingerprint:
            resumed = v
        else:
            remove_tree(out, f"{kind}/{v}")
    if resumed:
        return resumed, True
    versions = list_versions(out, kind)
    new = f"v{(version_number(versions[-1]) + 1) if versions else 1:04d}"
    write_bytes_atomic(out, f"{kind}/{new}/{FINGERPRINT}", json.dumps({"fingerprint": fingerprint}).encode())
    return new, False


def fingerprint_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- files


def file_sha256(out: Location, rel: str, block: int = 16 << 20) -> str:
    """sha256 of a (possibly large) file without holding it in memory."""
    h = hashlib.sha256()
    with open_input(out.child(rel)) as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def file_entry(out: Location, rel: str, name: str, **extra) -> dict:
    return {"path": name, "bytes": size(out, rel), "sha256": file_sha256(out, rel), **extra}


def file_is_valid(out: Location, folder: str, entry: dict) -> bool:
    rel = f"{folder}/{entry['path']}"
    try:
        return size(out, rel) == entry["bytes"] and file_sha256(out, rel) == entry["sha256"]
    except FileNotFoundError:
        return False


def put_file(out: Location, rel: str, local_path: str, *, move: bool = False) -> None:
    """Commit a local file at ``rel``: a rename on a local ``--out``, one upload on object storage."""
    final = out.path(rel)
    if out.is_local:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        if move:
            shutil.move(local_path, tmp)
        else:
            shutil.copyfile(local_path, tmp)
        os.replace(tmp, final)
    else:
        retry(functools.partial(out.fs.put_file, local_path, final), f"write {out.url_of(rel)}")


# ----------------------------------------------------------------------------- LATEST


def resolve_latest(out: Location | str) -> dict:
    """The published record: ``{"index": "vNNNN", "neighbors": "vNNNN", "k": ..., ...}``."""
    out = open_location(out) if isinstance(out, str) else out
    if not exists(out, LATEST):
        raise FileNotFoundError(f"{out.url_of(LATEST)} does not exist: no index has been published yet "
                                "(run the index and neighbors stages)")
    return json.loads(read_bytes(out, LATEST))


# ----------------------------------------------------------------------------- opening an index


def _require_complete(out: Location, kind: str, version: str) -> dict:
    m = read_manifest(out, f"{kind}/{version}")
    if m is None:
        raise FileNotFoundError(f"{out.url_of(kind, version)} is not a complete {kind} version (no manifest)")
    return m


def _local_sha256(path: str, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def _cache_folder(out: Location, folder: str, entries: list[dict], cache_dir: str | None) -> str:
    """Keyed by the folder's URL and the manifest's sha256 of every file: a later build at the same URL
    (other bytes under the same version name) gets another folder, never an earlier build's files."""
    h = hashlib.sha256(out.url_of(folder).encode())
    for e in entries:
        h.update(f"\n{e['path']}\t{e.get('sha256', '')}".encode())
    return os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "retroforge-index-cache"), h.hexdigest()[:32])


def _cached(path: str, entry: dict) -> bool:
    """A cached copy is used only when its bytes have the manifest's sha256 (checked before anything reads it)."""
    return "sha256" in entry and os.path.exists(path) and _local_sha256(path) == entry["sha256"]


def _download(out: Location, folder: str, entry: dict, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
    retry(functools.partial(out.fs.get_file, out.path(f"{folder}/{entry['path']}"), tmp),
          f"read {out.url_of(folder, entry['path'])}")
    if "sha256" in entry and _local_sha256(tmp) != entry["sha256"]:
        os.remove(tmp)
        raise IOError(f"{out.url_of(folder, entry['path'])}: checksum mismatch on download")
    os.replace(tmp, dst)


def fetch_files(out: Location, folder: str, entries: list[dict], cache_dir: str | None = None) -> str:
    """A local folder holding ``entries`` of ``folder``: the folder itself on a local ``--out``, else
    a download into ``cache_dir``, checked against each entry's sha256 (from the manifest). A cached
    copy is reused only when it still has that sha256; an entry without one is always downloaded."""
    if out.is_local:
        return out.path(folder)
    base = _cache_folder(out, folder, entries, cache_dir)
    for e in entries:
        dst = os.path.join(base, e["path"])
        if not _cached(dst, e):
            _download(out, folder, e, dst)
    return base


def read_faiss(path: str, mmap: bool, ondisk: bool = False):
    """Read one faiss file, memory-mapped where the index type allows (IVF lists, flat codes).
    An ``ondisk`` index maps its ``.ivfdata`` by itself (found beside the index file); adding
    IO_FLAG_MMAP to it gives a broken index, so it is read without."""
    import faiss

    if ondisk:
        return faiss.read_index(path, faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
    flags = faiss.IO_FLAG_READ_ONLY
    if mmap:
        for extra in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP_IFC):
            try:
                return faiss.read_index(path, flags | extra)
            except RuntimeError:
                continue
    return faiss.read_index(path, flags)


def load_index_files(folder: str, layout: str, files: list[str], dim: int, index_param: str = "", *, mmap: bool = True):
    """Assemble an index from local files: one file (``single``, ``ondisk``: IVF lists in
    ``knn.ivfdata`` beside it) or ``shards`` searched together with successive ids."""
    import faiss

    if layout == "shards":
        shards = [read_faiss(os.path.join(folder, f), mmap) for f in files]
        index = faiss.IndexShards(dim, False, True)  # the python wrapper keeps the shards alive
        index.metric_type = shards[0].metric_type
        for s in shards:
            index.add_shard(s)
    else:
        index = read_faiss(os.path.join(folder, files[0]), mmap, ondisk=layout == "ondisk")
    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    return index


def open_index(out: Location | str, version: str | None = None, *, mmap: bool = True, cache_dir: str | None = None):
    """The faiss index of ``version`` (default: the one LATEST names) with its tuned search
    parameters applied; memory-mapped where possible, so workers on one node share the pages."""
    out = open_location(out) if isinstance(out, str) else out
    version = version or resolve_latest(out)["index"]
    m = _require_complete(out, "index", version)
    files = set(m["index_files"]) | ({"knn.ivfdata"} if m["layout"] == "ondisk" else set())
    folder = fetch_files(out, f"index/{version}", [e for e in m["parts"] if e["path"] in files], cache_dir)
    return load_index_files(folder, m["layout"], m["index_files"], m["totals"]["dim"], m.get("index_param", ""), mmap=mmap)


def index_infos(out: Location | str, version: str | None = None) -> dict:
    out = open_location(out) if isinstance(out, str) else out
    version = version or resolve_latest(out)["index"]
    _require_complete(out, "index", version)
    return json.loads(read_bytes(out, f"index/{version}/index_infos.json"))


# ----------------------------------------------------------------------------- reading neighbors


class NeighborsReader:
    """Neighbors of any chunk id from a complete neighbors version; parts load lazily, a few at a time."""

    def __init__(self, out: Location | str, version: str | None = None, cache_parts: int = 8):
        self.out = open_location(out) if isinstance(out, str) else out
        self.version = version or resolve_latest(self.out)["neighbors"]
        self.folder = f"neighbors/{self.version}"
        self.manifest = _require_complete(self.out, "neighbors", self.version)
        self.k = int(self.manifest["totals"]["k"])
        self.parts = self.manifest["parts"]
        self._first = np.asarray([p["first_chunk_id"] for p in self.parts], dtype=np.int64)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_parts = cache_parts

    def __len__(self) -> int:
        return int(self.manifest["totals"]["rows"])

    def read_part(self, i: int):
        return read_table(self.out, f"{self.folder}/{self.parts[i]['path']}")

    def _part_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            if len(self._cache) >= self._cache_parts:
                self._cache.pop(next(iter(self._cache)))
            t = self.read_part(i)
            n = t.num_rows
            nb = t.column("neighbors").combine_chunks().flatten().to_numpy().reshape(n, self.k)
            ds = t.column("distances").combine_chunks().flatten().to_numpy().reshape(n, self.k)
            self._cache[i] = (nb, ds)
        return self._cache[i]

    def lookup(self, chunk_ids) -> tuple[np.ndarray, np.ndarray]:
        """(neighbors int64 (n, k) with -1 pads, distances float32 (n, k)) for the given chunk ids."""
        ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"chunk ids must be in [0, {len(self)})")
        nb = np.empty((len(ids), self.k), np.int64)
        ds = np.empty((len(ids), self.k), np.float32)
        owner = np.searchsorted(self._first, ids, side="right") - 1
        for p in np.unique(owner).tolist():
            sel = owner == p
            a, b = self._part_arrays(p)
            local = ids[sel] - self._first[p]
            nb[sel], ds[sel] = a[local], b[local]
        return nb, ds
