"""Redacting URLs before they are recorded or printed: manifests, ``source`` rows, ``history.jsonl``, checkpoints'
stored config, metrics, summaries and errors (docs/design.md, "Safety").

A URL may carry a credential: user info (``https://user:token@host/...``) or a presigned query string
(``X-Amz-Signature``, ``sig=``, ``token=``). The full URL lives only in memory, where it is used to read; what is
written or shown goes through :func:`redact`. It lives here, in the lowest wing, so that the one-line error of
every job (:func:`pipelines.runtime.config.fail`) and the storage wing that records URLs share it.
"""
from __future__ import annotations

import re

REDACTED = "REDACTED"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# query parameters that carry a signature or a token (S3/GCS presigned URLs, Azure SAS, OAuth)
_SECRET_PARAM = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                           r"x-goog-credential|signature|sig|token|access_token|awsaccesskeyid|key|password|secret)=)"
                           r"[^&#\s]*")
_SECRET_USERINFO_SCHEMES = {"http", "https", "ftp", "ftps", "sftp", "ssh", "webdav", "dav", "davs"}


def _redact_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    host_end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
    netloc, tail = rest[:host_end], rest[host_end:]
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user or scheme.lower() in _SECRET_USERINFO_SCHEMES:  # abfs://container@account is no secret
            netloc = f"{REDACTED}@{host}"
    return f"{scheme}://{netloc}{_SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, tail)}"


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every URL's user info and signature or token query
    parameters replaced by ``REDACTED``: what is recorded or printed. The full URL stays in memory only."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def redact_record(obj):
    """:func:`redact` applied to every string of a JSON-like record (manifests, history, metrics, configs)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_record(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_record(v) for v in obj]
    return obj
