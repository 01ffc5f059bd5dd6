"""The Memorizing Transformer job on real local Ray over a real tokenized corpus (play excerpts as documents):
a 2-worker run writes metrics (with and without memory) and per-worker checkpoints to object storage (a real
S3-compatible server), and a rerun resumes from the newest checkpoint with each worker's streams and memories."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines.artifacts.build_reader import BuildReader
from pipelines.artifacts.storage import open_location, read_bytes
from pipelines.stages.tokenize import run_tokenize
from pipelines.train.checkpoint import list_checkpoints, torch_load_bytes
from pipelines.train.memorizing import DocOrder, Streams
from pipelines.train.metrics import read_metrics
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
SEG, XL = 32, 8  # segment length; the tiny preset's XL memory


@pytest.fixture(scope="module")
def build(tmp_path_factory, plays, ray_local):
    """Twelve documents of ~500 tokens (three excerpts of four plays), tokenized once for the module."""
    d = tmp_path_factory.mktemp("memorizing")
    corpus = d / "corpus"
    corpus.mkdir()
    lines = []
    for p in plays[:4]:
        text = p.read_text()
        lines += [json.dumps({"text": text[i * 2500:(i + 1) * 2500]}) for i in range(1, 4)]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    run_tokenize(corpus=[str(corpus)], out=open_location(str(d / "build")), chunk_size=16, seq_len=64,
                 text_field="text", tokenizer="packaged:all-MiniLM-L6-v2", unit_bytes=0, concurrency=2, config={})
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice finished workers sooner
    return d


def train(build, out, steps: int) -> int:
    from jobs.train_memorizing import main

    return main(["--data", str(build / "build"), "--out", str(out), "--preset", "tiny", "--max-steps", str(steps),
                 "--num-workers", "2", "--batch-size", "4", "--seq-len", str(SEG), "--log-every", "1",
                 "--eval-every", "2", "--checkpoint-every", "2", "--eval-fraction", "0.2", "--eval-docs", "2",
                 "--eval-segments", "4", "--lr", "3e-3", "--warmup-steps", "2"])


def test_two_worker_run_writes_metrics_checkpoints_and_resumes(build, s3_server, capfd):
    import s3fs

    s3fs.S3FileSystem().mkdir("memorizing-bucket")
    out = "s3://memorizing-bucket/run"  # --out on object storage: metrics, Ray Train's run state, checkpoints
    assert train(build, out, 4) == 0
    # a worker's progress line reaches the driver once (Ray Train's print patch used to send it twice)
    shown = capfd.readouterr()
    assert (shown.out + shown.err).count("memorizing: starting;") == 1
    first = read_metrics(str(out))
    assert [r["step"] for r in first if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in first if r["kind"] == "eval"] == [2, 4]
    for r in (r for r in first if r["kind"] == "eval"):
        assert all(np.isfinite(r[k]) for k in ("eval_loss", "eval_loss_no_memory", "eval_loss_no_knn"))
        assert r["eval_tokens"] > 0

    assert train(build, out, 6) == 0  # the same command with more steps continues from step 4
    rows = read_metrics(str(out))
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6] and rows[:len(first)] == first
    assert all(r["workers"] == 2 and r["tokens_per_s"] > 0 for r in train_rows)
    cks = list_checkpoints(str(out), "memorizing")
    assert [c.rsplit("_", 1)[-1] for c in cks] == ["00000004", "00000006"]

    # each worker saved its own streams and memories; after the resume they hold what 6 uninterrupted steps give
    data = open_location(str(build / "build"))
    order = DocOrder(data, BuildReader(data), seed=0, eval_fraction=0.2)
    assert all(c.startswith("s3://memorizing-bucket/run/ray_train/memorizing/checkpoint_") for c in cks)
    for rank in (0, 1):
        state = torch_load_bytes(read_bytes(open_location(cks[-1]), f"rank-{rank:05d}.pt"))
        streams = Streams(order, seq_len=SEG, batch_size=4, rank=rank, world=2)
        it = streams.batches(streams.start_position())
        since_start = np.zeros(2, int)
        for _ in range(6):
            batch, pos = next(it)
            since_start = np.where(batch["new_doc"], 1, since_start + 1)
            since_start = np.where(batch["doc_ended"], 0, since_start)
        assert json.loads(state["position_json"])["streams"] == pos["streams"]
        counts = state["task"]["memory"]["knn.0.counts"].numpy()
        # every segment since the document started went into the kNN memory but the XL window's last 8 pairs
        assert counts.tolist() == np.where(since_start > 0, since_start * SEG - XL, 0).tolist()
        assert since_start.max() >= 5  # some row kept its memory across the resume (4 + 2 segments)


def test_cli_help_and_one_line_errors(build, tmp_path, capsys):
    """In this process, as the command line would run them: --help, and a one-line error (exit 2) per bad flag."""
    from jobs.train_memorizing import main

    code, out, _ = call_main(main, capsys, "--help")
    assert code == 0
    for flag in ("--data", "--out", "--preset", "--max-steps", "--num-workers", "--use-gpu", "--seq-len",
                 "--eval-fraction", "ray job submit --working-dir . -- python -m jobs.train_memorizing"):
        assert flag in out, flag
    for args, message in [
        (["--out", str(tmp_path / "o")], "--data is required"),
        (["--data", str(tmp_path), "--out", str(tmp_path / "o")], "chunks/_manifest.json"),
        (["--data", str(build / "build"), "--out", str(tmp_path / "o"), "--preset", "huge"], "unknown preset"),
        (["--data", str(build / "build"), "--out", str(tmp_path / "o"), "--override", "dimm=3"], "dimm"),
    ]:
        code, _, err = call_main(main, capsys, *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and message in lines[-1] and len(lines) <= 2 and "Traceback" not in err, err
