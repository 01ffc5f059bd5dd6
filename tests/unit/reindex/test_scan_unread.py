"""The re-index scan never retires a document because its input could not be read: a transient fault is
retried, a file or folder it cannot read keeps the live documents it held, and storage that keeps failing
stops the scan before anything is tombstoned. Runs in this process (a small corpus is scanned without Ray)."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest

from pipelines.artifacts.manifest import write_manifest
from pipelines.artifacts.parquet import write_table
from pipelines.artifacts.storage import RetriesExhausted, open_location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.reindex.scan import scan_corpus
from pipelines.stages.tokenize import DOCS_SCHEMA, TokenizeSettings
from tests.helpers_flaky import Fault, flaky_url

SETTINGS = TokenizeSettings(64, 256, "text", "packaged:all-MiniLM-L6-v2", 0, 64.0)
LINES = ["first line", "second line", "third line"]


@pytest.fixture
def build(tmp_path):
    """A corpus (a jsonl of three lines, a text file, a folder with one) and a build whose docs/ holds them."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES))
    (corpus / "b.txt").write_text("bee")
    (corpus / "sub" / "c.txt").write_text("sea")
    docs = {f"{flaky_url(corpus / 'a.jsonl')}#line={i + 1}": t for i, t in enumerate(LINES)}
    docs |= {flaky_url(corpus / "b.txt"): "bee", flaky_url(corpus / "sub" / "c.txt"): "sea"}
    out = open_location(str(tmp_path / "build"))
    table = pa.table({"doc_id": range(5), "source": list(docs), "first_chunk_id": range(5), "num_chunks": [1] * 5,
                      "sha256": [hashlib.sha256(t.encode()).hexdigest() for t in docs.values()]}).select(DOCS_SCHEMA.names)
    entry = write_table(out, "docs/part-00000.parquet", table.cast(DOCS_SCHEMA))
    write_manifest(out, "docs", stage="tokenize", parts=[entry | {"path": "part-00000.parquet"}], totals={}, config={})
    return corpus, out


def scan(corpus, out):
    return scan_corpus(out, [flaky_url(corpus)], SETTINGS, Tombstones.empty())


def test_a_transient_fault_changes_nothing(build, flaky):
    corpus, out = build
    flaky.reads[str(corpus / "a.jsonl")] = Fault(at=1, times=2)
    delta = scan(corpus, out)
    assert delta.empty and delta.unchanged == 5 and flaky.reads[str(corpus / "a.jsonl")].calls >= 3


def test_what_cannot_be_read_keeps_its_documents(build, flaky):
    corpus, out = build
    flaky.reads[str(corpus / "a.jsonl")] = Fault(times=-1, error=PermissionError)
    flaky.listings[str(corpus / "sub")] = Fault(times=-1, error=PermissionError)
    delta = scan(corpus, out)
    assert delta.removed == 0 and delta.quarantined == 0 and delta.changed == 0
    assert sorted(delta.not_read) == [flaky_url(corpus / "a.jsonl"), flaky_url(corpus / "sub")]
    assert delta.kept_unread == 4 and delta.unchanged == 1


def test_storage_that_keeps_failing_stops_the_scan(build, flaky):
    corpus, out = build
    flaky.reads[str(corpus / "a.jsonl")] = Fault(at=2, times=-1)
    with pytest.raises(RetriesExhausted, match=f"cannot read {flaky_url(corpus / 'a.jsonl')}"):
        scan(corpus, out)
