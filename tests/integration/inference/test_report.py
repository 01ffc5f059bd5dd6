"""`python -m jobs.report` on the session's small published build: the page holds the build's real figures (checked
against the parquet parts and manifests, not against the report's own reader), names only figures it has, refers
to nothing outside itself, and renders in a real headless Chromium (Debian's package; skipped when absent)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.text.tokenizer import load_tokenizer
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BAR_RGB = (0x2F, 0x6F, 0xAD)  # report_html.BAR


def browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


needs_browser = pytest.mark.skipif(browser() is None, reason="no Chromium binary (chromium, chromium-browser or "
                                   "google-chrome): `make setup` installs Debian's chromium; the report is not rendered")


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, no network reachable from the page's point of view (every host name fails to resolve)."""
    return subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--host-resolver-rules=MAP * ~NOTFOUND", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(published_build, tmp_path_factory) -> Path:
    from jobs.report import main

    out = tmp_path_factory.mktemp("report") / "report.html"
    code = main(["--data", str(published_build / "build"), "--out", str(out), "--examples", "3"])
    assert code == 0 and out.exists()
    return out


def figure_ids(html: str) -> tuple[list[str], list[str]]:
    """(figures the table of contents names, figures the page holds)."""
    toc = re.search(r'<p id="?figures"?>(.*?)</p>', html).group(1)
    return re.findall(r'href="#(fig-[\w-]+)"', toc), re.findall(r'<figure id="(fig-[\w-]+)"><svg', html)


def test_the_page_holds_the_builds_figures(page, published_build):
    html = page.read_text()
    build = published_build / "build"
    named, present = figure_ids(html)
    assert named == present and {"fig-stages", "fig-sources", "fig-distances"} <= set(named)
    # documents and chunks per input file, straight from the docs parts
    docs = pq.read_table(str(build / "docs"), columns=["source", "num_chunks"]).to_pylist()
    chunks = Counter()
    for d in docs:
        chunks[d["source"]] += d["num_chunks"]
    for source, n in chunks.items():
        assert f"<td>{source}</td><td class=n>1</td><td class=n>{n:,}</td>" in html
    sources_svg = re.search(r'<figure id="fig-sources">(.*?)</figure>', html).group(1)
    assert sources_svg.count("<rect") == len(chunks)
    # the index key and the recall of the stored neighbors, as the manifests record them
    latest = json.loads((build / "LATEST").read_text())
    nm = json.loads((build / "neighbors" / latest["neighbors"] / "_manifest.json").read_text())
    assert f"<code>{latest['index_key']}</code>" in html
    assert f"recall@{nm['totals']['k']} of the stored neighbors (held-out sample vs exact search)</td>" \
           f"<td class=n>{nm['recall_at_k']:.3f}</td>" in html
    assert f"LATEST: <code>{json.dumps(latest, sort_keys=True)}</code>" in html.replace("&quot;", '"')
    # every stored distance is counted once in the histogram
    nb = pq.read_table(str(build / "neighbors" / latest["neighbors"])).column("neighbors").to_pylist()
    stored = sum(1 for row in nb for n in row if n >= 0)
    assert f"Stored neighbor distances ({stored:,} sampled)" in html


def test_the_examples_are_real_chunks_with_their_stored_neighbors(page, published_build):
    html = page.read_text()
    build = published_build / "build"
    latest = json.loads((build / "LATEST").read_text())
    t = pq.read_table(str(build / "chunks")).sort_by("chunk_id")
    tokens = np.asarray(t.column("tokens").to_pylist())
    stored = pq.read_table(str(build / "neighbors" / latest["neighbors"])).sort_by("chunk_id").column("neighbors").to_pylist()
    tok = load_tokenizer().tokenizer
    shown = [int(c) for c in re.findall(r"<div class=chunk><span class=muted>chunk (\d+) ", html)]
    assert len(shown) == 3
    for chunk in shown:
        text = tok.decode([int(x) for x in tokens[chunk, :16] if x], skip_special_tokens=True)
        block = html.split(f"<div class=chunk><span class=muted>chunk {chunk} ", 1)[1].split("<div class=chunk>", 1)[0]
        assert text.replace("'", "&#x27;") in block
        assert [int(n) for n in re.findall(r"<div class=nb><span class=muted>chunk (\d+) ", block)] == \
               [n for n in stored[chunk] if n >= 0]


def test_the_page_refers_to_nothing_outside_itself(page):
    html = page.read_text()
    assert "://" not in html  # no http(s), no CDN, no file URL (the build here is a local folder)
    for pattern in ("<script", "<link", "<img", "<iframe", "@import", "url(", " src="):
        assert pattern not in html.lower(), pattern


@needs_browser
def test_chromium_renders_every_figure(page, tmp_path):
    """The DOM Chromium builds holds every figure as an SVG with its bars, and the screenshot shows the bars."""
    from PIL import Image

    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    named, present = figure_ids(dom.stdout)
    assert named and named == present
    for fig in named:
        svg = re.search(rf'<figure id="{fig}"><svg[^>]*>(.*?)</svg>', dom.stdout).group(1)
        assert svg.count("<rect") >= 1, fig
    shot = tmp_path / "page.png"
    r = chromium("--window-size=1100,1400", f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    bars = np.all(np.abs(pixels.astype(int) - BAR_RGB) <= 2, axis=1).sum()
    assert bars > 2_000, f"only {bars} bar-coloured pixels: the charts did not render"


def test_quarantine_by_reason_with_examples(tmp_path):
    """A corpus with an empty file and an unsupported one: the tokenize stage quarantines both, and the report
    counts them by reason with the file as the example."""
    from pipelines.artifacts.storage import open_location
    from pipelines.inference.report_data import quarantine_reasons
    from pipelines.stages.build import run_build
    from pipelines.stages.build_config import BuildConfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 20)
    (corpus / "b.txt").write_text("   \n")
    (corpus / "c.bin").write_bytes(b"\x00\x01")
    run_build(BuildConfig(corpus=[str(corpus)], out=str(tmp_path / "out"), chunk_size=16, seq_len=64,
                          stages="tokenize", max_bad_fraction=1.0))
    reasons = {q.reason: q for q in quarantine_reasons(open_location(str(tmp_path / "out")), 100)}
    assert set(reasons) == {"empty", "unsupported_format"}
    assert [s for s, _ in reasons["empty"].examples] == [str(corpus / "b.txt")] and reasons["empty"].count == 1
    assert [s for s, _ in reasons["unsupported_format"].examples] == [str(corpus / "c.bin")]


def test_an_unpublished_build_is_one_error_line(published_build, tmp_path, capsys):
    from jobs.report import main

    unpublished = tmp_path / "b"
    shutil.copytree(published_build / "build", unpublished)
    (unpublished / "LATEST").unlink()
    code, _, err = call_main(main, capsys, "--data", str(unpublished), "--out", str(tmp_path / "r.html"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no index has been published yet" in lines[0], err
    assert not (tmp_path / "r.html").exists()
