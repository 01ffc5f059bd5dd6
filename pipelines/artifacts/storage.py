"""Storage access for any fsspec URL (local folder, ``s3://``, ``gs://``, ...).

Every stage reads and writes through these helpers so that the commit rule of the artifact
contract holds everywhere: a part becomes visible under its final name only once it is complete.
On a local filesystem that is a write to a temporary name and an atomic ``os.replace``; on object
storage a single PUT is already atomic, and the stage manifest is what commits the set of parts.
Credentials come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``), never from arguments.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path on it; ``url`` is what the user typed, normalised."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root; refuses anything that escapes it."""
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("..") or posixpath.isabs(rel):
            raise ValueError(f"path {posixpath.join(*parts)!r} escapes {self.url}")
        return self.root if rel == "." else posixpath.join(self.root, rel)

    def url_of(self, *parts: str) -> str:
        """A full URL for ``parts`` (what a user or a manifest would show)."""
        p = self.path(*parts)
        if self.is_local:
            return p
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{p}"

    def child(self, *parts: str) -> "Location":
        return Location(self.fs, self.path(*parts), self.url_of(*parts))


def open_location(url: str) -> Location:
    """Resolve a path or URL to a :class:`Location`; a local path becomes absolute."""
    if "://" not in url or url.startswith("file://"):
        local = url[len("file://"):] if url.startswith("file://") else url
        local = os.path.abspath(os.path.expanduser(local))
        return Location(LocalFileSystem(), local, local)
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    return Location(fs, root, url.rstrip("/"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomic(loc: Location, rel: str, data: bytes) -> None:
    """Write ``data`` to ``rel`` so that no reader ever sees a partial file under that name."""
    final = loc.path(rel)
    if loc.is_local:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        # One PUT is atomic on object storage: the object appears whole or not at all.
        with loc.fs.open(final, "wb") as f:
            f.write(data)


def read_bytes(loc: Location, rel: str) -> bytes:
    with loc.fs.open(loc.path(rel), "rb") as f:
        return f.read()


def exists(loc: Location, rel: str) -> bool:
    return loc.fs.exists(loc.path(rel))


def remove_tree(loc: Location, rel: str) -> None:
    """Remove ``rel`` and everything below it, if present."""
    p = loc.path(rel)
    if loc.fs.exists(p):
        loc.fs.rm(p, recursive=True)


def check_writable(loc: Location) -> None:
    """Fail fast, before any work, when ``--out`` cannot be written."""
    probe = f"_write_probe-{uuid.uuid4().hex}"
    try:
        if loc.is_local:
            os.makedirs(loc.root, exist_ok=True)
        write_bytes_atomic(loc, probe, b"ok")
        loc.fs.rm(loc.path(probe))
    except Exception as e:  # noqa: BLE001 - any failure means "not writable", reported in one line
        raise PermissionError(f"--out {loc.url} is not writable: {type(e).__name__}: {e}") from None


def remove_stale_temporaries(loc: Location, rel_dir: str) -> None:
    """Delete ``*.tmp-*`` leftovers of a killed run (local filesystems only)."""
    if not loc.is_local:
        return
    d = loc.path(rel_dir)
    if not os.path.isdir(d):
        return
    for name in os.listdir(d):
        if ".tmp-" in name:
            try:
                os.remove(os.path.join(d, name))
            except FileNotFoundError:
                pass
