"""A real fsspec filesystem with storage faults injected, registered as ``flaky://``: a local folder whose
reads and listings fail the way object storage does (a reset connection, a timeout, a refused request).

``FlakyFileSystem.opens[path]``, ``.reads[path]`` and ``.listings[path]`` hold a :class:`Fault` for that
path; every open of it (for reading or writing), every ``read()`` of a handle opened on it, every ``ls()``
of the folder counts as a call. Faults live in this process:
use the filesystem where the code under test runs in the test process (the driver, or a unit called
directly), not inside Ray workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

PROTOCOL = "flaky"


@dataclass
class Fault:
    """Calls ``at``, ``at + 1``, ... (``times`` of them; -1 = every one from ``at`` on) raise ``error``."""

    at: int = 1
    times: int = 1
    error: type[Exception] = ConnectionError
    calls: int = 0

    def check(self, what: str) -> None:
        self.calls += 1
        if self.calls >= self.at and (self.times < 0 or self.calls < self.at + self.times):
            raise self.error(f"injected fault: {what}, call {self.calls}")


class _FlakyFile:
    """A file handle whose ``read`` consults a fault first; everything else is the real handle's."""

    def __init__(self, f, fault: Fault, path: str) -> None:
        self._f, self._fault, self._path = f, fault, path

    def read(self, *args):
        self._fault.check(f"read {self._path}")
        return self._f.read(*args)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class FlakyFileSystem(LocalFileSystem):
    protocol = PROTOCOL
    opens: dict[str, Fault] = {}
    reads: dict[str, Fault] = {}
    listings: dict[str, Fault] = {}

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if (opening := self.opens.get(self._strip_protocol(path))) is not None:
            opening.check(f"open {path}")
        f = super()._open(path, mode, **kwargs)
        fault = self.reads.get(self._strip_protocol(path))
        return _FlakyFile(f, fault, path) if fault is not None and "r" in mode else f

    def ls(self, path, detail=False, **kwargs):
        fault = self.listings.get(self._strip_protocol(path))
        if fault is not None:
            fault.check(f"list {path}")
        return super().ls(path, detail=detail, **kwargs)

    @classmethod
    def reset(cls) -> None:
        for faults in (cls.opens, cls.reads, cls.listings):
            faults.clear()


def register() -> None:
    fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)


def flaky_url(path) -> str:
    return f"{PROTOCOL}://{path}"
