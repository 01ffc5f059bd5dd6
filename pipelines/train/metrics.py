"""``--out/metrics.jsonl``: one JSON row per logged train step or evaluation, written by rank 0."""
from __future__ import annotations

import json

from pipelines.artifacts.storage import Location, open_location, read_bytes, write_bytes_atomic
from pipelines.runtime.redact import redact_record

METRICS = "metrics.jsonl"


class MetricsLog:
    """``--out/metrics.jsonl``, written by rank 0 only. Appends on a local folder; on object storage (no
    append) the file is rewritten whole, which is one atomic PUT per row."""

    def __init__(self, out: Location, resume_step: int):
        self.out = out
        self.rows: list[dict] = []
        try:
            text = read_bytes(out, METRICS).decode()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                if int(row.get("step", 0)) <= resume_step:  # rows after the checkpoint belong to a lost future
                    self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        write_bytes_atomic(self.out, METRICS, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def write(self, row: dict) -> None:
        row = redact_record(row)  # a row may name a URL (the data, an error)
        self.rows.append(row)
        if self.out.is_local:
            with open(self.out.path(METRICS), "a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self._rewrite()


def read_metrics(out: Location | str) -> list[dict]:
    """All rows of ``--out/metrics.jsonl`` (tests and benchmarks)."""
    out = open_location(out) if isinstance(out, str) else out
    out.fs.invalidate_cache()  # rank 0 rewrites it from another process
    return [json.loads(line) for line in read_bytes(out, METRICS).decode().splitlines() if line.strip()]
