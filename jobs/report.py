"""Write a build's report: one self-contained HTML page (inline CSS and SVG, nothing fetched) to open in a browser.

On this machine:

    python -m jobs.report --data ./artifacts/demo --out ./artifacts/demo-report.html

On a Ray cluster (it runs on the driver and reads the build from object storage; the page can go there too):

    ray job submit --working-dir . -- python -m jobs.report --data s3://my-bucket/builds/v1 \\
        --out s3://my-bucket/builds/v1-report.html

The page shows each stage with its time and counts, documents and chunks per input file, quarantined inputs
by reason with examples, the published index (its key, why it was chosen, the search settings the tuner picked
and the recall it measured), the stored neighbors (their held-out recall and a histogram of their distances),
the versions (LATEST, every complete version, the re-index history) and a few chunks with their stored
neighbors as text. It reads manifests and a bounded sample of parts, never the embeddings.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.inference.report import ReportConfig
from pipelines.runtime.config import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(ReportConfig, parser, argv)
    from pipelines.inference.report import run_report

    return run_report(cfg)


if __name__ == "__main__":
    sys.exit(main())
