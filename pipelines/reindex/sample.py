"""Re-index: a fresh recall sample over the live chunks, with exact ground truth.

Like :func:`pipelines.search.tuning.compute_recall_sample`, but tombstoned chunks are neither queries nor
candidates, and half the queries come from the chunks added since the published version (where a
quantizer trained on older data would show drift first). Ground truth runs as one Ray task per
embeddings part (:func:`pipelines.search.knn.exact_block` over its live rows).
"""
from __future__ import annotations

import numpy as np
import ray

from pipelines.artifacts.embeddings import (
    DocBounds,
    EmbeddingPart,
    EmbeddingsInfo,
    NpyPart,
    gather_rows,
    part_rel,
    uniform_sample,
)
from pipelines.artifacts.storage import Location, open_location
from pipelines.artifacts.tombstones import Tombstones
from pipelines.runtime.ray_session import bounded_as_completed
from pipelines.search.knn import TIE_CANDIDATES, empty_topk, exact_block, merge_topk
from pipelines.search.tuning import EXACT_BLOCK_ROWS, RecallSample


def exact_live_part(out: Location, part: EmbeddingPart, tomb: Tombstones, queries, query_ids, lo, hi, m: int,
                    metric: str):
    raw, filt = empty_topk(len(query_ids), m), empty_topk(len(query_ids), m)
    for start, block in NpyPart(out, part_rel(part)).blocks(EXACT_BLOCK_ROWS):
        ids = np.arange(part.offset + start, part.offset + start + len(block), dtype=np.int64)
        live = ~tomb.dead(ids)
        if not live.any():
            continue
        r, f = exact_block(queries, query_ids, lo, hi, block[live], ids[live], m, metric)
        raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
    return raw, filt


@ray.remote(num_cpus=1)
def exact_live_part_task(out_url: str, part: dict, tomb_parts: int, queries, query_ids, lo, hi, m: int, metric: str):
    out = open_location(out_url)
    return exact_live_part(out, EmbeddingPart.from_dict(part), Tombstones.load(out, tomb_parts), queries, query_ids,
                           lo, hi, m, metric)


def live_sample_ids(n: int, new_from: int, size: int, tomb: Tombstones, seed: str) -> np.ndarray:
    """Sorted distinct live chunk ids: up to half from ``[new_from, n)``, the rest uniform over all."""
    rng = np.random.default_rng(int(uniform_sample(1 << 30, 1, f"rng:{seed}")[0]))

    def draw(lo: int, hi: int, want: int, tag: str) -> np.ndarray:
        got = np.zeros(0, np.int64)
        for attempt in range(8):
            if want <= 0 or hi <= lo:
                break
            ids = lo + uniform_sample(hi - lo, min(hi - lo, 2 * want + 64), f"{tag}:{seed}:{attempt}")
            got = np.union1d(got, ids[~tomb.dead(ids)])
            if len(got) >= want or len(ids) == hi - lo:
                break
        return np.sort(rng.choice(got, size=want, replace=False)) if len(got) > want else got

    new = draw(new_from, n, size // 2, "new")
    rest = np.setdiff1d(draw(0, n, size, "all"), new)
    if len(rest) > size - len(new):
        rest = rng.choice(rest, size=size - len(new), replace=False)
    return np.union1d(new, rest).astype(np.int64)


def live_recall_sample(out: Location, info: EmbeddingsInfo, bounds: DocBounds, tomb: Tombstones, *, size: int,
                       new_from: int, k: int, metric: str, seed: str, concurrency: int) -> RecallSample:
    ids = live_sample_ids(info.n, new_from, size, tomb, seed)
    queries = gather_rows(out, info, ids)
    lo, hi = bounds.range_of(ids)
    m = k + TIE_CANDIDATES
    raw, filt = empty_topk(len(ids), m), empty_topk(len(ids), m)
    refs = [ray.put(a) for a in (queries, ids, lo, hi)]
    parts = [p.to_dict() for p in info.parts if p.rows]
    for _, (r, f) in bounded_as_completed(
        lambda part: exact_live_part_task.remote(out.url, part, tomb.parts, *refs, m, metric), parts,
        2 * max(1, concurrency),
    ):
        raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
    return RecallSample(ids, queries, lo, hi, raw, filt)
