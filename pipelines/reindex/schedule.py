"""One re-index run, or a driver that runs one every ``--every``: locking outcomes become exit codes."""
from __future__ import annotations

import sys
import time
import traceback

from pipelines.reindex.config import EXIT_BUSY, ReindexConfig, parse_every
from pipelines.runtime.config import config_to_dict, fail
from pipelines.runtime.redact import redact


def run_once(cfg: ReindexConfig) -> int:
    from pipelines.artifacts.lock import LockHeld, NotCommitted
    from pipelines.artifacts.storage import open_location
    from pipelines.reindex.publish import append_history, now
    from pipelines.reindex.run import run_reindex

    out = open_location(cfg.out)
    start = time.perf_counter()
    try:
        summary = run_reindex(corpus=cfg.corpus, out=out, text_field=cfg.text_field, index_key=cfg.index_key,
                              max_growth=cfg.max_growth, min_recall=cfg.min_recall, full=cfg.full, keep=cfg.keep,
                              lock_ttl=cfg.lock_ttl, recall_sample=cfg.recall_sample, concurrency=cfg.concurrency,
                              config=config_to_dict(cfg))
    except NotCommitted as e:  # the lock is held or was lost, or LATEST moved meanwhile
        print(redact(f"reindex: {e}; nothing published"), flush=True)
        if out.is_local and isinstance(e, LockHeld):  # an O_APPEND line cannot disturb the lock holder's
            append_history(out, {"time": now(), "action": "skipped", "reason": str(e),
                                 "seconds": round(time.perf_counter() - start, 3)})
        return EXIT_BUSY
    for line in summary.lines():
        print(redact(line), flush=True)
    return 0


def run_schedule(cfg: ReindexConfig) -> int:
    """Check the build and corpus, start Ray, then re-index once or every ``--every``.

    Args:
        cfg: the re-index's options (``python -m jobs.reindex --help``).

    Returns:
        The exit code of the last run: 0, 1 (a failed run), or ``EXIT_BUSY`` (another run holds the lock).
    """
    from pipelines.artifacts.storage import RetriesExhausted, open_location
    from pipelines.artifacts.versions import resolve_latest
    from pipelines.runtime.ray_session import init_ray, task_cause
    from pipelines.text.corpus import list_corpus

    one_line_errors = (FileNotFoundError, PermissionError, ValueError, RetriesExhausted)
    try:
        out = open_location(cfg.out)
        resolve_latest(out)  # a missing build fails here, in one line, before Ray starts
        list_corpus(cfg.corpus, exclude=out)
    except one_line_errors as e:
        fail(str(e))
    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    period = parse_every(cfg.every)
    done = 0
    while True:
        started = time.time()
        try:
            code = run_once(cfg)
        except one_line_errors as e:  # a storage failure retires nothing: the next run sees the whole corpus
            if not period:
                fail(str(task_cause(e)))
            print(redact(f"reindex: run failed: {task_cause(e)}"), file=sys.stderr, flush=True)
            code = 1
        except Exception:  # noqa: BLE001 - a periodic driver reports a failed run and keeps its schedule
            if not period:
                raise
            traceback.print_exc()
            code = 1
        done += 1
        if not period or (cfg.runs and done >= cfg.runs):
            return code
        wait = max(0.0, started + period - time.time())
        print(f"reindex: next run in {wait:.0f} s (--every {cfg.every})", flush=True)
        time.sleep(wait)
