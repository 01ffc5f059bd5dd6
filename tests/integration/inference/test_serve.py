"""`python -m jobs.serve` on a copy of the session's small published build, with real HTTP requests: a quoted passage
finds its chunk, a batch of texts works, every bad request is a 4xx with a JSON reason, the service listens on
loopback only, and a re-publish under load switches versions with no failed request."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from pipelines.inference.serve_config import ServeConfig
from pipelines.text.tokenizer import load_tokenizer
from tests.conftest import free_port
from tests.helpers_cli import call_main

pytestmark = pytest.mark.usefixtures("ray_local")
MAX_BATCH = 8


def request(url: str, body: bytes | dict | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one HTTP request; a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def chunks(published_build):
    t = pq.read_table(str(published_build / "build" / "chunks")).sort_by("chunk_id")
    docs = pq.read_table(str(published_build / "build" / "docs")).sort_by("doc_id")
    return np.asarray(t.column("tokens").to_pylist()), docs.column("first_chunk_id").to_numpy()


def passage(chunks, doc: int) -> tuple[int, str]:
    """(chunk id, text) of a document's first chunk: [CLS] + its opening, as a text query is embedded."""
    tokens, first = chunks
    target = int(first[doc])
    return target, load_tokenizer().tokenizer.decode([int(t) for t in tokens[target, :16] if t], skip_special_tokens=True)


@pytest.fixture(scope="module")
def service(published_build, tmp_path_factory):
    """The job's run_serve on a copy of the build (so that it can be re-published), stopped at the end. The replica
    reserves no CPU: the neighbors stage of the re-publish asks for both CPUs of the session's Ray instance."""
    from ray import serve

    from pipelines.inference.serve import run_serve

    build = tmp_path_factory.mktemp("serve") / "build"
    shutil.copytree(published_build / "build", build)
    port = free_port()
    cfg = ServeConfig(data=str(build), port=port, cpus_per_replica=0, follow_seconds=0.5, max_batch_size=MAX_BATCH)
    stop, codes = threading.Event(), []
    thread = threading.Thread(target=lambda: codes.append(run_serve(cfg, stop)), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            if request(f"{url}/healthz")[0] == 200:
                break
        except (OSError, ValueError):  # not listening yet, or the proxy's own 404 before it learns the route
            time.sleep(0.2)
    assert thread.is_alive(), f"run_serve ended: {codes}"
    yield SimpleNamespace(url=url, build=build)
    stop.set()
    thread.join(60)
    assert codes == [0]
    assert not serve.status().applications


def test_healthz_and_version(service):
    latest = json.loads((service.build / "LATEST").read_text())
    status, body = request(f"{service.url}/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = request(f"{service.url}/version")
    assert status == 200 and (body["index"], body["neighbors"]) == (latest["index"], latest["neighbors"])


def test_a_quoted_passage_finds_its_chunk(service, chunks, published_build):
    target, text = passage(chunks, 3)
    status, body = request(f"{service.url}/search", {"text": text, "k": 3})
    assert status == 200 and len(body["results"]) == 3
    top = body["results"][0]
    assert set(top) == {"chunk_id", "doc_id", "source", "distance", "text"}
    assert top["text"] == text and top["distance"] < 1e-3  # itself, or its twin in the other edition
    assert top["chunk_id"] == target or body["results"][1]["chunk_id"] == target
    assert top["source"].endswith(".txt")
    assert all(a["distance"] <= b["distance"] for a, b in zip(body["results"], body["results"][1:]))


def test_a_batch_of_texts_and_concurrent_requests(service, chunks):
    quoted = [passage(chunks, d) for d in range(4)]
    status, body = request(f"{service.url}/search", {"texts": [t for _, t in quoted], "k": 2})
    assert status == 200 and len(body["results"]) == 4
    assert [len(r) for r in body["results"]] == [2] * 4
    assert [r[0]["text"] for r in body["results"]] == [t for _, t in quoted]
    before = request(f"{service.url}/version")[1]["served"]
    with ThreadPoolExecutor(16) as pool:  # concurrent single requests share encoder batches
        answers = list(pool.map(lambda i: request(f"{service.url}/search", {"text": quoted[i % 4][1], "k": 1 + i % 3}),
                                range(32)))
    assert all(s == 200 for s, _ in answers)
    assert [len(b["results"]) for _, b in answers] == [1 + i % 3 for i in range(32)]
    assert all(b["results"][0]["text"] == quoted[i % 4][1] for i, (_, b) in enumerate(answers))
    after = request(f"{service.url}/version")[1]["served"]
    assert after["texts"] - before["texts"] == 32 and after["batches"] - before["batches"] < 32  # one replica


@pytest.mark.parametrize("method, path, body, status, reason", [
    ("POST", "/search", b"not json", 400, "not JSON"),
    ("POST", "/search", b"\xff\xfe{", 400, "not JSON"),
    ("POST", "/search", b"", 400, "not JSON"),
    ("POST", "/search", b"[1, 2]", 400, "JSON object"),
    ("POST", "/search", {}, 400, "exactly one of"),
    ("POST", "/search", {"k": 3}, 400, "exactly one of"),
    ("POST", "/search", {"text": "a", "texts": ["b"]}, 400, "exactly one of"),
    ("POST", "/search", {"text": 5}, 400, "text must be a string"),
    ("POST", "/search", {"text": None}, 400, "text must be a string"),
    ("POST", "/search", {"text": "  "}, 400, "must not be empty"),
    ("POST", "/search", {"texts": "abc"}, 400, "non-empty list"),
    ("POST", "/search", {"texts": []}, 400, "non-empty list"),
    ("POST", "/search", {"texts": ["a", 3]}, 400, "texts[1] must be a string"),
    ("POST", "/search", {"texts": ["a"] * (MAX_BATCH + 1)}, 400, f"at most {MAX_BATCH}"),
    ("POST", "/search", {"text": "a", "k": 0}, 400, "k must be in 1..100"),
    ("POST", "/search", {"text": "a", "k": 101}, 400, "k must be in 1..100"),
    ("POST", "/search", {"text": "a", "k": "5"}, 400, "k must be an integer"),
    ("POST", "/search", {"text": "a", "k": 2.5}, 400, "k must be an integer"),
    ("POST", "/search", {"text": "a", "k": True}, 400, "k must be an integer"),
    ("POST", "/search", {"text": "a", "top": 3}, 400, "unknown field(s) top"),
    ("POST", "/search", b'{"text": "' + b"a" * (1 << 20) + b'"}', 413, "larger than"),
    ("GET", "/search", None, 405, "takes POST"),
    ("POST", "/healthz", b"{}", 405, "takes GET"),
    ("GET", "/nothing", None, 404, "no such endpoint"),
])
def test_bad_requests_are_4xx_with_a_reason(service, method, path, body, status, reason):
    got, answer = request(f"{service.url}{path}", body, method)
    assert got == status and reason in answer["error"], answer


def test_it_listens_on_loopback_only(service):
    """The HTTP port is bound to 127.0.0.1 and nowhere else, so another address of this machine is refused.
    (Ray's own gRPC ports are not checked here: tests/integration/runtime/test_loopback_only.py.)"""
    port = int(service.url.rsplit(":", 1)[1])
    bound = {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert bound == {"127.0.0.1"}
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def test_a_re_publish_switches_versions_with_no_failed_request(service, chunks):
    """New index and neighbors versions are published under load: every request during the switch succeeds, and
    the service moves to the new LATEST by itself."""
    from pipelines.artifacts.storage import open_location
    from pipelines.stages.index import run_index
    from pipelines.stages.neighbors import run_neighbors

    target, text = passage(chunks, 2)
    old = json.loads((service.build / "LATEST").read_text())
    answers: list[tuple[int, dict]] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            answers.append(request(f"{service.url}/search", {"text": text, "k": 2}))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        out = open_location(str(service.build))
        s = run_index(out=out, index_key="Flat", extra_neighbors=5, concurrency=2)
        run_neighbors(out=out, index_version=s.version, concurrency=2, extra_neighbors=5)
        new = json.loads((service.build / "LATEST").read_text())
        assert new["index"] != old["index"] and new["neighbors"] != old["neighbors"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, version = request(f"{service.url}/version")
            if (version["index"], version["neighbors"]) == (new["index"], new["neighbors"]):
                break
            time.sleep(0.2)
        assert (version["index"], version["neighbors"]) == (new["index"], new["neighbors"])
        time.sleep(1.0)  # a few more requests on the new versions
    finally:
        done.set()
        for c in clients:
            c.join(60)
    assert answers and [s for s, _ in answers if s != 200] == []
    assert all(b["results"][0]["text"] == text for _, b in answers)
    seen = [(b["versions"]["index"], b["versions"]["neighbors"]) for _, b in answers]
    assert seen[0] == (old["index"], old["neighbors"]) and seen[-1] == (new["index"], new["neighbors"])
    assert set(seen) == {seen[0], seen[-1]}  # one version or the other, never a mix


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nothing"], "chunks/_manifest.json"),
    (["--data", "{unpublished}"], "no index has been published yet"),
    (["--data", "{build}", "--port", "0"], "--port must be in 1..65535"),
    (["--data", "{build}", "--max-batch-size", "0"], "must be >= 1"),
])
def test_bad_options_are_one_error_line_before_serve_starts(published_build, tmp_path, capsys, args, message):
    from jobs.serve import main

    unpublished = tmp_path / "b"
    shutil.copytree(published_build / "build", unpublished)
    (unpublished / "LATEST").unlink()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{unpublished}", str(unpublished))
            .replace("{build}", str(published_build / "build")) for a in args]
    code, _, err = call_main(main, capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and message in lines[-1] and len(lines) <= 2 and "Traceback" not in err, err


def test_sigterm_stops_the_wait():
    from pipelines.inference.serve import wait_for_signal

    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    wait_for_signal(threading.Event())
    assert time.monotonic() - start < 5 and signal.getsignal(signal.SIGTERM) == before
