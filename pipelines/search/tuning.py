"""Ground truth and tuning: a uniform query sample with its exact neighbors, and the cheapest search
parameters whose filtered neighbor recall@k reaches the target on it (see :mod:`pipelines.stages.index`)."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

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
from pipelines.runtime.ray_session import bounded_as_completed
from pipelines.search.faiss_index import IndexSettings
from pipelines.search.knn import (
    TIE_CANDIDATES,
    empty_topk,
    exact_block,
    filter_candidates,
    ivf_of,
    merge_topk,
    recall_at_k,
    search_neighbors,
)

EXACT_BLOCK_ROWS = 8192


@dataclass
class RecallSample:
    """A uniform query sample with its exact neighbors (raw: only self excluded; filtered: the neighbor rule)."""

    ids: np.ndarray
    queries: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    raw: tuple[np.ndarray, np.ndarray]
    filtered: tuple[np.ndarray, np.ndarray]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, ids=self.ids, lo=self.lo, hi=self.hi, raw_ids=self.raw[0], raw_scores=self.raw[1],
                 filtered_ids=self.filtered[0], filtered_scores=self.filtered[1])
        return buf.getvalue()


def exact_part(out: Location, part: EmbeddingPart, queries: np.ndarray, query_ids: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, m: int, metric: str) -> tuple[tuple, tuple]:
    """Exact raw and filtered top-m of the sample within one embeddings part, block by block."""
    raw, filt = empty_topk(len(query_ids), m), empty_topk(len(query_ids), m)
    for start, block in NpyPart(out, part_rel(part)).blocks(EXACT_BLOCK_ROWS):
        ids = np.arange(part.offset + start, part.offset + start + len(block), dtype=np.int64)
        r, f = exact_block(queries, query_ids, lo, hi, block, ids, m, metric)
        raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
    return raw, filt


@ray.remote(num_cpus=1)
def exact_part_task(out_url: str, part: dict, queries, query_ids, lo, hi, m: int, metric: str):
    return exact_part(open_location(out_url), EmbeddingPart.from_dict(part), queries, query_ids, lo, hi, m, metric)


def compute_recall_sample(out: Location, info: EmbeddingsInfo, bounds: DocBounds, settings: IndexSettings, seed: str,
                  *, use_ray: bool, concurrency: int) -> RecallSample:
    """Sample chunk ids uniformly and compute their exact neighbors over every part."""
    ids = uniform_sample(info.n, settings.recall_sample, f"recall:{seed}")
    queries = gather_rows(out, info, ids)
    lo, hi = bounds.range_of(ids)
    m = settings.k + TIE_CANDIDATES
    raw, filt = empty_topk(len(ids), m), empty_topk(len(ids), m)
    if not use_ray:
        for part in info.parts:
            r, f = exact_part(out, part, queries, ids, lo, hi, m, settings.metric)
            raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
        return RecallSample(ids, queries, lo, hi, raw, filt)
    refs = [ray.put(a) for a in (queries, ids, lo, hi)]
    parts = [p.to_dict() for p in info.parts]
    for _, (r, f) in bounded_as_completed(
        lambda part: exact_part_task.remote(out.url, part, *refs, m, settings.metric), parts, 2 * concurrency
    ):
        raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
    return RecallSample(ids, queries, lo, hi, raw, filt)


def search_candidates(index, key: str) -> list[str]:
    """Search-parameter strings to try, cheapest first ("" = nothing to tune)."""
    ivf = ivf_of(index)
    if ivf is not None:
        values = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if p < ivf.nlist] + [min(ivf.nlist, 4096)]
        quantizer = "_HNSW" in key
        return [f"nprobe={p}" + (f",quantizer_efSearch={max(32, 2 * p)}" if quantizer else "") for p in sorted(set(values))]
    if "HNSW" in key:
        return [f"efSearch={e}" for e in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [""]


def evaluate(index, sample: RecallSample, settings: IndexSettings) -> dict:
    """Filtered neighbor recall@k, raw index recall@k (from the same first-pass candidates, only the
    query itself removed) and CPU milliseconds per query (one core, batched as the neighbors stage
    searches) at the current parameters. ``max_query_ms`` bounds this figure: wall-clock time on a
    shared machine would make the choice depend on what else runs there."""
    cand: list = []
    t = time.process_time()  # CPU time (all threads): what a query costs, whatever else runs on the machine
    found, _, short = search_neighbors(index, sample.queries, sample.ids, sample.lo, sample.hi, k=settings.k,
                                       extra=settings.extra_neighbors, metric=settings.metric, candidates=cand)
    ms = (time.process_time() - t) * 1000 / len(sample.ids)
    none = np.zeros(len(sample.ids), np.int64)
    raw_found, _, _ = filter_candidates(cand[0], np.zeros(cand[0].shape, np.float32), sample.ids, none, none,
                                        settings.k, settings.metric)
    return {"neighbor_recall": recall_at_k(found, *sample.filtered, settings.k),
            "recall": recall_at_k(raw_found, *sample.raw, settings.k), "ms_per_query": ms,
            "short_rows": int(short.sum())}


def tune(index, key: str, sample: RecallSample, settings: IndexSettings,
         ms_cap: float | None = None) -> tuple[str, dict, list[dict]]:
    """The cheapest parameters reaching ``target_recall`` within ``max_query_ms`` (else the best
    recall within the bound); returns (param string, its evaluation, every evaluation tried).
    ``ms_cap`` stops the search early (e.g. once slower than exact search)."""
    import faiss

    limit = min(settings.max_query_ms, ms_cap if ms_cap is not None else float("inf"))
    tried: list[dict] = []
    chosen = None
    for param in search_candidates(index, key):
        if param:
            faiss.ParameterSpace().set_index_parameters(index, param)
        ev = {"index_key": key, "index_param": param, **evaluate(index, sample, settings)}
        tried.append(ev)
        within = ev["ms_per_query"] <= limit
        if within and (chosen is None or ev["neighbor_recall"] > chosen["neighbor_recall"]):
            chosen = ev
        if ev["neighbor_recall"] >= settings.target_recall or not within:
            break
    chosen = chosen or tried[0]
    if chosen["index_param"]:
        faiss.ParameterSpace().set_index_parameters(index, chosen["index_param"])
    return chosen["index_param"], chosen, tried
