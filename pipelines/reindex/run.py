"""The re-index job: bring a published build up to date with its corpus (``python -m jobs.reindex``).

Steps, each in its own module:
1. :mod:`pipelines.reindex.scan`: hash the corpus, compare with the live documents of ``docs/``;
2. :mod:`pipelines.reindex.append`: tokenize only the new and changed documents into new parts
   (fresh ids), tombstone the removed and replaced ones (:mod:`pipelines.artifacts.tombstones`);
3. :func:`pipelines.stages.embed.run_embed`: embeds only the new chunks parts;
4. :mod:`pipelines.reindex.index`: a new index version from a copy of the published one (its trained
   quantizers reused), or a full rebuild when the drift check says so (:mod:`pipelines.reindex.state`);
5. :mod:`pipelines.reindex.neighbors`: the new neighbors version, recomputing only what can change;
6. :func:`pipelines.artifacts.publish.publish`: the LATEST swap (the build's guards, plus the base this
   run started from); then :mod:`pipelines.reindex.publish`: old versions, ``history.jsonl``.
The run holds the ``--out`` lock (:mod:`pipelines.artifacts.lock`) throughout, and checks that it still
does immediately before every commit: the append journal, each manifest, the swap, the history.
What remains to do is derived from the artifacts each time (what LATEST covers against ``chunks/``
and ``tombstones/``), so a killed run is resumed by the next one, and a run with nothing to do
changes nothing.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import ray

from pipelines.artifacts.embeddings import DocBounds, load_embeddings_info
from pipelines.artifacts.lock import OutLock
from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.publish import publish
from pipelines.artifacts.storage import Location, check_writable
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import find_complete, fingerprint_of, start_version
from pipelines.reindex.append import AppendSummary, append_delta, apply_pending, tokenize_settings
from pipelines.reindex.index import IndexJob, full_rebuild, update_index_task, write_version
from pipelines.reindex.neighbors import NeighborsUpdate, run_reindex_neighbors
from pipelines.reindex.publish import append_history, now, remove_old_versions
from pipelines.reindex.sample import live_recall_sample
from pipelines.reindex.scan import CorpusDelta, scan_corpus
from pipelines.reindex.state import BaseState, base_state, drift_reason, pending_work
from pipelines.search.faiss_index import FLAT_COMPARE_MAX, IndexSettings, check_index_key, choose_index_key, memory_bytes


@dataclass
class ReindexSummary:
    out: str
    started: str
    seconds: float = 0.0
    action: str = "no-op"  # no-op | incremental | full
    reason: str = ""
    delta: CorpusDelta | None = None
    append: AppendSummary = field(default_factory=AppendSummary)
    embedded: int = 0
    index_version: str = ""
    neighbors_version: str = ""
    base: tuple[str, str] = ("", "")
    index_added: int = 0
    index_removed: int = 0
    recall: float | None = None
    neighbors: NeighborsUpdate | None = None
    removed_versions: list = field(default_factory=list)
    resumed_append: bool = False
    lines_extra: list = field(default_factory=list)

    def history(self) -> dict:
        d = self.delta
        n = self.neighbors
        return {
            "time": self.started, "seconds": round(self.seconds, 3), "action": self.action, "reason": self.reason,
            "documents_added": d.added if d else 0, "documents_changed": d.changed if d else 0,
            "documents_removed": (d.removed + d.quarantined) if d else 0,
            "documents_unchanged": d.unchanged if d else 0, "quarantined": self.append.quarantined,
            "chunks_added": self.append.chunks, "chunks_tombstoned": self.append.tombstoned_chunks,
            "version": {"index": self.index_version, "neighbors": self.neighbors_version},
            "base": {"index": self.base[0], "neighbors": self.base[1]},
            "neighbors": {c: getattr(n, c) for c in ("rows_new", "rows_researched", "rows_checked", "rows_updated",
                                                     "rows_dropped")} if n else {},
        }

    def lines(self) -> list[str]:
        d = self.delta
        out = []
        if d is not None:
            out.append(f"reindex: corpus scanned in {d.seconds:.1f} s: {d.documents_seen} documents, {d.added} added, "
                       f"{d.changed} changed, {d.removed} removed, {d.quarantined} now quarantined, "
                       f"{d.unchanged} unchanged; {d.new_bad} new quarantine records")
            if d.not_read:
                out.append(f"reindex: {len(d.not_read)} input(s) could not be read ({', '.join(d.not_read[:3])}"
                           f"{', ...' if len(d.not_read) > 3 else ''}); the {d.kept_unread} live documents they held "
                           "are kept as they were")
        if self.resumed_append:
            out.append("reindex: finished the append of a run that was killed")
        if self.append.parts or self.append.tombstoned_documents:
            out.append(f"reindex: tokenized {self.append.documents} documents into {self.append.chunks} chunks "
                       f"(new parts {', '.join(self.append.parts) or 'none'}); tombstoned "
                       f"{self.append.tombstoned_documents} documents ({self.append.tombstoned_chunks} chunks)")
        if self.action == "no-op":
            out.append(f"reindex: no change since index {self.base[0]} / neighbors {self.base[1]}; nothing to do "
                       f"({self.seconds:.1f} s)")
            return out
        out += self.lines_extra
        how = "incremental (trained quantizers reused)" if self.action == "incremental" else f"full rebuild: {self.reason}"
        recall = "n/a" if self.recall is None else f"{self.recall:.3f}"
        out.append(f"reindex: index {self.index_version} from {self.base[0]}: {how}; {self.index_added} vectors added, "
                   f"{self.index_removed} removed; neighbor recall@k {recall} on a fresh sample")
        n = self.neighbors
        if n:
            out.append(f"reindex: neighbors {n.version}: {n.rows_new} new chunks searched, {n.rows_researched} old chunks "
                       f"searched again (a neighbor was tombstoned{' or full rebuild' if self.action == 'full' else ''}), "
                       f"{n.rows_checked} old chunks checked against the new vectors ({n.rows_updated} updated), "
                       f"{n.rows_dropped} tombstoned chunks dropped; {n.parts_kept} of {n.parts} parts kept from a "
                       f"killed run; {n.seconds:.1f} s")
        out.append(f"reindex: LATEST -> index {self.index_version}, neighbors {self.neighbors_version}"
                   + (f"; removed {', '.join(self.removed_versions)}" if self.removed_versions else "")
                   + f"; {self.seconds:.1f} s in all")
        return out


def _embed_new_parts(out: Location, concurrency: int) -> int:
    """Run the embed stage with the build's own settings (so only the new chunks parts are embedded)."""
    from pipelines.stages.embed import run_embed

    chunks = read_manifest(out, "chunks")
    em = read_manifest(out, "embeddings")
    if em is not None and [p["ids_path"].removeprefix("ids/") for p in em["parts"]] == [p["path"] for p in chunks["parts"]]:
        return 0
    cfg = em.get("config", {}) if em else {}
    cpus = float(cfg.get("cpus_per_worker", 1.0))
    gpus = float(cfg.get("gpus_per_worker", 0.0))
    s = run_embed(out=out, encoder=em["encoder"], pooling=em["pooling"], embedding_dtype=em["dtype"],
                  compute_dtype=em["compute_dtype"], batch_size=int(cfg.get("embed_batch_size", 256)),
                  concurrency=max(1, int(concurrency // cpus)) if gpus == 0 else max(1, concurrency),
                  cpus_per_worker=cpus, gpus_per_worker=gpus,
                  allow_tokenizer_mismatch=bool(cfg.get("allow_tokenizer_mismatch", False)), config=cfg)
    for line in s.lines():
        print(line, flush=True)
    return s.embedded_now


def _index_settings(base: BaseState, index_key: str, recall_sample: int) -> IndexSettings:
    i, im = base.infos, base.index_manifest
    memory = (im.get("settings", {}).get("max_index_memory") or im.get("config", {}).get("max_index_memory")
              or im.get("config", {}).get("settings", {}).get("max_index_memory") or "4G")
    return IndexSettings(index_key, str(memory),
                         float(i.get("max_query_ms", 10.0)), base.metric, base.k, base.extra_neighbors,
                         float(i.get("target_recall", 0.97)), int(recall_sample or i.get("recall_sample", 1000)))


def _full_key(base: BaseState, index_key: str, live_n: int, dim: int, max_memory: str) -> str:
    if index_key:
        return index_key
    if not base.key_auto:
        return base.index_manifest["index_key"]  # the build asked for this one
    if base.index_manifest["index_key"] == "Flat" and live_n <= FLAT_COMPARE_MAX and live_n * dim * 4 <= memory_bytes(max_memory):
        return "Flat"  # the build found exact search cheapest, and it still fits
    return choose_index_key(live_n, dim, max_memory)


def _threads(concurrency: int) -> int:
    return max(1, min(concurrency, max([int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")] or [1])))


def _dead_in(tomb: Tombstones, lo: int, hi: int) -> int:
    """How many tombstoned chunk ids lie in ``[lo, hi)``."""
    a = np.maximum(tomb.first, lo)
    b = np.minimum(tomb.first + tomb.count, hi)
    return int(np.maximum(b - a, 0).sum())


def update_versions(out: Location, lock: OutLock, base: BaseState, *, index_key: str, max_growth: float, min_recall: float,
                    full: bool, recall_sample: int, concurrency: int, config: dict, summary: ReindexSummary) -> None:
    """Steps 3-5: embed new parts, write the new index and neighbors versions (not yet published)."""
    summary.embedded = _embed_new_parts(out, concurrency)
    summary.lines_extra.append(f"reindex: {summary.embedded} chunks embedded")
    info = load_embeddings_info(out, needed_by="the re-index job")
    bounds = DocBounds.load(out, info.n)
    tomb = Tombstones.load(out)
    new_tomb = tomb.since(base.tombstone_parts, out)
    covered = base.chunks_covered
    added_live = (info.n - covered) - _dead_in(tomb, covered, info.n)
    removed = _dead_in(new_tomb, 0, covered)
    settings = _index_settings(base, index_key, recall_sample)
    reason = drift_reason(base, added_live, removed, max_growth, base.index_manifest.get("layout", "single"), full)
    threads = _threads(concurrency)
    dim = int(base.index_manifest["totals"]["dim"])
    common = {"embeddings": info.fingerprint, "docs": bounds.fingerprint, "tombstones": tomb.fingerprint,
              "settings": asdict(settings), "base_index": base.index_version, "min_recall": min_recall}
    sample_fp = fingerprint_of(common)
    t = time.perf_counter()
    sample = live_recall_sample(out, info, bounds, tomb, size=settings.recall_sample, new_from=covered, k=settings.k,
                                metric=settings.metric, seed=sample_fp, concurrency=concurrency)
    summary.lines_extra.append(f"reindex: fresh recall sample of {len(sample.ids)} live chunks, exact neighbors in "
                               f"{time.perf_counter() - t:.1f} s")
    sample_ref = ray.put(sample)

    def build(mode: str, why: str):
        key = base.index_manifest["index_key"] if mode == "incremental" else \
            _full_key(base, index_key, info.n - tomb.chunks, dim, settings.max_index_memory)
        check_index_key(key, dim, settings.metric)
        fp = fingerprint_of(common | {"mode": mode, "key": key})
        job = IndexJob(out.url, "", key, settings.metric, dim, settings, min_recall, threads, tomb.parts,
                       base_folder=f"index/{base.index_version}" if mode == "incremental" else "",
                       base_files=tuple(base.index_manifest["index_files"]),
                       base_param=base.index_manifest.get("index_param", ""),
                       base_tombstone_parts=base.tombstone_parts, chunks_covered=covered, seed=fp)
        done = find_complete(out, "index", fp)
        if done:
            return done, read_manifest(out, f"index/{done}"), None, fp
        version, _ = start_version(out, "index", fp)
        job = IndexJob(**{**job.__dict__, "folder": f"index/{version}"})
        if mode == "incremental":
            print(f"reindex: index/{version}: updating a copy of {base.index_version} with {key} in a task of "
                  f"{threads} CPU(s)", flush=True)
            result = ray.get(update_index_task.options(num_cpus=threads).remote(job, sample_ref))
        else:
            print(f"reindex: index/{version}: full rebuild ({why}) with {key}: sampled training, one add task per "
                  f"embeddings part, merged and tuned in a task of {threads} CPU(s)", flush=True)
            result = full_rebuild(job, sample_ref, concurrency)
        if "drift" in result:
            return version, None, result, fp
        if mode == "incremental":
            lineage = {"full_build": base.full_build, "live_at_full_build": base.live_at_full_build,
                       "added_since_full": base.added_since_full + added_live,
                       "removed_since_full": base.removed_since_full + removed}
        else:
            lineage = {"full_build": version, "live_at_full_build": result["ntotal"], "added_since_full": 0,
                       "removed_since_full": 0}
        reindex = {"mode": mode, "reason": why, "base_index": base.index_version, "base_neighbors": base.neighbors_version,
                   "chunks_covered": info.n, "tombstone_parts": tomb.parts, "tombstones_fingerprint": tomb.fingerprint,
                   "added": result["added"], "removed": result["removed"],
                   "index_key_auto": base.key_auto and not index_key, **lineage,
                   **({"distributed": result["distributed"]} if "distributed" in result else {})}
        if result["ntotal"] != info.n - tomb.chunks:
            raise RuntimeError(f"index/{version} holds {result['ntotal']} vectors, but {info.n - tomb.chunks} chunks "
                               "are live; not publishing it")
        lock.verify()
        m = write_version(out, job, result, sample, fingerprint=fp, embeddings_fp=info.fingerprint,
                          docs_fp=bounds.fingerprint, chunks_total=info.n, k=settings.k,
                          extra_neighbors=settings.extra_neighbors, reindex=reindex, config=config)
        return version, m, result, fp

    mode = "full" if reason else "incremental"
    version, im, result, fp = build(mode, reason)
    if im is None:  # the updated copy missed --min-recall, or the index type cannot be updated: drift
        reason, mode = result["drift"], "full"
        print(f"reindex: full rebuild instead: {reason}", flush=True)
        version, im, result, fp = build(mode, reason)
    r = im["reindex"]
    summary.action, summary.reason = r["mode"], r["reason"]
    summary.index_version, summary.index_added, summary.index_removed = version, r["added"], r["removed"]
    summary.recall = im["neighbor_recall_at_k"]

    nfp = fingerprint_of({"index": fp, "index_version": version, "base_neighbors": base.neighbors_version,
                          "k": settings.k, "extra": settings.extra_neighbors})
    done = find_complete(out, "neighbors", nfp)
    nversion = done or start_version(out, "neighbors", nfp)[0]
    summary.neighbors = run_reindex_neighbors(
        out, version=nversion, index_version=version, base_neighbors=base.neighbors_version, chunks_covered=covered,
        tombstone_parts=tomb.parts, k=settings.k, extra=settings.extra_neighbors, metric=settings.metric,
        full=r["mode"] == "full", fingerprint=nfp, reindex={"mode": r["mode"], "reason": r["reason"]},
        concurrency=concurrency, config=config, lock=lock) if not done else _done_neighbors(out, done)
    summary.neighbors_version = nversion


def _done_neighbors(out: Location, version: str) -> NeighborsUpdate:
    m = read_manifest(out, f"neighbors/{version}")
    r = m.get("reindex", {})
    return NeighborsUpdate(version, m["totals"]["rows"], *(int(r.get(c, 0)) for c in (
        "rows_new", "rows_researched", "rows_checked", "rows_updated", "rows_dropped")), len(m["parts"]),
        len(m["parts"]), m.get("recall_at_k"), 0.0)


def index_and_publish(out: Location, lock: OutLock, base: BaseState, *, index_key: str, max_growth: float,
                      min_recall: float, full: bool, keep: int, recall_sample: int, concurrency: int, config: dict,
                      summary: ReindexSummary) -> None:
    """Steps 3-6 over whatever ``chunks/`` and ``tombstones/`` hold beyond what LATEST covers (nothing
    to do: a no-op). The caller holds ``lock``."""
    tomb = Tombstones.load(out)
    chunks_total = int(read_manifest(out, "chunks")["totals"]["chunks"])
    new_ids, new_tombs = pending_work(base, chunks_total, tomb)
    summary.base = (base.index_version, base.neighbors_version)
    if not (new_ids or new_tombs or full):
        summary.index_version, summary.neighbors_version = summary.base
        return
    concurrency = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    update_versions(out, lock, base, index_key=index_key, max_growth=max_growth, min_recall=min_recall, full=full,
                    recall_sample=recall_sample, concurrency=concurrency, config=config, summary=summary)
    im = read_manifest(out, f"index/{summary.index_version}")
    publish(out, lock, base={"index": base.index_version, "neighbors": base.neighbors_version},
            index_version=summary.index_version, neighbors_version=summary.neighbors_version, index_manifest=im,
            k=base.k, extra={"chunks_total": chunks_total, "live_chunks": chunks_total - tomb.chunks,
                             "tombstone_parts": tomb.parts, "reindex": im["reindex"]["mode"]})
    lock.verify()
    summary.removed_versions = remove_old_versions(out, keep, {"index": summary.index_version,
                                                               "neighbors": summary.neighbors_version})


def run_reindex(*, corpus: list[str], out: Location, text_field: str = "", index_key: str = "", max_growth: float = 0.25,
                min_recall: float = 0.9, full: bool = False, keep: int = 2, lock_ttl: float = 600.0,
                recall_sample: int = 0, concurrency: int = 0, config: dict | None = None) -> ReindexSummary:
    """One run. Raises LockHeld when another run holds the lock (nothing done), StaleBase/LockLost
    when LATEST moved or the lock was lost before publishing (nothing published)."""
    start = time.perf_counter()
    summary = ReindexSummary(out.url, now())
    check_writable(out)
    with OutLock(out, lock_ttl).held() as lock:
        summary.resumed_append = apply_pending(out, lock)
        base = base_state(out)
        summary.base = (base.index_version, base.neighbors_version)
        tomb = Tombstones.load(out)
        settings = tokenize_settings(out, text_field)
        summary.delta = scan_corpus(out, corpus, settings, tomb)
        if not summary.delta.empty:
            summary.append = append_delta(out, lock, summary.delta, settings, tomb,
                                          f"{summary.started}-{uuid.uuid4().hex[:8]}")
        index_and_publish(out, lock, base, index_key=index_key, max_growth=max_growth, min_recall=min_recall,
                          full=full, keep=keep, recall_sample=recall_sample, concurrency=concurrency,
                          config=config or {}, summary=summary)
        summary.seconds = time.perf_counter() - start
        lock.verify()
        append_history(out, summary.history())
        return summary
