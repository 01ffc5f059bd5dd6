"""Every kind of bad input becomes a quarantine record with its reason; good input becomes text."""
from __future__ import annotations

import gzip
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.text import readers as R
from pipelines.text.corpus import WorkItem, file_format, list_corpus, plan_units


def records(path, fmt=None, start=0, end=None, field="text", limit=1 << 20):
    return list(R.read_item(WorkItem(str(path), fmt or file_format(str(path)), start, end), field, limit))


def test_text_file_kinds(tmp_path):
    (tmp_path / "good.txt").write_text("To be, or not to be")
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbfheading")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "bin.rst").write_bytes(b"abc\x00\x01\x02")
    (tmp_path / "blank.txt").write_text("  \n\t ")
    assert records(tmp_path / "good.txt") == [R.Record(-1, "To be, or not to be")]
    assert records(tmp_path / "bom.md")[0].text == "heading"
    assert records(tmp_path / "latin1.txt")[0].reason == R.INVALID_UTF8
    assert records(tmp_path / "bin.rst")[0].reason == R.BINARY
    assert records(tmp_path / "blank.txt")[0].reason == R.EMPTY


def test_jsonl_lines(tmp_path):
    lines = [json.dumps({"text": "one"}), "{not json", json.dumps({"body": "x"}), json.dumps({"text": 3}),
             "", json.dumps({"text": "  "}), json.dumps(["text"]), json.dumps({"text": "two"})]
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines) + "\n")
    got = records(p)
    assert [r.position for r in got] == list(range(8))
    assert [r.text for r in got if r.text] == ["one", "two"]
    assert [r.reason for r in got if not r.text] == [R.INVALID_JSON, R.MISSING_TEXT_FIELD, R.INVALID_TEXT_FIELD,
                                                     R.EMPTY, R.EMPTY, R.MISSING_TEXT_FIELD]


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"text": f"line {i} " + "x" * (i % 17)}) + "\n" for i in range(300)))
    size = p.stat().st_size
    whole = [r.text for r in records(p)]
    for step in (7, 100, 1000, size):
        parts = []
        for start in range(0, size, step):
            end = start + step if start + step < size else None
            parts += [r.text for r in records(p, "jsonl", start, end)]
        assert parts == whole, step


def test_jsonl_gz_and_truncated_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    payload = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)).encode()
    p.write_bytes(gzip.compress(payload))
    assert [r.text for r in records(p)] == [f"doc {i}" for i in range(50)]
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(gzip.compress(payload)[:-20])
    got = records(bad)
    assert got[-1].reason == R.UNREADABLE and got[-1].position == -1
    assert all(r.text for r in got[:-1])  # what was read before the damage is kept


def test_parquet_rows_nulls_and_missing_column(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta"]}), p)
    got = records(p)
    assert [(r.position, r.text, r.reason) for r in got] == [
        (0, "alpha", ""), (1, None, R.MISSING_TEXT_FIELD), (2, None, R.EMPTY), (3, "beta", "")]
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["alpha"]}), q)
    assert records(q)[0].reason == R.MISSING_TEXT_FIELD


def test_unsupported_and_unreadable(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert records(tmp_path / "image.png")[0].reason == R.UNSUPPORTED_FORMAT
    assert records(tmp_path / "gone.txt")[0].reason == R.UNREADABLE
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert records(tmp_path / "junk.parquet")[0].reason == R.UNREADABLE


def test_listing_is_sorted_skips_hidden_and_plans_split_big_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".hidden.txt").write_text("h")
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": "y" * 50}) + "\n" for _ in range(100)))
    files = list_corpus([str(tmp_path)])
    # sorted by full path: "a.txt" < "b/z.txt" < "big.jsonl"; the hidden file is not read
    assert [f.url.rsplit("/", 1)[-1] for f in files] == ["a.txt", "z.txt", "big.jsonl"]
    units = plan_units(files, target_bytes=1000)
    big = [u for u in units if u.items[0].url.endswith("big.jsonl")]
    assert len(big) > 3 and big[0].items[0].start == 0 and big[-1].items[0].end is None


def test_values_utf8_cannot_carry_are_quarantined_in_every_reader(tmp_path):
    """JSON escapes of lone surrogates, and parquet strings that are not UTF-8, are one bad record each."""
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join([json.dumps({"text": "before"}), '{"text": "\\ud800"}', '{"text": "ok \\udfff tail"}',
                            json.dumps({"text": "after"})]) + "\n")
    got = records(p)
    assert [(r.text, r.reason) for r in got] == [("before", ""), (None, R.INVALID_UNICODE), (None, R.INVALID_UNICODE),
                                                 ("after", "")]
    assert "'\\ud800'" in got[1].detail
    q = tmp_path / "b.parquet"
    values = pa.array([b"first", b"\xed\xa0\x80", b"\xff\xfe", None, b"last"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": values}), q)
    assert [(r.position, r.text, r.reason) for r in records(q)] == [
        (0, "first", ""), (1, None, R.INVALID_UTF8), (2, None, R.INVALID_UTF8), (3, None, R.MISSING_TEXT_FIELD),
        (4, "last", "")]


def test_one_bad_json_line_does_not_cost_the_rest(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("[" * 100_000 + "\n" + json.dumps({"text": "kept"}) + "\n")
    assert [(r.text, r.reason) for r in records(p)] == [(None, R.INVALID_JSON), ("kept", "")]


def test_documents_over_max_doc_bytes_are_quarantined_without_being_held(tmp_path):
    limit = 64 << 10
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (limit + 1))
    assert records(big, limit=limit)[0].reason == R.TOO_LARGE
    p = tmp_path / "a.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps({"text": "small"}).encode() + b"\n")
        f.write(b'{"text": "' + b"y" * (24 << 20) + b'"}\n')
        f.write(json.dumps({"text": "after"}).encode() + b"\n")
    tracemalloc.start()
    try:
        whole = records(p, limit=limit)
        tail = records(p, "jsonl", start=1000, limit=limit)  # a range starting inside the huge line
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.text, r.reason) for r in whole] == [("small", ""), (None, R.TOO_LARGE), ("after", "")]
    assert "exceeds --max-doc-mb" in whole[1].detail and [r.text for r in tail] == ["after"]
    assert peak < 8 << 20  # the 24 MiB line was never held
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["fits", "z" * (limit + 1), "fits too"]}), q)
    assert [(r.text, r.reason) for r in records(q, limit=limit)] == [("fits", ""), (None, R.TOO_LARGE), ("fits too", "")]
