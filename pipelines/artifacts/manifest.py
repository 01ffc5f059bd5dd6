"""Stage manifests: the commit record of a stage (artifact contract, ``<stage>/_manifest.json``).

A manifest is written last, after every part it lists has been committed. It records each part's
row count and sha256, the stage totals, the config that produced it and the code version, so a
rerun can decide "done" by validating parts instead of trusting that files exist.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable

from pipelines.artifacts.storage import Location, exists, read_bytes, sha256_bytes, size, write_bytes_atomic
from pipelines.runtime.redact import redact_record

MANIFEST_NAME = "_manifest.json"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """Package version plus a hash of the pipeline and model sources (works without .git)."""
    h = hashlib.sha256()
    for sub in ("pipelines", "models"):
        for p in sorted((_SOURCE_ROOT / sub).glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return f"0.1.0+src.{h.hexdigest()[:12]}"


def part_name(index: int, suffix: str = ".parquet") -> str:
    return f"part-{index:05d}{suffix}"


def write_manifest(
    loc: Location,
    folder: str,
    *,
    stage: str,
    parts: list[dict],
    totals: dict[str, Any],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict:
    manifest = redact_record({  # URLs in a config or a part entry are recorded without user info or signatures
        "stage": stage,
        "folder": folder,
        "parts": parts,
        "totals": totals,
        "config": config,
        "code_version": code_version(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    })
    write_bytes_atomic(loc, f"{folder}/{MANIFEST_NAME}", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(loc: Location, folder: str) -> dict | None:
    rel = f"{folder}/{MANIFEST_NAME}"
    if not exists(loc, rel):
        return None
    return json.loads(read_bytes(loc, rel))


def part_is_valid(loc: Location, folder: str, entry: dict) -> bool:
    """True when the part exists with the recorded size and sha256."""
    rel = f"{folder}/{entry['path']}"
    try:
        if size(loc, rel) != entry["bytes"]:
            return False
        return sha256_bytes(read_bytes(loc, rel)) == entry["sha256"]
    except FileNotFoundError:
        return False


def invalid_parts(loc: Location, folder: str, entries: Iterable[dict]) -> list[dict]:
    return [e for e in entries if not part_is_valid(loc, folder, e)]


def require_manifest(loc: Location, folder: str, needed_by: str) -> dict:
    """The manifest of an upstream stage, or a clear error saying which stage to run first."""
    m = read_manifest(loc, folder)
    if m is None:
        raise FileNotFoundError(
            f"{needed_by} needs {loc.url_of(folder)}/{MANIFEST_NAME}, which does not exist: "
            f"run the stage that writes {folder}/ first"
        )
    return m
