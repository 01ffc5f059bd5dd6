"""One writer per ``--out`` commits at a time: a lock object created exclusively, with owner and expiry.

The re-index job holds it for its whole run; the build's neighbors stage holds it while it publishes
(:mod:`pipelines.artifacts.publish`, the one way ``LATEST`` changes).

- local folder: ``os.open(O_CREAT | O_EXCL)``, atomic on POSIX filesystems;
- object storage: a conditional create (``If-None-Match: *``, fsspec's ``"xb"`` mode: S3, and any
  filesystem whose fsspec driver implements it); elsewhere a write then a read-back (weaker).

The lock records owner (a random token), host, pid and an expiry; a heartbeat thread extends the
expiry while the run lives. A lock whose expiry has passed, or whose owner process is gone from
this host (a killed run), is broken by the next run. Immediately before every commit the owner
checks that the lock is still its own (:meth:`OutLock.verify`), and publishing also checks that
``LATEST`` still names the versions the run started from (:mod:`pipelines.artifacts.publish`), so a
run that lost its lock, or started from an old state, cannot publish or move ``LATEST`` backwards.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.artifacts.storage import Location, exists, read_bytes, write_bytes_atomic

LOCK = "reindex/_lock.json"


class NotCommitted(RuntimeError):
    """A commit was refused (the lock, or the state it would build on): nothing was written."""


class LockHeld(NotCommitted):
    """Another live run holds the lock."""

    def __init__(self, holder: dict | None):
        self.holder = holder or {}
        left = self.holder.get("expires_at", 0) - time.time()
        super().__init__(f"another run holds the lock of this --out (pid {self.holder.get('pid')} on "
                         f"{self.holder.get('host')}, since {self.holder.get('acquired', '?')}, expires in {left:.0f} s)")


class LockLost(NotCommitted):
    """This run's lock expired and was taken over: it must not commit anything more."""


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class OutLock:
    def __init__(self, out: Location, ttl_s: float = 600.0):
        self.out, self.ttl = out, float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.acquired = ""
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ record
    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "acquired": self.acquired,
                           "expires_at": time.time() + self.ttl}).encode()

    def read(self, rel: str = LOCK) -> dict | None:
        try:
            return json.loads(read_bytes(self.out, rel))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict) -> bool:
        if float(holder.get("expires_at", 0)) < time.time():
            return True
        return holder.get("host") == self.host and not _pid_alive(int(holder.get("pid", -1)))

    # ------------------------------------------------------------------ create / break
    def _create(self) -> bool:
        data = self._record()
        path = self.out.path(LOCK)
        if self.out.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            with self.out.fs.open(path, "xb") as f:  # If-None-Match: * on S3
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):  # no conditional create: write, then read back
            if exists(self.out, LOCK):
                return False
            write_bytes_atomic(self.out, LOCK, data)
            time.sleep(1.0)
            return (self.read() or {}).get("owner") == self.owner

    def _break(self, holder: dict) -> None:
        """Remove a stale lock, unless someone replaced it meanwhile."""
        path = self.out.path(LOCK)
        if not self.out.is_local:
            if (self.read() or {}).get("owner") == holder.get("owner"):
                self.out.fs.rm(path)
            return
        aside = f"{path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = self.read(os.path.relpath(aside, self.out.root))
        if (moved or {}).get("owner") != holder.get("owner"):
            try:
                os.link(aside, path)  # it was a fresh lock: put it back (fails if one was created meanwhile)
            except FileExistsError:
                pass
        os.remove(aside)

    # ------------------------------------------------------------------ public
    def acquire(self) -> None:
        self.acquired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="out-lock", daemon=True)
                self._thread.start()
                return
            holder = self.read()
            if holder is None:
                continue  # released meanwhile
            if not self._stale(holder):
                raise LockHeld(holder)
            print(f"lock: breaking a stale lock (pid {holder.get('pid')} on {holder.get('host')}, "
                  f"acquired {holder.get('acquired')})", flush=True)
            self._break(holder)
        raise LockHeld(self.read())

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 3)):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - a failed refresh is retried; verify() decides
                print(f"lock: refresh failed: {e}", flush=True)

    def refresh(self) -> None:
        if (self.read() or {}).get("owner") != self.owner:
            self.lost = True
            return
        write_bytes_atomic(self.out, LOCK, self._record())

    def verify(self) -> None:
        holder = self.read() or {}
        if self.lost or holder.get("owner") != self.owner:
            self.lost = True
            raise LockLost(f"this run's lock on {self.out.url} was taken over (now held by pid {holder.get('pid')} "
                           f"on {holder.get('host')}); stopping before the next commit")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self.lost and (self.read() or {}).get("owner") == self.owner:
            self.out.fs.rm(self.out.path(LOCK))

    @contextmanager
    def held(self) -> Iterator[OutLock]:
        """Acquire for the ``with`` block, release after it (also when it raises)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()
