"""The re-index job on a real local Ray instance with the real encoder: a re-index after adding,
changing and removing documents gives the neighbors of a full rebuild (exact index), ids are never
reused, old parts stay byte-identical, tombstoned chunks are gone from the index and neighbors;
a rerun is a no-op; a killed run leaves LATEST alone and the next run resumes; of two concurrent
runs exactly one publishes. Plus the incremental IVF update (quantizers reused) and the drift
check on a synthetic build, and the lock and publish guards."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts.manifest import read_manifest
from pipelines.artifacts.storage import open_location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.artifacts.versions import NeighborsReader, list_versions, open_index, resolve_latest
from pipelines.reindex.publish import read_history
from pipelines.reindex.run import run_reindex
from pipelines.stages.build import STAGES
from pipelines.stages.build_config import BuildConfig
from tests.conftest import ROOT
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
K = 3


def build(corpus: Path, out: Path) -> None:
    """Every stage of jobs.build_index, in this process (exact index)."""
    cfg = BuildConfig(corpus=[str(corpus)], out=str(out), seq_len=256, index_key="Flat", k=K, concurrency=2,
                      embed_batch_size=64)
    loc = open_location(str(out))
    for name in ("tokenize", "embed", "index", "neighbors"):
        STAGES[name](cfg, loc, [str(corpus)], 2)


def write_corpus(d: Path, docs: dict[str, str]) -> Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, text in docs.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def texts(plays) -> dict[str, str]:
    t = {p.name: p.read_text() for p in plays}

    def cut(name: str, n: int) -> str:
        return t.get(name, next(iter(t.values())))[3000:3000 + n]

    v1 = {"a_hamlet.txt": cut("hamlet_gut.txt", 7000), "b_macbeth.txt": cut("macbeth_gut.txt", 7000),
          "c_macbeth_f.txt": cut("macbeth_gut_f.txt", 7000), "d_tempest.txt": cut("tempest_gut.txt", 7000),
          "e_tempest_f.txt": cut("tempest_gut_f.txt", 4000)}
    v2 = dict(v1)
    del v2["c_macbeth_f.txt"]  # removed: b's chunks lose neighbors
    v2["d_tempest.txt"] = v1["d_tempest.txt"][:3000] + "\nA line that was not there before.\n" + v1["d_tempest.txt"][3000:]
    v2["f_hamlet_f.txt"] = cut("hamlet_gut_f.txt", 7000)  # added: close to a's chunks
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def base(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("reindex")
    corpus = write_corpus(d / "corpus", texts["v1"])
    build(corpus, d / "base")
    write_corpus(corpus, texts["v2"])  # then one document is added, one changed, one removed
    return d


def copy_base(base: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of the published base build, and its corpus (sources name it: it stays where it was)."""
    shutil.copytree(base / "base", dst / "out")
    return base / "corpus", dst / "out"


def reindex(corpus: Path, out: Path, **kw):
    return run_reindex(corpus=[str(corpus)], out=open_location(str(out)), concurrency=2,
                       **({"max_growth": 1.0} | kw))


def _reindex_proc(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    import ray

    return subprocess.Popen([sys.executable, "-m", "jobs.reindex", "--corpus", str(corpus), "--out", str(out),
                             "--max-growth", "1", "--ray-address", ray.get_runtime_context().gcs_address, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reindexed(base, tmp_path_factory):
    """Two concurrent `python -m jobs.reindex` runs on one copy of the base (the second starts while
    the first holds the lock), with LATEST watched throughout."""
    corpus, out = copy_base(base, tmp_path_factory.mktemp("reindexed"))
    first = json.loads(latest_bytes(out))
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                rec = json.loads(latest_bytes(out))
                seen.append((int(rec["index"][1:]), int(rec["neighbors"][1:])))
            except (OSError, ValueError):
                seen.append(None)
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    procs = [_reindex_proc(corpus, out)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "reindex" / "_lock.json").exists() and procs[0].poll() is None:
            time.sleep(0.01)
        procs.append(_reindex_proc(corpus, out))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        stop.set()
        t.join(5)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return corpus, out, {"codes": [p.returncode for p in procs], "outputs": outputs, "seen": seen, "first": first}


@pytest.fixture(scope="module")
def rebuilt(texts, tmp_path_factory):
    d = tmp_path_factory.mktemp("rebuilt")
    corpus = write_corpus(d / "corpus", texts["v2"])
    build(corpus, d / "out")
    return d / "out"


# ----------------------------------------------------------------------------- helpers


def chunk_keys(out: Path) -> dict[int, tuple[str, int]]:
    """Live chunk id -> (document file name, chunk index in the document)."""
    loc = open_location(str(out))
    dead = Tombstones.load(loc).dead_docs()
    keys = {}
    docs = pq.read_table(out / "docs")
    for d, s, f, n in zip(*(docs.column(c).to_pylist() for c in ("doc_id", "source", "first_chunk_id", "num_chunks"))):
        if d not in dead:
            keys.update({f + i: (os.path.basename(s), i) for i in range(n)})
    return keys


def neighbors_by_key(out: Path) -> dict[tuple, tuple[list, np.ndarray]]:
    keys = chunk_keys(out)
    t = pq.read_table(out / "neighbors" / resolve_latest(str(out))["neighbors"])
    ids = t.column("chunk_id").to_numpy()
    nb = np.asarray(t.column("neighbors").to_pylist())
    ds = np.asarray(t.column("distances").to_pylist(), dtype=np.float32)
    return {keys[c]: ([keys.get(j, ("DEAD", j)) if j >= 0 else None for j in row], d)
            for c, row, d in zip(ids.tolist(), nb.tolist(), ds) if c in keys}


def latest_bytes(out: Path) -> bytes:
    return (out / "LATEST").read_bytes()


# ----------------------------------------------------------------------------- tests


def test_reindex_gives_the_neighbors_of_a_full_rebuild(reindexed, rebuilt):
    corpus, out, runs = reindexed
    h = next(h for h in read_history(open_location(str(out))) if h["action"] == "incremental")
    assert h["action"] == "incremental", runs["outputs"][0]
    assert [h[f"documents_{x}"] for x in ("added", "changed", "removed", "unchanged")] == [1, 1, 1, 3]
    n = h["neighbors"]
    # every path ran: new chunks searched, old ones re-searched (lost a neighbor), checked and updated, dead dropped
    assert all(n[f"rows_{x}"] > 0 for x in ("new", "researched", "checked", "updated", "dropped")), n
    mine, full = neighbors_by_key(out), neighbors_by_key(rebuilt)
    assert mine.keys() == full.keys() and len(mine) > 100
    differ = 0
    for key, (nb, dist) in mine.items():
        nb2, dist2 = full[key]
        assert np.allclose(dist, dist2, rtol=1e-3, atol=1e-3), (key, nb, dist, nb2, dist2)
        differ += nb != nb2  # only where equal distances allow another order
    assert differ <= len(mine) * 0.01
    text = runs["outputs"][0]
    for phrase in ("1 added, 1 changed, 1 removed", "new chunks searched", "searched again", "checked against the new",
                   "tombstoned chunks dropped", "LATEST -> index"):
        assert phrase in text, text


def test_ids_are_never_reused_and_old_parts_stay_byte_identical(base, reindexed):
    _, out, _ = reindexed
    old = base / "base"
    for folder in ("docs", "chunks", "seqs", "quarantine", "embeddings"):
        for p in sorted((old / folder).glob("part-*")):
            assert (out / folder / p.name).read_bytes() == p.read_bytes(), p
    old_docs, new_docs = pq.read_table(old / "docs"), pq.read_table(out / "docs")
    old_chunks = read_manifest(open_location(str(old)), "chunks")["totals"]["chunks"]
    appended = new_docs.slice(old_docs.num_rows)
    assert appended.column("doc_id").to_pylist() == list(range(old_docs.num_rows, new_docs.num_rows))
    assert appended.column("first_chunk_id")[0].as_py() == old_chunks
    chunk_ids = pq.read_table(out / "chunks", columns=["chunk_id"]).column(0).to_numpy()
    assert np.array_equal(chunk_ids, np.arange(len(chunk_ids)))  # still dense over all ids ever given
    m = read_manifest(open_location(str(out)), "chunks")
    assert m["reindexed"] and m["totals"]["chunks"] == len(chunk_ids)
    assert m["totals"]["live_chunks"] == len(chunk_ids) - Tombstones.load(open_location(str(out))).chunks


def test_tombstoned_chunks_are_gone_from_index_and_neighbors(reindexed):
    _, out, _ = reindexed
    loc = open_location(str(out))
    tomb = Tombstones.load(loc)
    t = pq.read_table(out / "tombstones")
    assert sorted(t.column("reason").to_pylist()) == ["changed", "removed"]
    assert {os.path.basename(x) for x in t.column("source").to_pylist()} == {"c_macbeth_f.txt", "d_tempest.txt"}
    assert read_manifest(loc, "tombstones")["totals"]["chunks"] == tomb.chunks == sum(t.column("num_chunks").to_pylist())
    dead = tomb.chunk_ids()
    latest = resolve_latest(loc)
    assert latest["live_chunks"] == latest["chunks_total"] - len(dead) and latest["tombstone_parts"] == 1
    index = open_index(loc)
    assert index.ntotal == latest["live_chunks"]
    vecs = np.concatenate([np.load(p) for p in sorted((out / "embeddings").glob("part-*.npy"))]).astype(np.float32)
    _, found = index.search(vecs[dead], 20)  # the dead vectors themselves: none of them comes back
    assert len(dead) > 0 and not np.isin(found, dead).any()
    reader = NeighborsReader(loc)
    nb, ds = reader.lookup(dead)
    assert (nb == -1).all() and np.isinf(ds).all()
    live = np.setdiff1d(np.arange(len(reader)), dead)
    nb, _ = reader.lookup(live)
    assert not np.isin(nb, dead).any() and (nb >= 0).all()
    h = next(h for h in read_history(loc) if h["action"] == "incremental")
    assert h["action"] == "incremental" and h["documents_added"] == 1 and h["documents_changed"] == 1
    assert h["documents_removed"] == 1 and h["seconds"] > 0
    assert h["chunks_added"] == latest["chunks_total"] - read_manifest(loc, "embeddings")["parts"][0]["rows"] > 0
    assert h["version"] == {"index": latest["index"], "neighbors": latest["neighbors"]}


def test_rerun_is_a_no_op_and_every_repeats(reindexed, capsys):
    from jobs.reindex import main

    corpus, out, _ = reindexed
    before = latest_bytes(out)
    versions = list_versions(open_location(str(out)), "index"), list_versions(open_location(str(out)), "neighbors")
    history = len(read_history(open_location(str(out))))
    capsys.readouterr()
    assert main(["--corpus", str(corpus), "--out", str(out), "--every", "1s", "--runs", "2"]) == 0  # this process' Ray
    stdout = capsys.readouterr().out
    assert stdout.count("nothing to do") == 2 and "next run in" in stdout, stdout
    assert latest_bytes(out) == before
    assert (list_versions(open_location(str(out)), "index"), list_versions(open_location(str(out)), "neighbors")) == versions
    lines = read_history(open_location(str(out)))[history:]
    assert [h["action"] for h in lines] == ["no-op", "no-op"] and lines[0]["documents_unchanged"] == 5
    assert not (out / "reindex" / "_lock.json").exists() and not (out / "chunks" / "_staging").exists()


@pytest.mark.slow
def test_killed_reindex_leaves_latest_and_the_next_run_resumes(base, reindexed, tmp_path):
    corpus, out = copy_base(base, tmp_path)
    before = latest_bytes(out)
    chunks_before = read_manifest(open_location(str(out)), "chunks")["totals"]["chunks"]
    proc = _reindex_proc(corpus, out)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # kill once the append is committed
            m = json.loads((out / "chunks" / "_manifest.json").read_text())
            if m["totals"]["chunks"] > chunks_before:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert latest_bytes(out) == before
    assert (out / "reindex" / "_lock.json").exists()  # the dead run's lock: broken by the next run
    s = reindex(corpus, out)
    assert s.delta.empty and s.action == "incremental"  # nothing appended twice; the index work resumed
    m = read_manifest(open_location(str(out)), "chunks")
    assert m["totals"]["chunks"] == read_manifest(open_location(str(reindexed[1])), "chunks")["totals"]["chunks"]
    assert resolve_latest(str(out))["index"] == s.index_version != json.loads(before)["index"]
    assert neighbors_by_key(out) .keys() == neighbors_by_key(reindexed[1]).keys()
    a = NeighborsReader(str(out)).lookup(np.arange(m["totals"]["chunks"]))
    b = NeighborsReader(str(reindexed[1])).lookup(np.arange(m["totals"]["chunks"]))
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])


def test_two_concurrent_runs_exactly_one_publishes(reindexed):
    corpus, out, runs = reindexed
    assert runs["codes"] == [0, 75], runs["outputs"]
    loser = runs["outputs"][1]
    assert "another run holds the lock" in loser and "nothing published" in loser
    seen = runs["seen"]
    assert None not in seen and seen == sorted(seen)  # always readable, never backwards
    first, final = runs["first"], resolve_latest(str(out))
    assert seen[0] == (int(first["index"][1:]), int(first["neighbors"][1:]))
    assert seen[-1] == (int(final["index"][1:]), int(final["neighbors"][1:])) and seen[-1] > seen[0]
    assert len(set(seen)) == 2  # one swap: exactly one run published
    assert sorted(h["action"] for h in read_history(open_location(str(out)))[:2]) == ["incremental", "skipped"]


# ----------------------------------------------------------------------------- lock and publish guards


def test_lock_is_exclusive_and_stale_locks_are_broken(tmp_path):
    from pipelines.artifacts.lock import LOCK, LockHeld, LockLost, OutLock

    out = open_location(str(tmp_path / "o"))
    winners, errors = [], []
    barrier = threading.Barrier(8)

    def contend():
        lock = OutLock(out, ttl_s=60)
        barrier.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except LockHeld as e:
            errors.append(e)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(errors) == 7
    holder = winners[0]
    holder.verify()
    holder.release()
    # a dead owner on this host: broken at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "o" / LOCK).write_text(json.dumps({"owner": "x", "host": holder.host, "pid": dead.pid,
                                                   "expires_at": time.time() + 600}))
    lock = OutLock(out, ttl_s=60)
    lock.acquire()
    # ... but not a live one, until it expires
    other = OutLock(out, ttl_s=60)
    with pytest.raises(LockHeld):
        other.acquire()
    (tmp_path / "o" / LOCK).write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": 1,
                                                   "expires_at": time.time() - 1}))
    with pytest.raises(LockLost):  # taken over: the old owner may not commit
        lock.verify()
    lock.release()  # stops its heartbeat; leaves the other owner's lock alone
    assert (tmp_path / "o" / LOCK).exists()
    other.acquire()
    other.release()
    assert not (tmp_path / "o" / LOCK).exists()


def test_a_run_that_lost_its_lock_commits_nothing(published_build, tmp_path, monkeypatch):
    """The lock is checked again immediately before each commit, not once before the work: taken over while the
    append tokenizes, the run stops before its journal, and no manifest, tombstone or LATEST changes."""
    import pipelines.reindex.append as append
    from pipelines.artifacts.lock import LOCK, LockLost

    out = tmp_path / "build"
    shutil.copytree(published_build / "build", out)
    corpus = write_corpus(tmp_path / "corpus", {"new.txt": "A document this build has never seen before. " * 40})
    committed = {p: p.read_bytes() for p in [out / "LATEST", *out.glob("*/_manifest.json")]}
    plan = append.plan_append_units

    def take_over(*args, **kw):
        (out / LOCK).write_text(json.dumps({"owner": "another run", "host": "elsewhere", "pid": 1,
                                            "expires_at": time.time() + 600}))
        return plan(*args, **kw)

    monkeypatch.setattr(append, "plan_append_units", take_over)
    with pytest.raises(LockLost):
        run_reindex(corpus=[str(corpus)], out=open_location(str(out)), concurrency=2)
    assert {p: p.read_bytes() for p in [out / "LATEST", *out.glob("*/_manifest.json")]} == committed
    assert not (out / "reindex" / "_pending.json").exists() and not (out / "tombstones" / "_manifest.json").exists()
    assert json.loads((out / LOCK).read_text())["owner"] == "another run"  # left to its owner


def test_lock_publish_and_history_on_s3(s3_server):
    """On object storage the lock is a conditional create (If-None-Match: *)."""
    import s3fs

    from pipelines.artifacts.lock import LockHeld, OutLock
    from pipelines.artifacts.publish import publish
    from pipelines.reindex.publish import append_history

    s3fs.S3FileSystem().mkdir("reindex-lock")
    out = open_location("s3://reindex-lock/build")
    a, b = OutLock(out, ttl_s=60), OutLock(out, ttl_s=60)
    a.acquire()
    with pytest.raises(LockHeld):
        b.acquire()
    im = {"index_key": "Flat", "metric": "l2", "totals": {"chunks": 4}}
    publish(out, a, index_version="v0001", neighbors_version="v0001", index_manifest=im, k=2)  # a build's first
    publish(out, a, base={"index": "v0001", "neighbors": "v0001"}, index_version="v0002", neighbors_version="v0002",
            index_manifest=im, k=2, extra={})
    append_history(out, {"action": "incremental"})
    append_history(out, {"action": "no-op"})
    a.release()
    b.acquire()
    b.release()
    assert resolve_latest(out)["index"] == "v0002"
    assert [h["action"] for h in read_history(out)] == ["incremental", "no-op"]


def test_publish_refuses_a_moved_latest_and_going_backwards(tmp_path):
    from pipelines.artifacts.lock import OutLock
    from pipelines.artifacts.publish import StaleBase, publish

    out = open_location(str(tmp_path))
    im = {"index_key": "Flat", "metric": "l2", "totals": {"chunks": 10}}
    lock = OutLock(out)
    lock.acquire()
    try:
        publish(out, lock, index_version="v0003", neighbors_version="v0003", index_manifest=im, k=2)
        with pytest.raises(StaleBase, match="started from v0002"):
            publish(out, lock, base={"index": "v0002", "neighbors": "v0002"}, index_version="v0004",
                    neighbors_version="v0004", index_manifest=im, k=2, extra={})
        with pytest.raises(StaleBase, match="never moves backwards"):
            publish(out, lock, base={"index": "v0003", "neighbors": "v0003"}, index_version="v0002",
                    neighbors_version="v0004", index_manifest=im, k=2, extra={})
        rec = publish(out, lock, base={"index": "v0003", "neighbors": "v0003"}, index_version="v0004",
                      neighbors_version="v0004", index_manifest=im, k=2, extra={"live_chunks": 9})
        assert resolve_latest(out) == rec and rec["index"] == "v0004" and rec["live_chunks"] == 9
    finally:
        lock.release()


def test_cli_help_and_errors(tmp_path, capsys):
    """In this process, as the command line would run them: --help, and one-line errors with exit 2."""
    from jobs.reindex import main
    from pipelines.reindex.config import parse_every

    code, out, _ = call_main(main, capsys, "--help")
    assert code == 0
    for flag in ("--corpus", "--out", "--every", "--keep", "--max-growth", "--min-recall", "--full", "ray job submit"):
        assert flag in out, flag
    code, _, err = call_main(main, capsys, "--corpus", str(tmp_path), "--out", str(tmp_path / "none"))
    assert code == 2 and "no index has been published yet" in err and "Traceback" not in err
    code, _, err = call_main(main, capsys, "--corpus", "x", "--out", "y", "--every", "often")
    assert code == 2 and "--every must look like" in err
    assert parse_every("6h") == 21600 and parse_every("1h30m") == 5400 and parse_every("") == 0


# ----------------------------------------------------------------------------- the index update itself (synthetic build)


def _manifest_with(out, folder: str, parts: list[dict], **totals) -> None:
    from pipelines.reindex.append import _write_manifest_dict

    m = read_manifest(out, folder)
    _write_manifest_dict(out, folder, m | {"parts": parts, "totals": m["totals"] | totals})


def _update(out, **kw):
    from pipelines.artifacts.lock import OutLock
    from pipelines.reindex.run import ReindexSummary, index_and_publish
    from pipelines.reindex.state import base_state

    lock = OutLock(out)
    lock.acquire()
    try:
        s = ReindexSummary(out.url, "now")
        args = dict(index_key="", max_growth=1.0, min_recall=0.5, full=False, keep=1, recall_sample=300,
                    concurrency=2, config={})
        index_and_publish(out, lock, base_state(out), **(args | kw), summary=s)
        return s
    finally:
        lock.release()


def _tombstone(out, docs: list[int], first: np.ndarray, sizes: np.ndarray) -> None:
    from pipelines.artifacts.manifest import write_manifest
    from pipelines.artifacts.tombstones import tombstones_table, write_tombstones_part

    m = read_manifest(out, "tombstones")
    parts = m["parts"] if m else []
    t = tombstones_table(docs, first[docs], sizes[docs], [f"synthetic://doc/{d}" for d in docs], ["removed"] * len(docs))
    parts = parts + [write_tombstones_part(out, len(parts), t)]
    write_manifest(out, "tombstones", stage="reindex", parts=parts, config={},
                   totals={"documents": sum(p["documents"] for p in parts), "chunks": sum(p["chunks"] for p in parts)})


def test_ivf_update_reuses_quantizers_then_drift_rebuilds(tmp_path):
    """An IVF build published over 3 of 4 parts; the 4th part is appended and some documents
    tombstoned, as a re-index's append leaves them. The update keeps the trained centroids, and its
    neighbors match brute force over the live chunks; growth past --max-growth rebuilds and says why."""
    import faiss

    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors
    from tests.helpers_embeddings import brute_force_neighbors, load_embeddings, write_synthetic_build

    b = write_synthetic_build(str(tmp_path / "s"), n_chunks=4000, dim=32, parts=4, mean_doc_chunks=20, seed=5)
    out = b.out
    full = {f: read_manifest(out, f) for f in ("docs", "chunks", "embeddings")}
    n3 = sum(b.part_rows[:3])
    for f in full:
        _manifest_with(out, f, full[f]["parts"][:3], chunks=n3)
    hidden = tmp_path / "hidden.npy"
    os.replace(out.path("embeddings/part-00003.npy"), hidden)  # the build reads every .npy in the folder
    s0 = run_index(out=out, index_key="IVF16,Flat", k=3, extra_neighbors=4, concurrency=2)
    run_neighbors(out=out, index_version=s0.version, k=3, extra_neighbors=4, concurrency=2)
    os.replace(hidden, out.path("embeddings/part-00003.npy"))
    for f in full:  # the "append": part 4 listed again, three old documents tombstoned
        _manifest_with(out, f, full[f]["parts"], chunks=4000)
    _tombstone(out, [0, 7, 30], b.doc_first, b.doc_sizes)

    s = _update(out)
    assert s.action == "incremental" and s.index_version != s0.version, s.lines()
    def centroids(version=None):
        index = open_index(out, version)  # kept alive while its IVF part is read
        return faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16).copy()

    before, after = centroids(s0.version), centroids(s.index_version)
    assert np.array_equal(before, after)  # no retraining
    tomb = Tombstones.load(out)
    dead = tomb.chunk_ids()
    assert open_index(out).ntotal == 4000 - len(dead) and s.index_added == 4000 - n3 and s.index_removed == len(dead)
    n = s.neighbors
    assert n.rows_new == 4000 - n3 and n.rows_dropped == len(dead) and n.rows_checked > 0 and n.rows_researched > 0
    x = load_embeddings(b)
    live = np.setdiff1d(np.arange(4000), dead)
    found, _ = NeighborsReader(out).lookup(live)
    assert not np.isin(found, dead).any()
    xl = x.copy()
    xl[dead] = 1e6  # brute force over the live chunks only
    exact, _ = brute_force_neighbors(xl, b.doc_first, 3, queries=live)
    recall = np.mean([len(set(f) & set(e)) / 3 for f, e in zip(found, exact)])
    assert recall >= 0.9, recall
    assert (NeighborsReader(out).lookup(dead)[0] == -1).all()
    assert list_versions(out, "index") == [s0.version, s.index_version]  # --keep 1

    _tombstone(out, [40], b.doc_first, b.doc_sizes)  # any change: growth since the full build is now 1000/3000
    s2 = _update(out, max_growth=0.2)
    assert s2.action == "full" and "over --max-growth 20%" in s2.reason and "full rebuild" in "\n".join(s2.lines())
    m = read_manifest(out, f"index/{s2.index_version}")["reindex"]
    assert m["full_build"] == s2.index_version and m["added_since_full"] == 0
    assert s2.neighbors.rows_researched == 4000 - len(Tombstones.load(out).chunk_ids())
    assert not np.array_equal(before, centroids())  # trained again
    # distributed like the build's: trained on a sample of the live chunks, one add task per embeddings part,
    # merged into the one file later runs update
    from pipelines.search.faiss_index import train_size

    live_now = 4000 - len(Tombstones.load(out).chunk_ids())
    assert m["distributed"]["add_tasks"] == 4 and m["distributed"]["train_rows"] == train_size(live_now, "IVF16,Flat")
    assert read_manifest(out, f"index/{s2.index_version}")["index_files"] == ["knn.index"]
    assert open_index(out).ntotal == live_now and not out.fs.exists(out.path(f"index/{s2.index_version}/_build"))
