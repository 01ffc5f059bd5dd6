"""A deterministic data order: seeded generators, the held-out split by id, config fingerprints.

Why: the same seed gives the same batches on any cluster size and after any resume."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, keys): the data order never depends on the cluster."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]]))


def in_eval_split(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic held-out split by id (splitmix64 hash): same ids, same answer on every machine and run."""
    x = (np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
