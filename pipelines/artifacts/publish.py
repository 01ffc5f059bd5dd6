"""The one way ``LATEST`` changes: :func:`publish`, under the ``--out`` lock (docs/design.md, "Publishing").

The build's neighbors stage and the re-index job both publish here, so both get the same guards:
the caller holds the lock (checked again immediately before the write); a re-index names the
versions it started from, and nothing is published if ``LATEST`` moved since; a build's versions
cover every chunk and no tombstones, so they are refused once a re-index has touched the build;
and ``LATEST`` never names an older index or neighbors version than it does.
"""
from __future__ import annotations

import json
import time

from pipelines.artifacts.lock import NotCommitted, OutLock
from pipelines.artifacts.manifest import MANIFEST_NAME
from pipelines.artifacts.storage import Location, exists, read_bytes, write_bytes_atomic
from pipelines.artifacts.tombstones import FOLDER as TOMBSTONES
from pipelines.artifacts.versions import LATEST, version_number


class StaleBase(NotCommitted):
    """LATEST moved since this run started, or would move backwards: publishing would undo other work."""


class ReindexedBuild(ValueError):
    """A build stage was asked to index or publish a build that a re-index has changed."""


def reindexed(out: Location) -> bool:
    """Whether a re-index has appended to this build (it always writes ``tombstones/``, even empty)."""
    return exists(out, f"{TOMBSTONES}/{MANIFEST_NAME}")


def refuse_reindexed(out: Location, what: str) -> None:
    """Stop ``what`` on a re-indexed build: it would index tombstoned chunks and drop what the re-index published."""
    if reindexed(out):
        raise ReindexedBuild(f"{out.url} has been updated by jobs.reindex (tombstones/ exists): {what} would index "
                             "tombstoned chunks; run `python -m jobs.reindex --corpus ... --out ...` (with --full to "
                             "rebuild the index), or build into a new --out")


def _pair(record: dict) -> tuple[str, str]:
    return record["index"], record["neighbors"]


def _published(out: Location) -> dict | None:
    return json.loads(read_bytes(out, LATEST)) if exists(out, LATEST) else None


def latest_record(*, index_version: str, neighbors_version: str, index_manifest: dict, k: int) -> dict:
    return {
        "format": 1,
        "index": index_version,
        "neighbors": neighbors_version,
        "index_key": index_manifest["index_key"],
        "metric": index_manifest["metric"],
        "chunks": index_manifest["totals"]["chunks"],
        "k": k,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_base(out: Location, current: dict | None, base: dict | None) -> None:
    """A re-index (``base``) must find LATEST where it started; a build (no base) must find no re-index."""
    if base is None:
        refuse_reindexed(out, "publishing the build's versions")
        return
    if current is None or _pair(current) != _pair(base):
        now = "nothing" if current is None else f"index {current['index']} / neighbors {current['neighbors']}"
        raise StaleBase(f"LATEST names {now}, but this run started from {base['index']} / {base['neighbors']}: "
                        "not publishing (rerun to index the new state)")


def _check_forward(current: dict | None, index_version: str, neighbors_version: str) -> None:
    if current is None:
        return
    older = [kind for kind, v in (("index", index_version), ("neighbors", neighbors_version))
             if version_number(v) < version_number(current[kind])]
    if older:
        raise StaleBase(f"index {index_version} / neighbors {neighbors_version} is older than the published index "
                        f"{current['index']} / neighbors {current['neighbors']}: LATEST never moves backwards")


def publish(out: Location, lock: OutLock, *, index_version: str, neighbors_version: str, index_manifest: dict, k: int,
            base: dict | None = None, extra: dict | None = None) -> dict | None:
    """Point LATEST at the given versions (written last, atomically); returns the record written, or
    None when LATEST already names them. ``base``: the LATEST a re-index started from (None: a build).

    Raises:
        LockLost: ``lock`` is no longer this run's.
        StaleBase: LATEST moved since ``base``, or the versions are older than the published ones.
        ReindexedBuild: a build's versions, on a re-indexed build.
    """
    current = _published(out)
    _check_base(out, current, base)
    if current is not None and _pair(current) == (index_version, neighbors_version):
        return None
    _check_forward(current, index_version, neighbors_version)
    record = latest_record(index_version=index_version, neighbors_version=neighbors_version,
                           index_manifest=index_manifest, k=k) | (extra or {})
    lock.verify()
    write_bytes_atomic(out, LATEST, json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def publish_build(out: Location, *, index_version: str, neighbors_version: str, index_manifest: dict, k: int) -> bool:
    """The build's publish: the same guards, under the lock for just this step; False when already published."""
    with OutLock(out).held() as lock:
        return publish(out, lock, index_version=index_version, neighbors_version=neighbors_version,
                       index_manifest=index_manifest, k=k) is not None
