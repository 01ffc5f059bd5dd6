"""One guarded way to publish (docs/design.md, "Publishing"), tried on a copy of the session's published build
as a user would run `python -m jobs.build_index`: the neighbors stage publishes under the --out lock and never
moves LATEST backwards; the index and neighbors stages refuse a re-indexed build; the tokenize stage never
rewrites the chunks under a published LATEST."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.artifacts.lock import OutLock
from pipelines.artifacts.manifest import write_manifest
from pipelines.artifacts.publish import ReindexedBuild
from pipelines.artifacts.storage import open_location
from pipelines.stages.build import STAGES
from pipelines.stages.build_config import BuildConfig
from pipelines.stages.index import run_index
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
SETTINGS = {"chunk_size": 16, "seq_len": 64, "unit_mb": 0.004, "concurrency": 2, "k": 2}  # the published build's


@pytest.fixture
def copy(published_build, tmp_path) -> tuple[Path, Path]:
    """(corpus, out): a copy of the published build; the corpus it was made from stays where it is."""
    out = tmp_path / "build"
    shutil.copytree(published_build / "build", out)
    return published_build / "corpus", out


def job(capsys, corpus: Path, out: Path, *args: str, **settings) -> tuple[int, str, str]:
    from jobs.build_index import main

    flags = [a for k, v in (SETTINGS | settings).items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return call_main(main, capsys, "--corpus", str(corpus), "--out", str(out), *flags, *args)


def last_error(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_the_build_publishes_under_the_lock_and_never_backwards(copy, capsys):
    corpus, out = copy
    latest = (out / "LATEST").read_bytes()
    (out / "LATEST").unlink()  # as a build killed between its neighbors manifest and LATEST leaves it
    with OutLock(open_location(str(out))).held():  # another run (a re-index) holds the --out lock
        code, _, err = job(capsys, corpus, out, "--stages", "neighbors")
    assert code == 1 and "holds the lock" in last_error(err) and not (out / "LATEST").exists()

    newer = json.loads(latest) | {"index": "v0009", "neighbors": "v0009"}  # published meanwhile by another run
    (out / "LATEST").write_text(json.dumps(newer))
    code, _, err = job(capsys, corpus, out, "--stages", "neighbors")
    assert code == 1 and "never moves backwards" in last_error(err)
    assert json.loads((out / "LATEST").read_text()) == newer

    (out / "LATEST").unlink()
    code, stdout, err = job(capsys, corpus, out, "--stages", "neighbors")
    assert code == 0, err[-3000:]
    assert "LATEST updated" in stdout and json.loads((out / "LATEST").read_text())["neighbors"] == "v0001"
    assert not (out / "reindex" / "_lock.json").exists()  # released after publishing


def test_index_and_neighbors_refuse_a_reindexed_build(copy, capsys, monkeypatch):
    import pipelines.stages.build as build

    corpus, out = copy
    loc = open_location(str(out))
    write_manifest(loc, "tombstones", stage="reindex", parts=[], totals={"documents": 0, "chunks": 0}, config={})
    with monkeypatch.context() as m:
        m.setattr(build, "init_ray", lambda *_, **__: pytest.fail("Ray was started for a refused build"))
        code, _, err = job(capsys, corpus, out, "--stages", "index,neighbors")
    assert code == 2 and "python -m jobs.reindex" in last_error(err) and len(err.strip().splitlines()) == 1
    with pytest.raises(ReindexedBuild, match="the index stage would index tombstoned chunks"):
        run_index(out=loc, k=2, concurrency=2)
    (out / "LATEST").unlink()
    with pytest.raises(ReindexedBuild):  # the stage itself, not only the job: its publish is refused
        STAGES["neighbors"](BuildConfig(corpus=[str(corpus)], out=str(out), **SETTINGS), loc, [str(corpus)], 2)
    assert not (out / "LATEST").exists()


def test_tokenize_never_rewrites_the_chunks_under_latest(copy, capsys):
    corpus, out = copy
    before = {p.name: p.read_bytes() for p in (out / "chunks").iterdir() if p.is_file()}
    code, _, err = job(capsys, corpus, out, "--stages", "tokenize", chunk_size=32)
    line = last_error(err)
    assert code == 2 and "new --out" in line and "python -m jobs.reindex" in line
    assert {p.name: p.read_bytes() for p in (out / "chunks").iterdir() if p.is_file()} == before
    code, stdout, _ = job(capsys, corpus, out, "--stages", "tokenize")  # the same plan: a no-op
    assert code == 0 and "tokenize: up to date" in stdout
    assert {p.name: p.read_bytes() for p in (out / "chunks").iterdir() if p.is_file()} == before
