"""Re-index, step 6: the LATEST swap, old versions, and ``history.jsonl``.

The swap happens only while this run holds the lock, and only if ``LATEST`` still names the
versions the run started from and the new versions are newer than them: two runs can never both
publish, and ``LATEST`` never moves backwards. ``--keep N`` keeps the N newest older complete
versions of each kind (readers may still be using them) and removes the rest, after the swap.
"""
from __future__ import annotations

import json
import os
import time

from pipelines.artifacts.storage import Location, exists, read_bytes, remove_tree, write_bytes_atomic
from pipelines.artifacts.versions import LATEST, complete_versions, latest_record, list_versions, resolve_latest, write_latest
from pipelines.reindex.lock import ReindexLock

HISTORY = "history.jsonl"


class StaleBase(RuntimeError):
    """LATEST moved since this run started: publishing would undo someone else's work."""


def _number(version: str) -> int:
    return int(version[1:])


def publish(out: Location, lock: ReindexLock, *, base: dict, index_version: str, neighbors_version: str,
            index_manifest: dict, k: int, extra: dict) -> dict:
    """Point LATEST at the new versions; returns the record written."""
    lock.verify()
    current = resolve_latest(out)
    if (current["index"], current["neighbors"]) != (base["index"], base["neighbors"]):
        raise StaleBase(f"LATEST names index {current['index']} / neighbors {current['neighbors']}, but this run started "
                        f"from {base['index']} / {base['neighbors']}: not publishing (rerun to index the new state)")
    if _number(index_version) <= _number(current["index"]) or _number(neighbors_version) <= _number(current["neighbors"]):
        raise StaleBase(f"{index_version}/{neighbors_version} is not newer than the published "
                        f"{current['index']}/{current['neighbors']}: LATEST never moves backwards")
    record = latest_record(index_version=index_version, neighbors_version=neighbors_version,
                           index_manifest=index_manifest, k=k) | extra
    write_latest(out, record)
    return record


def remove_old_versions(out: Location, keep: int, published: dict) -> list[str]:
    """Remove all but the ``keep`` newest complete versions older than the published ones (and
    abandoned unfinished ones older than them); returns what was removed."""
    removed = []
    for kind in ("index", "neighbors"):
        current = _number(published[kind])
        complete = set(complete_versions(out, kind))
        older = [v for v in list_versions(out, kind) if _number(v) < current]
        older_complete = [v for v in older if v in complete]
        keep_set = set(older_complete[-keep:]) if keep > 0 else set()
        for v in older:
            if v not in keep_set:
                remove_tree(out, f"{kind}/{v}")
                removed.append(f"{kind}/{v}")
    return removed


def append_history(out: Location, record: dict) -> None:
    """One JSON line per run. Local: an O_APPEND write (atomic for a line); object storage: a
    rewrite of the (small) file, done while holding the lock."""
    line = json.dumps(record, sort_keys=True) + "\n"
    if out.is_local:
        os.makedirs(out.root, exist_ok=True)
        with open(out.path(HISTORY), "a", encoding="utf-8") as f:
            f.write(line)
        return
    old = read_bytes(out, HISTORY) if exists(out, HISTORY) else b""
    write_bytes_atomic(out, HISTORY, old + line.encode())


def read_history(out: Location) -> list[dict]:
    if not exists(out, HISTORY):
        return []
    return [json.loads(line) for line in read_bytes(out, HISTORY).decode().splitlines() if line.strip()]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["LATEST", "StaleBase", "append_history", "now", "publish", "read_history", "remove_old_versions"]
