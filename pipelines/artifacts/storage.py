"""Storage access for any fsspec URL (local folder, ``s3://``, ``gs://``, ...).

Every stage reads and writes through these helpers so that the commit rule of the artifact
contract holds everywhere: a part becomes visible under its final name only once it is complete.
On a local filesystem that is a write to a temporary name and an atomic ``os.replace``; on object
storage a single PUT is already atomic, and the stage manifest is what commits the set of parts.
Credentials come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``), never from arguments.

Storage fails transiently (a reset connection, a timeout, a throttled request): every read, listing and
write here goes through :func:`retry`, which retries only the errors :func:`is_transient` names, with bounded
exponential backoff, and then raises :class:`RetriesExhausted` naming what could not be done. A reader
never turns such an error into missing input.
"""
from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines.runtime.redact import redact

T = TypeVar("T")

# Object stores list a whole prefix in one paginated call: no folders to be denied, no symlinks.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
READ_BUFFER_BYTES = 1 << 20  # what one read of an input file asks the storage for


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently a transient storage error is retried (about 8 s in all by default)."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based): doubling, capped, with jitter so that many
        workers hitting one outage do not retry in step."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


RETRY = Backoff()


class RetriesExhausted(RuntimeError):
    """A storage operation still failed after :data:`RETRY`'s attempts; the message is one line naming it."""


# Errors that say the request itself is wrong, or the answer is final: retrying cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                        gzip.BadGzipFile, io.UnsupportedOperation)
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                               errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EDQUOT})


@functools.lru_cache(maxsize=1)
def _client_connection_errors() -> tuple[type[BaseException], ...]:
    """The connection and timeout errors of the object-storage clients (botocore, aiohttp), when installed."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        found += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        found += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


def is_transient(e: BaseException) -> bool:
    """True for errors a retry may cure: connection resets and timeouts (builtin, botocore, aiohttp) and other
    I/O errors, but not a missing file, a refused permission, a bad value or bad content."""
    if isinstance(e, (ConnectionError, TimeoutError)) or isinstance(e, _client_connection_errors()):
        return True
    return isinstance(e, OSError) and not isinstance(e, _PERMANENT_OS_ERRORS) and e.errno not in _PERMANENT_ERRNOS


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (an error message is often several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit]


def retry(fn: Callable[[], T], what: str) -> T:
    """``fn()``, retried on transient errors; after the last attempt, :class:`RetriesExhausted` ("cannot
    ``what``: ..."). Other errors pass through at once."""
    start = time.monotonic()
    for attempt in range(1, RETRY.attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == RETRY.attempts:
                raise RetriesExhausted(redact(f"cannot {what} after {attempt} attempts ({time.monotonic() - start:.1f} s): "
                                              f"{one_line(e)}")) from e
            time.sleep(RETRY.delay(attempt))
    raise AssertionError("unreachable")


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(OBJECT_STORES.intersection(protocols(fs)))


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path on it; ``url`` is what the user typed, normalised."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def is_local(self) -> bool:
        """A plain local folder (a LocalFileSystem subclass under another protocol is not: its URLs keep it)."""
        return isinstance(self.fs, LocalFileSystem) and "file" in protocols(self.fs)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root; refuses anything that escapes it."""
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("..") or posixpath.isabs(rel):
            raise ValueError(f"path {posixpath.join(*parts)!r} escapes {self.url}")
        return self.root if rel == "." else posixpath.join(self.root, rel)

    def url_of(self, *parts: str) -> str:
        """A full URL for ``parts`` (what a user or a manifest would show)."""
        return self.url_for_path(self.path(*parts))

    def url_for_path(self, path: str) -> str:
        """The URL of ``path``, a path on this location's filesystem (as its listings give them; over HTTP
        a path is already a URL)."""
        return path if self.is_local or "://" in path else f"{protocols(self.fs)[0]}://{path}"

    def contains(self, url: str) -> bool:
        """True when ``url`` is this location or lies below it."""
        root = self.url_of()
        return url == root or url.startswith(root.rstrip("/") + "/")

    def child(self, *parts: str) -> Location:
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
    retry(functools.partial(_write_once, loc, rel, data), f"write {loc.url_of(rel)}")


def _write_once(loc: Location, rel: str, data: bytes) -> None:
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
    return retry(functools.partial(loc.fs.cat_file, loc.path(rel)), f"read {loc.url_of(rel)}")


class _RetryingReader(io.RawIOBase):
    """A read-only file whose reads survive transient errors: a failed call drops the handle, and the retry
    reopens the file at the offset reached, so nothing is skipped or read twice."""

    def __init__(self, loc: Location) -> None:
        super().__init__()
        self._loc = loc
        self._f = None
        self._pos = self._at = 0  # where the reader is, and where the open handle is
        self._size: int | None = None
        self._call(lambda f: None)  # open now: a missing file fails here, where the caller expects it

    def _handle(self):
        if self._f is None:
            self._f, self._at = self._loc.fs.open(self._loc.root, "rb"), 0
        if self._at != self._pos:
            self._f.seek(self._pos)
            self._at = self._pos
        return self._f

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken handle is being discarded
                pass

    def _call(self, op: Callable):
        def attempt():
            try:
                return op(self._handle())
            except Exception:
                self._drop()
                raise

        return retry(attempt, f"read {self._loc.url}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._call(lambda f: f.read(len(b)))
        b[:len(data)] = data
        self._pos = self._at = self._pos + len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END and self._size is None:
            self._size = retry(functools.partial(self._loc.fs.size, self._loc.root), f"read {self._loc.url}")
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(loc: Location) -> BinaryIO:
    """The file at ``loc`` for reading, buffered, every read retried on transient errors (:func:`retry`)."""
    return io.BufferedReader(_RetryingReader(loc), READ_BUFFER_BYTES)


def size(loc: Location, rel: str) -> int:
    return int(retry(functools.partial(loc.fs.size, loc.path(rel)), f"check {loc.url_of(rel)}"))


def exists(loc: Location, rel: str) -> bool:
    return retry(functools.partial(loc.fs.exists, loc.path(rel)), f"check {loc.url_of(rel)}")


def remove(loc: Location, rel: str) -> None:
    """Remove the file ``rel`` (absent is fine)."""
    try:
        retry(functools.partial(loc.fs.rm, loc.path(rel)), f"remove {loc.url_of(rel)}")
    except FileNotFoundError:
        pass


def list_names(loc: Location, rel: str) -> list[str]:
    """The names directly inside the folder ``rel``; none when it does not exist."""
    p = loc.path(rel)
    if not retry(functools.partial(loc.fs.isdir, p), f"check {loc.url_of(rel)}"):
        return []
    return [q.rstrip("/").rsplit("/", 1)[-1] for q in retry(functools.partial(loc.fs.ls, p, detail=False),
                                                             f"list {loc.url_of(rel)}")]


def remove_tree(loc: Location, rel: str) -> None:
    """Remove ``rel`` and everything below it, if present."""
    p = loc.path(rel)
    if exists(loc, rel):
        retry(functools.partial(loc.fs.rm, p, recursive=True), f"remove {loc.url_of(rel)}")


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
