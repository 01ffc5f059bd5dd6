"""No credential anywhere it can be read (docs/design.md, "Safety"): a build whose corpus is named by URLs with
user info (``http://user:token@host/...``), served by the loopback S3 server, records and prints those URLs
redacted. Checked with unique fake secrets and a byte search of every file the build wrote, of Ray's session
logs and of what the job printed; and an error naming such a URL is printed redacted too."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipelines.runtime.redact import REDACTED, redact
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")


def files_holding(root: Path, secrets: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]


@pytest.fixture
def http_corpus(s3_server, plays) -> tuple[list[str], list[bytes]]:
    """(corpus URLs with user info, their secrets): two play openings in a bucket, read over plain HTTP."""
    import s3fs

    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    host = s3_server["AWS_ENDPOINT_URL"].removeprefix("http://")
    urls, secrets = [], []
    for p in plays[:2]:
        fs.pipe(f"{bucket}/{p.name}", p.read_bytes()[:4000])
        secret = f"tok-{uuid.uuid4().hex}"
        urls.append(f"http://reader:{secret}@{host}/{bucket}/{p.name}")
        secrets.append(secret.encode())
    return urls, secrets


def test_redact_removes_user_info_and_signatures_only():
    assert redact("https://u:s3cr3t@h.example/a.txt#line=3") == f"https://{REDACTED}@h.example/a.txt#line=3"
    assert redact("cannot read https://tok@h/x: reset") == f"cannot read https://{REDACTED}@h/x: reset"
    signed = redact("https://b.s3.amazonaws.com/k?X-Amz-Credential=AK&X-Amz-Signature=ab12&x=1&sig=S&token=T")
    assert signed == (f"https://b.s3.amazonaws.com/k?X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}&x=1"
                      f"&sig={REDACTED}&token={REDACTED}")
    for kept in ("s3://bucket/key", "abfs://container@account.dfs.core.windows.net/p", "/local/a@b:c"):
        assert redact(kept) == kept


def test_a_build_records_and_prints_no_credential(http_corpus, tmp_path, capsys):
    import ray

    from jobs.build_index import main

    urls, secrets = http_corpus
    out = tmp_path / "build"
    code, stdout, err = call_main(main, capsys, *(a for u in urls for a in ("--corpus", u)), "--out", str(out),
                                  "--chunk-size", "16", "--seq-len", "64", "--concurrency", "2", "--k", "2")
    assert code == 0, err[-3000:]
    assert (out / "LATEST").exists() and b"reader:" not in (out / "docs" / "_manifest.json").read_bytes()
    assert files_holding(out, secrets) == []
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert files_holding(logs, secrets) == []
    assert not any(s.decode() in stdout + err for s in secrets)

    missing = urls[0].replace(".txt", "-missing.txt")
    code, stdout, err = call_main(main, capsys, "--corpus", missing, "--out", str(tmp_path / "other"))
    assert code == 2 and REDACTED in err and not any(s.decode() in stdout + err for s in secrets)
