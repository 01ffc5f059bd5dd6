"""A build's report page (`python -m jobs.report`): what a build holds and how good its retrieval is, at a glance.

Why: a build's quality lives in a dozen manifests (counts, quarantine, the tuner's choice, the recall of the
stored neighbors); a user should not have to read JSON to see whether a build is any good. The page is one
self-contained HTML file (:mod:`pipelines.inference.report_html`) of the figures
:mod:`pipelines.inference.report_data` reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.artifacts.storage import RetriesExhausted, open_location, write_bytes_atomic
from pipelines.runtime.config import fail, option


@dataclass(kw_only=True)
class ReportConfig:
    """Options of `python -m jobs.report`."""

    data: str = option("", "the build to report on (local folder, s3://..., any fsspec URL); required")
    out: str = option("report.html", "where the HTML page is written (a local path or any fsspec URL)")
    examples: int = option(4, "sampled chunks shown with their stored neighbors")
    max_sources: int = option(30, "most input files listed (the largest by chunks; the rest are only counted)")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (the URL of a build made by jobs.build_index)")
        if not self.out or self.out.endswith("/"):
            raise ValueError(f"--out must name a file, got {self.out!r}")
        if self.examples < 0 or self.max_sources < 1:
            raise ValueError(f"--examples must be >= 0 and --max-sources >= 1, got {self.examples} and {self.max_sources}")


def write_page(url: str, html: str) -> str:
    """Write the page to ``url`` (atomically) and return where it went."""
    parent, _, name = url.rstrip("/").rpartition("/")
    loc = open_location(parent or ".")
    write_bytes_atomic(loc, name, html.encode())
    return loc.url_of(name)


def run_report(cfg: ReportConfig) -> int:
    """Read the build, write the page, print its path.

    Args:
        cfg: the report's options (``python -m jobs.report --help``).

    Returns:
        The process exit code (0); a missing or unpublished build is a one-line error.
    """
    from pipelines.inference.report_data import collect_report
    from pipelines.inference.report_html import render_report

    try:
        report = collect_report(open_location(cfg.data), max_sources=cfg.max_sources, num_examples=cfg.examples)
        where = write_page(cfg.out, render_report(report))
    except (FileNotFoundError, ValueError, RetriesExhausted) as e:
        fail(str(e))
    n = report.neighbors
    print(f"report: {where} (index {report.index.version} {report.index.key}, neighbors {n.version}: "
          f"recall@{n.k} {n.recall_at_k}; {len(report.examples)} example chunks)", flush=True)
    return 0
