"""`python -m jobs.query` on the session's small published build: a text finds the chunk it came from, a chunk id
shows exactly the stored neighbors, tombstoned chunks never appear, bad input is one error line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts.manifest import write_manifest
from pipelines.artifacts.storage import open_location
from pipelines.artifacts.tombstones import tombstones_table, write_tombstones_part
from pipelines.artifacts.versions import NeighborsReader
from pipelines.text.tokenizer import load_tokenizer
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")


def query(capsys, *args: str) -> tuple[int, list[str], str]:
    from jobs.query import main

    code, out, err = call_main(main, capsys, *args)
    return code, [line for line in out.splitlines() if line.strip()], err


def hits(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def chunks(published_build):
    t = pq.read_table(str(published_build / "build" / "chunks")).sort_by("chunk_id")
    docs = pq.read_table(str(published_build / "build" / "docs")).sort_by("doc_id")
    return (np.asarray(t.column("tokens").to_pylist()), t.column("doc_id").to_numpy(),
            docs.column("first_chunk_id").to_numpy(), docs.column("source").to_pylist())


def decode(tokens) -> str:
    return load_tokenizer().tokenizer.decode([int(t) for t in tokens if t], skip_special_tokens=True)


def test_a_chunks_own_text_finds_it_first(published_build, chunks, capsys):
    tokens, doc, first, sources = chunks
    target = int(first[3])  # a document's first chunk: [CLS] + its opening, as a text query is embedded
    text = decode(tokens[target, :16])
    code, lines, _ = query(capsys, "--data", str(published_build / "build"), "--text", text, "--k", "4", "--json")
    assert code == 0
    got = hits(lines)
    assert [h["rank"] for h in got] == [1, 2, 3, 4]
    assert got[0]["text"] == text and got[0]["distance"] < 1e-3  # itself (or a copy of it in the other edition)
    assert got[0]["source"] == sources[got[0]["doc_id"]] and doc[got[0]["chunk_id"]] == got[0]["doc_id"]
    assert all(a["distance"] <= b["distance"] for a, b in zip(got, got[1:]))  # best first
    code, table, _ = query(capsys, "--data", str(published_build / "build"), "--text", text, "--k", "2")
    assert code == 0 and table[0].startswith("#1  chunk ") and table[1].strip() == text  # the table form


def test_chunk_id_shows_the_stored_neighbors(published_build, chunks, capsys):
    tokens, doc, _, sources = chunks
    code, lines, _ = query(capsys, "--data", str(published_build / "build"), "--chunk-id", "7", "--json")
    assert code == 0
    got = hits(lines)
    nb, dist = NeighborsReader(str(published_build / "build")).lookup([7])
    assert got[0]["rank"] == 0 and got[0]["chunk_id"] == 7 and got[0]["text"] == decode(tokens[7, :16])
    assert [h["chunk_id"] for h in got[1:]] == [int(i) for i in nb[0] if i >= 0]
    assert [h["distance"] for h in got[1:]] == pytest.approx([float(x) for x, i in zip(dist[0], nb[0]) if i >= 0])
    assert all(h["source"] == sources[doc[h["chunk_id"]]] for h in got)


def test_tombstoned_chunks_never_appear(published_build, chunks, tmp_path, capsys):
    tokens, doc, first, sources = chunks
    out = tmp_path / "b"
    shutil.copytree(published_build / "build", out)
    target = int(first[3])
    text = decode(tokens[target, :16])
    dead = {int(h["doc_id"]) for h in hits(query(capsys, "--data", str(out), "--text", text, "--k", "1", "--json")[1])}
    loc = open_location(str(out))
    rows = [(d, int(first[d]), int((doc == d).sum()), sources[d], "removed") for d in sorted(dead)]
    entry = write_tombstones_part(loc, 0, tombstones_table(*zip(*rows)))
    write_manifest(loc, "tombstones", stage="reindex", parts=[entry], totals={"documents": len(rows)}, config={})
    code, lines, _ = query(capsys, "--data", str(out), "--text", text, "--k", "5", "--json")
    got = hits(lines)
    assert code == 0 and len(got) == 5 and not {h["doc_id"] for h in got} & dead
    code, _, err = query(capsys, "--data", str(out), "--chunk-id", str(target))
    assert code == 2 and "removed by a re-index" in err


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nothing", "--text", "x"], "chunks/_manifest.json"),
    (["--data", "{build}", "--chunk-id", "999999"], "is not in this build"),
    (["--data", "{build}", "--text", "x", "--chunk-id", "3"], "exactly one of --text and --chunk-id"),
    (["--data", "{build}", "--text", "x", "--k", "0"], "--k must be positive"),
])
def test_bad_input_is_one_error_line(published_build, tmp_path, capsys, args, message):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{build}", str(published_build / "build")) for a in args]
    code, _, err = query(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and message in lines[-1] and len(lines) <= 2 and "Traceback" not in err, err


def test_unpublished_build_is_one_error_line(published_build, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(published_build / "build", out)
    (out / "LATEST").unlink()
    code, _, err = query(capsys, "--data", str(out), "--text", "x")
    assert code == 2 and "no index has been published yet" in err


def test_a_lossy_index_is_re_ranked_exactly(published_build, chunks, tmp_path):
    """With a compressed key forced, the hits' distances are the exact ones from the stored embeddings
    (not PQ estimates), in order, and a chunk's own text still finds it first."""
    from pipelines.artifacts.embeddings import gather_rows, load_embeddings_info
    from pipelines.inference.query import BuildSearcher
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors

    shutil.copytree(published_build / "build", tmp_path / "build")
    out = open_location(str(tmp_path / "build"))
    s = run_index(out=out, index_key="IVF4,PQ8", concurrency=2)
    run_neighbors(out=out, index_version=s.version, concurrency=2)
    assert s.rerank > 0
    tokens, _, first, _ = chunks
    target = int(first[2])
    searcher = BuildSearcher(str(tmp_path / "build"))
    got = searcher.search_text(decode(tokens[target, :16]), 5)
    ids = np.asarray([h.chunk_id for h in got])
    x = gather_rows(out, load_embeddings_info(out), np.sort(ids))[np.argsort(np.argsort(ids))]
    assert got[0].distance < 1e-3 and (ids[0] == target or got[0].text == got[1].text)  # itself, or its twin
    dist = np.asarray([h.distance for h in got])
    assert (np.diff(dist) >= 0).all()
    exact = ((x - x[0]) ** 2).sum(1)  # the first hit is the query's own chunk (distance ~0)
    np.testing.assert_allclose(dist, exact, rtol=1e-2, atol=1e-3)
