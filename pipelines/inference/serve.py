"""Serving a build over HTTP (`python -m jobs.serve`): a Ray Serve application around :class:`BuildSearcher`.

Why Ray Serve: the rest of the project already runs on Ray, so the same cluster (and ``ray job submit``) scales
the service; replicas are Ray actors, placed and restarted by Serve, with GPUs when asked for.

What each replica does:

- loads the build once (:class:`BuildSearcher`: tokenizer, encoder, the index ``LATEST`` names, tombstones)
  and answers ``POST /search``, ``GET /healthz`` and ``GET /version``;
- batches concurrent searches for the encoder (``@serve.batch``: one encoder pass and one index search per
  batch, which is where a loaded service gains over one query at a time);
- follows ``LATEST``: every ``follow_seconds`` it reads ``LATEST`` (and the tombstones manifest), and when
  either moved it loads a new searcher beside the old one, warms it, and swaps the reference. A batch takes
  the reference once, so every request is answered whole by one version, none waits for a load and none is
  dropped. Tombstones count as a move because a re-index commits them before it publishes: the old index
  still holds the retired chunks, and a searcher that knows the new tombstones drops them.

Bad requests (a body that is not JSON, a missing or unknown field, a wrong type, k outside 1..100) get a 4xx
with ``{"error": reason}``; they never reach the encoder, so they never become a 500.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipelines.artifacts.manifest import read_manifest, require_manifest
from pipelines.artifacts.storage import Location, RetriesExhausted, open_location
from pipelines.artifacts.tombstones import FOLDER as TOMBSTONES
from pipelines.artifacts.versions import resolve_latest
from pipelines.inference.query import BuildSearcher, Hit
from pipelines.inference.serve_config import ServeConfig
from pipelines.runtime.config import fail
from pipelines.runtime.ray_session import LOOPBACK, init_ray

APP_NAME = "retroforge"
DEFAULT_K = 5
MAX_K = 100
MAX_BODY_BYTES = 1 << 20  # a search body is a few texts; anything larger is a mistake or an attack
READY_TIMEOUT_S = 120.0
FIELDS = {"text", "texts", "k"}

logger = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------- requests


class BadRequest(ValueError):
    """A request the service refuses, with the HTTP status (4xx) and the reason it answers."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class SearchRequest:
    """A validated ``POST /search`` body; ``many`` says the body gave ``texts`` (the answer is a list of lists)."""

    texts: tuple[str, ...]
    k: int
    many: bool


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{field} must not be empty")
    return value


def _k(body: dict) -> int:
    k = body.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int):  # JSON true and 5.0 are not counts
        raise BadRequest(f"k must be an integer in 1..{MAX_K}, got {json.dumps(k)}")
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be in 1..{MAX_K}, got {k}")
    return k


def parse_search_request(body: bytes, max_texts: int) -> SearchRequest:
    """Validate a ``POST /search`` body before any work: ``{"text": str, "k": int}`` or ``{"texts": [str], "k": int}``
    (``k`` defaults to 5). Raises :class:`BadRequest` saying what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"body is larger than {MAX_BODY_BYTES} bytes", 413)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: k, text, texts")
    if ("text" in data) == ("texts" in data):
        raise BadRequest('give exactly one of "text" (a string) and "texts" (a list of strings)')
    k = _k(data)
    if "text" in data:
        return SearchRequest((_text(data["text"], "text"),), k, many=False)
    texts = data["texts"]
    if not isinstance(texts, list) or not texts:
        raise BadRequest("texts must be a non-empty list of strings")
    if len(texts) > max_texts:
        raise BadRequest(f"texts holds {len(texts)} texts; at most {max_texts} per request (--max-batch-size)")
    return SearchRequest(tuple(_text(t, f"texts[{i}]") for i, t in enumerate(texts)), k, many=True)


async def read_body(request: Request) -> bytes:
    """The body, read only up to the limit: a client that sends gigabytes is refused without them being held."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise BadRequest(f"body is larger than {MAX_BODY_BYTES} bytes", 413)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"body is larger than {MAX_BODY_BYTES} bytes", 413)
    return bytes(body)


def hit_json(hit: Hit) -> dict:
    """The fields of a hit a client sees (the rank is its place in the list)."""
    return {"chunk_id": hit.chunk_id, "doc_id": hit.doc_id, "source": hit.source, "distance": hit.distance,
            "text": hit.text}


def error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


# ----------------------------------------------------------------------------- following LATEST


PublishedKey = tuple[str, str, int]  # index version, neighbors version, tombstone parts


def published_key(data: Location) -> PublishedKey:
    """What a searcher must be rebuilt for: the versions ``LATEST`` names and the tombstone parts committed."""
    latest = resolve_latest(data)
    tombstones = read_manifest(data, TOMBSTONES)
    return latest["index"], latest["neighbors"], len(tombstones["parts"]) if tombstones else 0


@dataclass(frozen=True)
class Loaded:
    """One searcher and the published state it was built for; replaced whole, never changed."""

    key: PublishedKey
    searcher: BuildSearcher
    loaded_at: float

    def versions(self) -> dict:
        return {"index": self.key[0], "neighbors": self.key[1], "tombstone_parts": self.key[2]}


def load_published(data_url: str, device: str) -> Loaded:
    """A warmed searcher for what is published now. The tombstones are counted before the searcher loads
    them, so a part committed meanwhile only makes the next check load again, never go unnoticed."""
    tombstone_parts = published_key(open_location(data_url))[2]
    searcher = BuildSearcher(data_url, device=device)
    searcher.search_text("warm-up", 1)  # the first encoder call, tombstones and a chunks part, before any request
    key = (searcher.latest["index"], searcher.latest["neighbors"], tombstone_parts)
    return Loaded(key, searcher, time.time())


class LatestFollower:
    """Holds the :class:`Loaded` a replica serves and swaps it when the build publishes something new.

    ``current`` is only ever replaced by one assignment, so a reader sees the old searcher or the new one,
    never a mix; the old one lives on until the batches that took it finish."""

    def __init__(self, data_url: str, device: str):
        self.data_url = data_url
        self.device = device
        self.current = load_published(data_url, device)

    def refresh(self) -> bool:
        """Load and swap in a new searcher if ``LATEST`` or the tombstones moved (blocking: run it off the event loop)."""
        if published_key(open_location(self.data_url)) == self.current.key:
            return False
        fresh = load_published(self.data_url, self.device)
        old, self.current = self.current, fresh
        logger.warning("now serving index %s / neighbors %s (%d tombstone parts), was index %s / neighbors %s",
                       *fresh.key, old.key[0], old.key[1])
        return True


# ----------------------------------------------------------------------------- the deployment


def texts_in(requests: list[SearchRequest]) -> int:
    """A batch's size is the texts it embeds, not the requests it holds."""
    return sum(len(r.texts) for r in requests)


@serve.deployment(name="BuildService")
class BuildService:
    """One replica: a followed searcher behind ``/search``, ``/healthz`` and ``/version``."""

    async def __init__(self, data_url: str, device: str, follow_seconds: float, max_batch_size: int, batch_wait_s: float):
        self.max_texts = max_batch_size
        self.batches = self.texts = self.largest_batch = 0  # what /version reports: is batching happening at all?
        self.follower = await asyncio.to_thread(LatestFollower, data_url, device)
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_s)
        self._follow_task = asyncio.get_running_loop().create_task(self._follow(follow_seconds))

    async def _follow(self, every_s: float) -> None:
        """Check ``LATEST`` every ``every_s``; a failed load keeps the old searcher and is tried again next time."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.follower.refresh)
            except Exception as e:  # noqa: BLE001 - a storage hiccup or a half-removed version must not stop serving
                logger.warning("could not load the newly published build (still serving %s): %s: %s",
                               self.follower.current.versions(), type(e).__name__, e)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=texts_in)
    async def search_batch(self, requests: list[SearchRequest]) -> list[tuple[list, dict]]:
        """Every text of the batch in one encoder pass, all with the same searcher (so one version each)."""
        loaded = self.follower.current
        texts = [t for r in requests for t in r.texts]
        ks = [r.k for r in requests for _ in r.texts]
        answers = await asyncio.to_thread(loaded.searcher.search_texts, texts, ks)
        self.batches, self.texts, self.largest_batch = self.batches + 1, self.texts + len(texts), max(self.largest_batch, len(texts))
        out, start = [], 0
        for r in requests:
            hits = [[hit_json(h) for h in a] for a in answers[start:start + len(r.texts)]]
            start += len(r.texts)
            out.append((hits if r.many else hits[0], loaded.versions()))
        return out

    async def search(self, request: Request) -> JSONResponse:
        try:
            query = parse_search_request(await read_body(request), self.max_texts)
        except BadRequest as e:
            return error(e.status, str(e))
        try:
            results, versions = await self.search_batch(query)
        except Exception as e:  # noqa: BLE001 - e.g. storage failing under the build: a JSON 503, not a traceback
            logger.warning("search failed: %s: %s", type(e).__name__, e)
            return error(503, f"search failed: {type(e).__name__}: {e}")
        return JSONResponse({"results": results, "versions": versions})

    async def __call__(self, request: Request) -> JSONResponse:
        routes = {"/search": ("POST", self.search), "/healthz": ("GET", self.healthz), "/version": ("GET", self.version)}
        path = request.url.path.rstrip("/") or "/"
        if path not in routes:
            return error(404, f"no such endpoint {path}; endpoints: POST /search, GET /healthz, GET /version")
        method, handler = routes[path]
        if request.method != method:
            return error(405, f"{path} takes {method}, not {request.method}")
        return await handler(request)

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **self.follower.current.versions()})

    async def version(self, request: Request) -> JSONResponse:
        loaded = self.follower.current
        return JSONResponse({**loaded.versions(), "loaded_at": loaded.loaded_at, "pid": os.getpid(),
                             "served": {"batches": self.batches, "texts": self.texts, "largest_batch": self.largest_batch}})


# ----------------------------------------------------------------------------- the job


def check_build(data_url: str) -> str:
    """The build's URL (absolute when local) once it is known to be servable; else a one-line error, raised
    here in the driver so that nothing starts for a build that cannot be served."""
    data = open_location(data_url)
    for folder in ("chunks", "docs", "embeddings"):
        require_manifest(data, folder, "serving")
    latest = resolve_latest(data)
    for kind in ("index", "neighbors"):
        if read_manifest(data, f"{kind}/{latest[kind]}") is None:
            raise FileNotFoundError(f"LATEST names {kind} {latest[kind]}, which is not a complete version")
    return data.url


def check_port_free(host: str, port: int) -> None:
    """A port already taken would only show up as a proxy that never starts: say so before starting anything."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def service_url(host: str, port: int) -> str:
    """Where this machine reaches the service (a wildcard host is reached through loopback)."""
    reach = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{reach}]' if ':' in reach else reach}:{port}"


def wait_healthy(url: str, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Whether ``GET /healthz`` answered 200 within ``timeout_s`` (the proxy learns the route after the replicas start)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_service(cfg: ServeConfig, data_url: str) -> str:
    """Start Serve (HTTP on ``cfg.host:cfg.port``) and the application; returns the URL once it answers."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": "WARNING"})
    device = "auto" if cfg.gpus_per_replica > 0 else "cpu"
    app = BuildService.options(
        num_replicas=cfg.replicas,
        # one batch runs while the next one fills
        max_ongoing_requests=2 * cfg.max_batch_size,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    ).bind(data_url, device, cfg.follow_seconds, cfg.max_batch_size, cfg.batch_wait_ms / 1000)
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING", "enable_access_log": False})
    url = service_url(cfg.host, cfg.port)
    if not wait_healthy(url):
        logger.warning("%s/healthz did not answer from this machine within %.0f s", url, READY_TIMEOUT_S)
    return url


def stop_service() -> None:
    """Remove the application, and Serve itself unless other applications still use it (a shared cluster)."""
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def wait_for_signal(stop: threading.Event) -> None:
    """Block until SIGINT or SIGTERM (or ``stop`` is set), then put the previous handlers back."""
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_serve(cfg: ServeConfig, stop: threading.Event | None = None) -> int:
    """Serve the build until interrupted.

    Args:
        cfg: the service's options (``python -m jobs.serve --help``).
        stop: set it to stop the service (tests, embedding); without it SIGINT/SIGTERM stop it.

    Returns:
        The process exit code (0); a missing or unpublished build, or a taken port, is a one-line error first.
    """
    local = not os.environ.get("RAY_ADDRESS")
    try:
        data_url = check_build(cfg.data)
        if local:
            check_port_free(cfg.host, cfg.port)
    except (FileNotFoundError, ValueError, RetriesExhausted) as e:
        fail(str(e))
    init_ray()
    # Serve's own INFO lines (one says new HTTP options "will not be applied" when serve.run finds the Serve that
    # start_service just started with them) would only confuse; the job prints its own line once ready
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        url = start_service(cfg, data_url)
        latest = resolve_latest(data_url)
        print(f"serving {data_url} (index {latest['index']}, neighbors {latest['neighbors']}) at {url}: "
              f"POST {url}/search, GET {url}/healthz, GET {url}/version; Ctrl-C stops", flush=True)
        if stop is None:
            wait_for_signal(threading.Event())
        else:
            stop.wait()
    finally:
        stop_service()
    print("stopped", flush=True)
    return 0

