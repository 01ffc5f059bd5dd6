"""RETRO training on a real small build (four Shakespeare play openings, two editions each) with real local Ray:
the Ray Data join against the artifacts, a 2-worker Ray Train run (metrics, checkpoints), exact resume, the
job's CLI, and generation that retrieves at chunk boundaries."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.artifacts.storage import open_location
from pipelines.artifacts.versions import resolve_latest
from pipelines.train.checkpoint import list_checkpoints
from pipelines.train.metrics import read_metrics
from pipelines.train.retro import build_samples, resolve_spec
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
CHUNK, SEQ = 16, 64


@pytest.fixture(autouse=True, scope="module")
def quick():
    """One torch thread in this process (tiny tensors; far faster on a busy machine), and Ray Train noticing
    finished workers sooner (the controller reads this when a run starts)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def build(published_build):
    """The session's small published build (tests/conftest.py): chunk_size 16, seq_len 64, k 2."""
    return published_build


def test_join_gives_the_artifacts_tokens_and_neighbors(build):
    data, out = open_location(str(build / "build")), open_location(str(build / "out_join"))
    spec, reader, _ = resolve_spec(data, seq_len=SEQ, num_neighbors=0, eval_fraction=0.2, split_seed=0)
    assert len(reader.parts) >= 3  # the join crosses parts
    summary = build_samples(data, out, spec, partitions=2)
    assert summary.samples > 20 and 0 < summary.eval < summary.samples and not summary.reused
    assert build_samples(data, out, spec).reused

    chunks = pq.read_table(str(build / "build" / "chunks")).sort_by("chunk_id")
    tokens = np.asarray(chunks.column("tokens").to_pylist(), np.int32)
    doc = chunks.column("doc_id").to_numpy()
    nbt = pq.read_table(str(build / "build" / "neighbors" / resolve_latest(data)["neighbors"])).sort_by("chunk_id")
    nb = np.asarray(nbt.column("neighbors").to_pylist())
    seq_starts = np.sort(pq.read_table(str(build / "build" / "seqs")).column("seq_start").to_numpy())
    samples = pq.read_table(summary.folder)
    starts = samples.column("start").to_numpy()
    assert np.array_equal(np.sort(starts), seq_starts)  # --seq-len = the build's: one sample per seqs/ entry
    R, k, n = SEQ // CHUNK, nb.shape[1], len(tokens)
    cut_continuations = kept_continuations = 0
    for s, seq, ret in zip(starts, samples.column("tokens").to_pylist(), samples.column("retrieved").to_pylist()):
        seq, ret = np.asarray(seq), np.asarray(ret).reshape(R, k, 2 * CHUNK)
        for p in range(R):
            q = s + p
            if q >= n or doc[q] != doc[s]:  # past the document's end: padding, no neighbors
                assert not seq[p * CHUNK:(p + 1) * CHUNK].any() and not ret[p].any()
                continue
            assert np.array_equal(seq[p * CHUNK:(p + 1) * CHUNK + 1], tokens[q])
            for j, m in enumerate(nb[q]):
                assert np.array_equal(ret[p, j, :CHUNK], tokens[m, :CHUNK])
                if m + 1 < n and doc[m + 1] == doc[m]:
                    assert np.array_equal(ret[p, j, CHUNK:], tokens[m + 1, :CHUNK])
                    kept_continuations += 1
                else:
                    assert not ret[p, j, CHUNK:].any()
                    cut_continuations += 1
    assert kept_continuations > 50 and cut_continuations > 0


def run_train(*args: str) -> int:
    from jobs.train_retro import main

    return main(list(args))


def common(data, out, steps):
    """fp32 and a tight --grad-clip: the runs below must agree to float32 rounding, whatever bf16 would round."""
    return ["--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", str(steps), "--num-workers", "2",
            "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
            "--eval-fraction", "0.2", "--eval-batches", "1", "--warmup-steps", "2", "--lr", "3e-3", "--vocab", "corpus",
            "--precision", "fp32", "--grad-clip", "0.5"]


@pytest.fixture(scope="module")
def runs(build):
    """A 2-worker run of 6 steps (a); then, on a copy of that whole --out (b), a --no-resume run of 4 steps and
    that run resumed to 6 (three Ray Train runs in all; the samples are copied, not rebuilt).

    The first run names --data and --out relative to the driver's working directory, as `make demo` does:
    the Ray Train workers run elsewhere and must still write there."""
    data = build / "build"
    a, b = build / "run_a", build / "run_b"
    cwd = os.getcwd()
    os.chdir(build)
    try:
        assert run_train(*common("build", "run_a", 6)) == 0
    finally:
        os.chdir(cwd)
    shutil.copytree(a, b)
    abandoned = read_metrics(str(b))
    # --no-resume on an --out that holds a finished run: a fresh history and fresh checkpoints (then resumed
    # below, so it must be exact)
    assert run_train(*common(data, b, 4), "--keep-checkpoints", "1", "--no-resume") == 0
    first = read_metrics(str(b))
    assert run_train(*common(data, b, 6), "--keep-checkpoints", "1") == 0
    return a, b, first, abandoned


def test_two_worker_run_writes_metrics_and_checkpoints(runs):
    a = runs[0]
    rows = read_metrics(str(a))
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(r["workers"] == 2 for r in train)
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(np.isfinite(r["eval_loss"]) and np.isfinite(r["eval_loss_no_retrieval"]) for r in evals)
    cks = list_checkpoints(str(a), "retro")
    assert [c.rsplit("_", 1)[-1] for c in cks] == ["00000004", "00000006"]  # two kept
    import torch

    ck = torch.load(f"{cks[-1]}/model.pt", weights_only=True)
    assert ck["step"] == 6 and json.loads(ck["position_json"])["offset"] == 24 and ck["world_size"] == 2
    mcfg = json.loads(ck["model_config_json"])
    assert mcfg["chunk_size"] == CHUNK
    # --vocab corpus: the model predicts over the ids the build uses (all of them), renumbered
    chunks = pq.read_table(str(runs[0].parent / "build" / "chunks"))
    used = np.unique(chunks.column("tokens").combine_chunks().values.to_numpy())
    assert set(used.tolist()) <= set(ck["vocab_ids"].tolist()) and mcfg["num_tokens"] == len(ck["vocab_ids"]) < 5000


def test_resume_continues_exactly(runs):
    a, b, first, _ = runs
    assert [r["step"] for r in first if r["kind"] == "train"] == [1, 2, 3, 4]
    straight = {r["step"]: r["loss"] for r in read_metrics(str(a)) if r["kind"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(str(b)) if r["kind"] == "train"}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # one history, no duplicated rows
    for step in (5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    ev_a = [r["eval_loss"] for r in read_metrics(str(a)) if r["kind"] == "eval"]
    ev_b = [r["eval_loss"] for r in read_metrics(str(b)) if r["kind"] == "eval"]
    assert ev_b == pytest.approx(ev_a, rel=1e-6)
    # --keep-checkpoints 1 keeps only the newest; the settings the run used travel in the checkpoint
    cks = list_checkpoints(str(b), "retro")
    assert [c.rsplit("_", 1)[-1] for c in cks] == ["00000006"]
    import torch

    saved = json.loads(torch.load(f"{cks[0]}/model.pt", weights_only=True)["train_config_json"])
    assert (saved["precision"], saved["grad_clip"], saved["keep_checkpoints"]) == ("fp32", 0.5, 1)


def test_one_worker_with_grad_accum_follows_the_two_worker_curve(runs, build):
    """DDP's exactness: one worker running the global batch of 4 as 2 micro-batches of 2 (--grad-accum 2, one
    optimizer step each) takes the steps of two DDP workers with 2 rows each, up to float rounding."""
    a = runs[0]
    out = build / "run_accum"
    out.mkdir()
    shutil.copytree(a / "retro_samples", out / "retro_samples")
    args = common(build / "build", out, 6)
    args[args.index("--num-workers") + 1] = "1"
    assert run_train(*args, "--grad-accum", "2", "--eval-every", "0", "--checkpoint-every", "0") == 0
    two = {r["step"]: r["loss"] for r in read_metrics(str(a)) if r["kind"] == "train"}
    one = {r["step"]: r["loss"] for r in read_metrics(str(out)) if r["kind"] == "train"}
    assert sorted(one) == [1, 2, 3, 4, 5, 6]
    assert [one[s] for s in sorted(one)] == pytest.approx([two[s] for s in sorted(one)], rel=1e-5, abs=1e-5)
    assert one[6] < one[1] - 0.05  # it learned: the steps compared are real updates


def test_no_resume_starts_over(runs):
    """--no-resume on an --out that holds a run: the old history and checkpoints go, training starts at step 1."""
    a, _, first, abandoned = runs
    assert [r["step"] for r in abandoned if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in first if r["kind"] == "train"] == [1, 2, 3, 4]  # not resumed at step 6
    assert first[0]["loss"] == pytest.approx(abandoned[0]["loss"], rel=1e-6)  # the same first step: from scratch
    straight = {r["step"]: r["loss"] for r in read_metrics(str(a)) if r["kind"] == "train"}
    assert [r["loss"] for r in first if r["kind"] == "train"] == pytest.approx([straight[i] for i in (1, 2, 3, 4)],
                                                                               rel=1e-6)


def _train_workers() -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_max_failures_recovers_from_a_killed_worker(runs, tmp_path):
    """A Ray Train worker SIGKILLed mid-run: with --max-failures 1 Ray Train restarts the worker group, which resumes
    from the newest checkpoint, and the run ends at --max-steps with exit 0 and one history."""
    import signal
    import threading
    import time

    a = runs[0]
    out = tmp_path / "recovers"
    out.mkdir()
    shutil.copytree(a / "retro_samples", out / "retro_samples")
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=run_train(
        *common(a.parent / "build", out, 24), "--checkpoint-every", "4", "--eval-every", "0", "--max-failures", "1")))
    thread.start()
    killed_at = 0
    deadline = time.time() + 180
    while thread.is_alive() and time.time() < deadline and not killed_at:
        steps = [r["step"] for r in read_metrics(str(out)) if r["kind"] == "train"] if (out / "metrics.jsonl").exists() else []
        victims = _train_workers() if steps and max(steps) >= 6 else []
        if victims:
            victims[0].send_signal(signal.SIGKILL)
            killed_at = max(steps)
        time.sleep(0.05)
    thread.join(300)
    assert 6 <= killed_at < 24, "the run ended before a worker could be killed"
    assert result.get("code") == 0
    steps = [r["step"] for r in read_metrics(str(out)) if r["kind"] == "train"]
    assert steps == list(range(1, 25))  # rows after the checkpoint it resumed from were dropped: one history
    assert list_checkpoints(str(out), "retro")[-1].endswith("checkpoint_00000024")


def generate(capsys, checkpoint, data, *args: str) -> tuple[str, str]:
    """`python -m jobs.generate` in-process, in fp32 unless ``args`` say otherwise (the model was trained in fp32,
    so greedy outputs compare exactly): (the text on stdout, what was retrieved on stderr)."""
    from jobs.generate import main

    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--data", str(data), "--prompt", "To be, or not to be, that is the",
                 "--max-tokens", "24", "--no-stop-at-sep", "--precision", "fp32", *args]) == 0
    got = capsys.readouterr()
    return got.out.strip(), got.err


def test_generate_job_with_each_sampling_option(build, runs, capsys):
    a, data = runs[0], build / "build"
    greedy, err = generate(capsys, a, data, "--temperature", "0")
    assert greedy and "generate: 24 tokens" in err and "retrievals (k=2)" in err
    assert generate(capsys, a, data, "--temperature", "0", "--seed", "7")[0] == greedy  # greedy ignores the seed
    assert generate(capsys, a, data, "--top-k", "1", "--seed", "3")[0] == greedy  # one candidate: the argmax
    assert generate(capsys, a, data, "--top-p", "1e-9", "--seed", "3")[0] == greedy  # the smallest nucleus: the argmax
    text, err = generate(capsys, a, data, "--temperature", "0", "--precision", "bf16")  # the default: bf16 autocast
    assert text and "generate: 24 tokens" in err
    sampled = {generate(capsys, a, data, "--temperature", "1.5", "--seed", str(seed))[0] for seed in (1, 2)}
    assert len(sampled) == 2 and greedy not in sampled  # sampling follows the seed
    # the key/value cache (the default) gives the tokens of recomputing the whole context, also past
    # max_seq_len (64) where whole chunks fall off the front and the cache restarts on the new window
    assert generate(capsys, a, data, "--temperature", "0", "--no-cache")[0] == greedy
    long_cached, err = generate(capsys, a, data, "--temperature", "0", "--max-tokens", "80", "--device", "cpu")
    assert "generate: 80 tokens" in err
    assert generate(capsys, a, data, "--temperature", "0", "--max-tokens", "80", "--no-cache")[0] == long_cached
    _, err = generate(capsys, a, data, "--temperature", "0", "--num-neighbors", "1", "--show-neighbors")
    shown = [line for line in err.splitlines() if line.strip().startswith("neighbor ")]
    assert shown and all(line.strip().startswith("neighbor 0 (chunk ") for line in shown) and "(k=1)" in err


def test_cli_help_and_one_line_errors(build, tmp_path, capsys):
    """In this process, as the command line would run them: --help, and a one-line error (exit 2) per bad flag."""
    from jobs.generate import main as generate_main
    from jobs.train_retro import main as train_main

    code, out, _ = call_main(train_main, capsys, "--help")
    assert code == 0
    for flag in ("--data", "--out", "--preset", "--max-steps", "--num-workers", "--use-gpu", "--max-failures",
                 "--eval-every", "--batch-size", "--seq-len", "ray job submit --working-dir . -- python -m jobs.train_retro"):
        assert flag in out, flag
    assert "ray job submit" in call_main(generate_main, capsys, "--help")[1]
    cases = [
        (["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "chunks/_manifest.json"),
        (["--data", str(build / "build"), "--out", str(tmp_path / "o"), "--seq-len", "24"], "must be a multiple"),
        (["--data", str(build / "build"), "--out", str(tmp_path / "o"), "--batch-size", "3", "--num-workers", "2"],
         "multiple of --num-workers"),
    ]
    for args, message in cases:
        code, _, err = call_main(train_main, capsys, *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and message in lines[-1] and len(lines) <= 2 and "Traceback" not in err, err
    code, _, err = call_main(generate_main, capsys, "--checkpoint", str(tmp_path), "--data", str(build / "build"),
                             "--prompt", "x")
    assert code == 2 and "no checkpoint under" in err and "Traceback" not in err
