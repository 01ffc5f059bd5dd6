"""Every entry of a corpus is accounted for: what the listing cannot open, descend into or follow becomes a
quarantine record with its reason, a symlink is followed only inside the corpus root, and nothing outside
the corpus (nor the build's own --out) is read."""
from __future__ import annotations

import os

import pytest

from pipelines.artifacts.storage import open_location
from pipelines.text import listing as L
from pipelines.text.corpus import list_corpus, plan_units
from pipelines.text.readers import read_item
from tests.helpers_flaky import Fault, flaky_url


@pytest.fixture
def linked(tmp_path):
    """A corpus with links of every kind, a FIFO, a hidden file, and a secret beside it."""
    root, outside = tmp_path / "corpus", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET outside the corpus")
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (root / ".hidden.txt").write_text("hidden")
    os.symlink(root / "a.txt", root / "link_in.txt")
    os.symlink(root / "sub", root / "link_dir")
    os.symlink(outside / "secret.txt", root / "leak.txt")
    os.symlink(outside, root / "leak_dir")
    os.symlink(root / "missing.txt", root / "broken.txt")
    os.symlink(root, root / "sub" / "loop")
    os.mkfifo(root / "fifo.txt")
    return root


def by_name(root, files) -> dict[str, str]:
    return {f.url.removeprefix(str(root) + "/").removeprefix(flaky_url(root) + "/"): f.reason for f in files}


def read_units(files) -> list:
    return [r for u in plan_units(files, 1 << 20) for item in u.items for r in read_item(item, "text", 1 << 20)]


def test_symlinks_are_followed_only_inside_the_corpus(linked):
    files = list_corpus([str(linked)])
    assert by_name(linked, files) == {
        "a.txt": "", "broken.txt": L.BROKEN_SYMLINK, "fifo.txt": L.NOT_A_FILE, "leak.txt": L.SYMLINK_OUTSIDE,
        "leak_dir": L.SYMLINK_OUTSIDE, "link_dir/b.txt": "", "link_dir/loop": L.SYMLINK_LOOP, "link_in.txt": "",
        "sub/b.txt": "", "sub/loop": L.SYMLINK_LOOP}
    got = read_units(files)
    assert sorted(r.text for r in got if r.text) == ["alpha", "alpha", "beta", "beta"]
    assert sorted(r.reason for r in got if not r.text) == sorted(
        [L.BROKEN_SYMLINK, L.NOT_A_FILE, L.SYMLINK_OUTSIDE, L.SYMLINK_OUTSIDE, L.SYMLINK_LOOP, L.SYMLINK_LOOP])
    assert not any("SECRET" in (r.text or "") + r.detail for r in got)


def test_a_glob_reports_what_it_matches_but_cannot_read(linked):
    files = list_corpus([f"{linked}/*.txt"])
    assert by_name(linked, files) == {"a.txt": "", "broken.txt": L.BROKEN_SYMLINK, "fifo.txt": L.NOT_A_FILE,
                                      "leak.txt": L.SYMLINK_OUTSIDE, "link_in.txt": ""}


def test_a_folder_that_cannot_be_listed_is_a_quarantine_record(tmp_path, flaky):
    root = tmp_path / "corpus"
    (root / "denied").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "denied" / "b.txt").write_text("beta")
    flaky.listings[str(root / "denied")] = Fault(times=-1, error=PermissionError)
    files = list_corpus([flaky_url(root)])
    assert by_name(root, files) == {"a.txt": "", "denied": L.UNLISTABLE}
    assert "PermissionError" in files[1].detail
    assert [(r.text, r.reason) for r in read_units(files)] == [("alpha", ""), (None, L.UNLISTABLE)]


def test_out_inside_the_corpus_is_not_listed_on_any_filesystem(tmp_path, flaky):
    root = tmp_path / "corpus"
    (root / "build" / "docs").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (root / "build" / "docs" / "part-00000.parquet").write_bytes(b"PAR1")
    (root / "build" / "notes.txt").write_text("not corpus")
    for url in (str(root), flaky_url(root)):
        out = open_location(url + "/build")
        assert by_name(root, list_corpus([url], exclude=out)) == {"a.txt": "", "sub/b.txt": ""}, url
        assert by_name(root, list_corpus([url + "/*/*.txt"], exclude=out)) == {"sub/b.txt": ""}, url
