"""Transient storage errors are retried with bounded backoff (reads, listings, writes, manifest commits); one
that outlasts the retries stops the job with one line naming the file, and is never turned into missing
input. Faults come from a real fsspec filesystem, ``flaky://`` (tests/helpers_flaky.py)."""
from __future__ import annotations

import errno
import gzip
import json
import os

import aiohttp
import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import build_index
from pipelines.artifacts.manifest import read_manifest, write_manifest
from pipelines.artifacts.storage import RetriesExhausted, is_transient, open_location, retry
from pipelines.text.corpus import list_corpus, plan_units
from pipelines.text.readers import UNREADABLE, read_item
from tests.helpers_cli import call_main
from tests.helpers_flaky import Fault, flaky_url

NAMES = ["a.jsonl", "b.txt", "c.parquet", "d.jsonl.gz"]


@pytest.fixture
def corpus(tmp_path):
    """One file of each format, each several read buffers long."""
    d = tmp_path / "corpus"
    d.mkdir()
    lines = [json.dumps({"text": f"line {i} {os.urandom(24).hex()}"}) + "\n" for i in range(120)]
    (d / "a.jsonl").write_text("".join(lines))
    (d / "b.txt").write_text(" ".join(f"word{i}" for i in range(1500)))
    pq.write_table(pa.table({"text": [f"row {i} {os.urandom(24).hex()}" for i in range(300)]}), d / "c.parquet",
                   row_group_size=100)
    (d / "d.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    return d


def read_all(url: str) -> list:
    """Every record of every work unit of the corpus at ``url``."""
    units = plan_units(list_corpus([url]), target_bytes=4000)
    return [rec for unit in units for item in unit.items for rec in read_item(item, "text", 1 << 20)]


@pytest.mark.parametrize("error", [ConnectionError, TimeoutError, OSError])
def test_a_read_fault_mid_file_is_retried_and_nothing_is_lost(corpus, flaky, error):
    clean = read_all(str(corpus))
    for name in NAMES:
        flaky.reads[str(corpus / name)] = Fault(at=2, times=2, error=error)  # after the first read
    assert read_all(flaky_url(corpus)) == clean
    assert {p: f.calls >= 4 for p, f in flaky.reads.items()} == {str(corpus / n): True for n in NAMES}  # all fired


def test_a_persistent_read_fault_stops_with_one_line_naming_the_file(corpus, flaky):
    flaky.reads[str(corpus / "a.jsonl")] = Fault(at=3, times=-1)
    with pytest.raises(RetriesExhausted) as e:
        read_all(flaky_url(corpus))
    message = str(e.value)
    assert message.startswith(f"cannot read {flaky_url(corpus / 'a.jsonl')} after 3 attempts")
    assert "ConnectionError: injected fault" in message and "\n" not in message


def test_a_refused_read_is_quarantined_at_once(corpus, flaky):
    """A permission error is final: no retries, the file is a quarantine record (not a failed job)."""
    fault = flaky.reads[str(corpus / "b.txt")] = Fault(times=-1, error=PermissionError)
    records = [r for r in read_all(flaky_url(corpus)) if r.reason]
    assert [r.reason for r in records] == [UNREADABLE] and "PermissionError" in records[0].detail
    assert fault.calls == 1


def test_only_transient_errors_are_retried(flaky):
    transient = [ConnectionError("reset"), TimeoutError(), OSError(errno.EIO, "I/O error"), OSError("connection lost"),
                 botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
                 botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
                 aiohttp.ClientConnectionError("reset"), aiohttp.ClientPayloadError("cut")]
    final = [FileNotFoundError(), PermissionError(), IsADirectoryError(), ValueError("bad"), EOFError(),
             gzip.BadGzipFile("not gzip"), OSError(errno.ENOSPC, "disk full")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in final] == [False] * len(final)

    calls = []

    def fails(errors: list[Exception]):
        def fn():
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "ok"
        return fn

    assert retry(fails([ConnectionError(), TimeoutError()]), "read x") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(RetriesExhausted, match=r"^cannot read x after 3 attempts \(.*\): ConnectionError: c$"):
        retry(fails([ConnectionError("a"), ConnectionError("b"), ConnectionError("c")]), "read x")
    calls.clear()
    with pytest.raises(PermissionError):
        retry(fails([PermissionError()]), "read x")
    assert len(calls) == 1


def test_a_listing_fault_is_retried(corpus, flaky):
    flaky.listings[str(corpus)] = Fault(at=1, times=2)
    assert [f.url for f in list_corpus([flaky_url(corpus)])] == [flaky_url(corpus / n) for n in NAMES]


def test_a_persistent_listing_fault_fails_the_job_in_one_line(corpus, flaky, tmp_path, capsys):
    flaky.listings[str(corpus)] = Fault(times=-1)
    code, _, err = call_main(build_index.main, capsys, "--corpus", flaky_url(corpus), "--out", str(tmp_path / "out"),
                             "--stages", "tokenize")
    assert code == 1
    assert err.startswith(f"error: cannot list {flaky_url(corpus)} after 3 attempts") and err.count("\n") == 1
    assert "rerun the same command" in err


def test_writes_and_manifest_commits_are_retried(tmp_path, flaky):
    (tmp_path / "out" / "docs").mkdir(parents=True)
    out = open_location(flaky_url(tmp_path / "out"))
    manifest = str(tmp_path / "out" / "docs" / "_manifest.json")
    flaky.opens[manifest] = Fault(at=1, times=2)  # the commit fails twice, then succeeds
    write_manifest(out, "docs", stage="tokenize", parts=[], totals={"documents": 0}, config={})
    flaky.opens[manifest] = Fault(at=1, times=2)  # and so does reading it back
    assert read_manifest(out, "docs")["totals"] == {"documents": 0}
    flaky.opens[manifest] = Fault(times=-1)
    with pytest.raises(RetriesExhausted, match=f"^cannot write {flaky_url(manifest)} after 3 attempts"):
        write_manifest(out, "docs", stage="tokenize", parts=[], totals={}, config={})
