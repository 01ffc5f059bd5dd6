"""Re-index, step 6, after the LATEST swap (:func:`pipelines.artifacts.publish.publish`, with the
versions the run started from as its base): old versions and ``history.jsonl``.

``--keep N`` keeps the N newest older complete versions of each kind (readers may still be using
them) and removes the rest, after the swap.
"""
from __future__ import annotations

import json
import os
import time

from pipelines.artifacts.storage import Location, exists, read_bytes, remove_tree, write_bytes_atomic
from pipelines.artifacts.versions import complete_versions, list_versions, version_number
from pipelines.runtime.redact import redact_record

HISTORY = "history.jsonl"


def remove_old_versions(out: Location, keep: int, published: dict) -> list[str]:
    """Remove all but the ``keep`` newest complete versions older than the published ones (and
    abandoned unfinished ones older than them); returns what was removed."""
    removed = []
    for kind in ("index", "neighbors"):
        current = version_number(published[kind])
        complete = set(complete_versions(out, kind))
        older = [v for v in list_versions(out, kind) if version_number(v) < current]
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
    line = json.dumps(redact_record(record), sort_keys=True) + "\n"
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


__all__ = ["append_history", "now", "read_history", "remove_old_versions"]
