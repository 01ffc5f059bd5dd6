"""Re-index: what the published versions cover, and whether to update them or rebuild them.

A version published by the re-index job records, in its index manifest's ``reindex`` entry, the
chunk ids it covers (``[0, chunks_covered)``), how many tombstone parts it applied, and its lineage
since the last full build. A version published by ``jobs.build_index`` covers every chunk and no
tombstones, and is itself a full build. Comparing this with ``chunks/`` and ``tombstones/`` tells
what is left to index, also after a run that was killed after appending parts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import Location, exists, read_bytes
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import resolve_latest

UPDATABLE = "updatable"


@dataclass
class BaseState:
    """The published (LATEST) versions a run starts from."""

    latest: dict
    index_version: str
    neighbors_version: str
    index_manifest: dict
    infos: dict
    chunks_covered: int
    tombstone_parts: int
    full_build: str
    live_at_full_build: int
    added_since_full: int
    removed_since_full: int

    @property
    def k(self) -> int:
        return int(self.latest.get("k") or self.index_manifest["k"])

    @property
    def metric(self) -> str:
        return self.index_manifest["metric"]

    @property
    def key_auto(self) -> bool:
        """Whether the build chose the index key itself (a full rebuild may then choose again for its size)."""
        r = self.index_manifest.get("reindex")
        if r and "index_key_auto" in r:
            return bool(r["index_key_auto"])
        cfg = self.index_manifest.get("config", {})
        return not (cfg.get("index_key") or cfg.get("settings", {}).get("index_key"))

    @property
    def extra_neighbors(self) -> int:
        return int(self.index_manifest.get("extra_neighbors", 10))


def base_state(out: Location) -> BaseState:
    latest = resolve_latest(out)
    iv, nv = latest["index"], latest["neighbors"]
    im = read_manifest(out, f"index/{iv}")
    if im is None or read_manifest(out, f"neighbors/{nv}") is None:
        raise FileNotFoundError(f"LATEST names index {iv} and neighbors {nv}, which are not both complete")
    rel = f"index/{iv}/index_infos.json"
    infos = json.loads(read_bytes(out, rel)) if exists(out, rel) else {}
    r = im.get("reindex")
    if r:
        return BaseState(latest, iv, nv, im, infos, int(r["chunks_covered"]), int(r["tombstone_parts"]),
                         r["full_build"], int(r["live_at_full_build"]), int(r["added_since_full"]),
                         int(r["removed_since_full"]))
    n = int(im["totals"]["chunks"])
    return BaseState(latest, iv, nv, im, infos, n, 0, iv, int(im["totals"]["ntotal"]), 0, 0)


def pending_work(base: BaseState, chunks_total: int, tomb: Tombstones) -> tuple[int, int]:
    """(chunk ids not yet indexed, tombstone parts not yet applied) relative to the published version."""
    return chunks_total - base.chunks_covered, tomb.parts - base.tombstone_parts


def updatable(index) -> str:
    """``UPDATABLE`` when vectors can be added with ids and removed in place (IVF families, flat
    indices, which get an id map); otherwise why not."""
    import faiss

    from pipelines.search.knn import ivf_of

    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return updatable(idx.index)
    if ivf_of(idx) is not None or isinstance(idx, faiss.IndexFlat):
        return UPDATABLE
    return f"{type(idx).__name__} indices cannot remove vectors in place"


def drift_reason(base: BaseState, added_live: int, removed: int, max_growth: float, layout: str,
                 forced: bool) -> str:
    """Why this run must rebuild the index from scratch, or '' to update the published one."""
    if forced:
        return "--full was given"
    if layout != "single":
        return f"the published index has the {layout!r} layout; the re-index job updates single-file indices"
    growth = (base.added_since_full + added_live) / max(1, base.live_at_full_build)
    if growth > max_growth:
        return (f"{base.added_since_full + added_live} chunks added since the last full build ({base.full_build}, "
                f"{base.live_at_full_build} chunks) is {growth:.1%} growth, over --max-growth {max_growth:.0%}")
    shrink = (base.removed_since_full + removed) / max(1, base.live_at_full_build)
    if shrink > max_growth:
        return (f"{base.removed_since_full + removed} chunks removed since the last full build ({base.full_build}) "
                f"is {shrink:.1%} of it, over --max-growth {max_growth:.0%}")
    return ""
