"""Serve a build over HTTP: the chunks nearest a text, for applications (a Ray Serve application).

On this machine (binds to 127.0.0.1 unless --host says otherwise):

    python -m jobs.serve --data ./artifacts/demo                       # http://127.0.0.1:8000
    curl -s localhost:8000/search -d '{"text": "To be, or not to be", "k": 3}'
    curl -s localhost:8000/search -d '{"texts": ["a storm at sea", "Once more unto the breach"], "k": 2}'
    curl -s localhost:8000/healthz; curl -s localhost:8000/version

On a Ray cluster (replicas are placed by Ray; --host 0.0.0.0 only behind a firewall or a proxy you trust):

    ray job submit --working-dir . -- python -m jobs.serve --data s3://my-bucket/builds/v1 \\
        --host 0.0.0.0 --replicas 4 --gpus-per-replica 1

Endpoints: POST /search with {"text": str, "k": int} or {"texts": [str, ...], "k": int} (k in 1..100, default 5)
answers {"results": [{"chunk_id", "doc_id", "source", "distance", "text"}, ...]} (a list of such lists for
"texts") and the versions that answered; GET /healthz answers 200 once the replicas are loaded; GET /version
names the index and neighbors versions a replica serves. A bad body is a 4xx with {"error": reason}.

Each replica loads the encoder and the index once, embeds concurrent requests together (--max-batch-size,
--batch-wait-ms), and follows LATEST: when a re-index or a new build publishes, it loads the new versions
beside the old ones and switches without dropping a request. The job runs until Ctrl-C or SIGTERM, then
shuts the application down.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.inference.serve_config import ServeConfig
from pipelines.runtime.config import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = parse_config(ServeConfig, parser, argv)
    from pipelines.inference.serve import run_serve

    return run_serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
