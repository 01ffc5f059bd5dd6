"""Ground truth and tuning: a uniform query sample with its exact neighbors, and the cheapest search
parameters whose filtered neighbor recall@k reaches the target on it (see :mod:`pipelines.stages.index`)."""
from __future__ import annotations

import io
import re
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
# The tuner sees half the sample; the recall of what the neighbors stage stored is measured on the
# other half, so the reported figure is not inflated by having picked the parameters on it.
TUNING_ROWS, HELD_OUT_ROWS = slice(0, None, 2), slice(1, None, 2)
RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # x (k + extra + 1) candidates re-ranked exactly
RERANK_MIN_GAIN = 0.002  # recall gained by doubling the candidates below which more do not help


@dataclass
class RecallSample:
    """A uniform query sample with its exact neighbors (raw: only self excluded; filtered: the neighbor rule)."""

    ids: np.ndarray
    queries: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    raw: tuple[np.ndarray, np.ndarray]
    filtered: tuple[np.ndarray, np.ndarray]

    def rows(self, which: slice) -> RecallSample:
        """The sample restricted to ``which`` (:data:`TUNING_ROWS` or :data:`HELD_OUT_ROWS`)."""
        if len(self.ids) < 2:
            return self
        return RecallSample(self.ids[which], self.queries[which], self.lo[which], self.hi[which],
                            tuple(a[which] for a in self.raw), tuple(a[which] for a in self.filtered))

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
    return exact_sample(out, info, bounds, ids, settings.k + TIE_CANDIDATES, settings.metric, use_ray=use_ray,
                        concurrency=concurrency)


def exact_sample(out: Location, info: EmbeddingsInfo, bounds: DocBounds, ids: np.ndarray, m: int, metric: str,
                 *, use_ray: bool, concurrency: int = 1) -> RecallSample:
    """The exact top-m neighbors of sorted chunk ``ids`` over every part (raw and with the neighbor rule):
    the ground truth the tuner and the benchmarks measure recall against."""
    queries = gather_rows(out, info, ids)
    lo, hi = bounds.range_of(ids)
    raw, filt = empty_topk(len(ids), m), empty_topk(len(ids), m)
    if not use_ray:
        for part in info.parts:
            r, f = exact_part(out, part, queries, ids, lo, hi, m, metric)
            raw, filt = merge_topk(raw, r, m), merge_topk(filt, f, m)
        return RecallSample(ids, queries, lo, hi, raw, filt)
    refs = [ray.put(a) for a in (queries, ids, lo, hi)]
    parts = [p.to_dict() for p in info.parts]
    for _, (r, f) in bounded_as_completed(
        lambda part: exact_part_task.remote(out.url, part, *refs, m, metric), parts, 2 * concurrency
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


def parse_search_params(index_param: str) -> tuple[int, int]:
    """(nprobe, quantizer_efSearch) of a parameter string that :func:`search_candidates` made; (1, 0)
    where absent (a flat index has one list, no graph)."""
    nprobe = re.search(r"nprobe=(\d+)", index_param or "")
    ef = re.search(r"quantizer_efSearch=(\d+)", index_param or "")
    return (int(nprobe.group(1)) if nprobe else 1), (int(ef.group(1)) if ef else 0)


def rerank_choices(settings: IndexSettings, lossy: bool) -> list[int]:
    """Candidate counts to re-rank exactly, smallest first ([0]: the index's distances are exact)."""
    if not lossy:
        return [0]
    base = settings.k + settings.extra_neighbors + 1
    return [base * f for f in RERANK_FACTORS]


def evaluate(index, sample: RecallSample, settings: IndexSettings, exact=None, rerank: int = 0) -> dict:
    """Filtered neighbor recall@k, raw index recall@k (from the same first-pass candidates, only the
    query itself removed) and CPU milliseconds per query (one core, batched as the neighbors stage
    searches, re-ranking included) at the current parameters. ``max_query_ms`` bounds this figure:
    wall-clock time on a shared machine would make the choice depend on what else runs there."""
    cand: list = []
    t = time.process_time()  # CPU time (all threads): what a query costs, whatever else runs on the machine
    found, _, short = search_neighbors(index, sample.queries, sample.ids, sample.lo, sample.hi, k=settings.k,
                                       extra=settings.extra_neighbors, metric=settings.metric, candidates=cand,
                                       exact=exact if rerank else None, rerank=rerank)
    ms = (time.process_time() - t) * 1000 / len(sample.ids)
    none = np.zeros(len(sample.ids), np.int64)
    raw_found, _, _ = filter_candidates(cand[0], np.zeros(cand[0].shape, np.float32), sample.ids, none, none,
                                        settings.k, settings.metric)
    return {"neighbor_recall": recall_at_k(found, *sample.filtered, settings.k),
            "recall": recall_at_k(raw_found, *sample.raw, settings.k), "ms_per_query": ms,
            "short_rows": int(short.sum()), "rerank": rerank}


def tune(index, key: str, sample: RecallSample, settings: IndexSettings,
         ms_cap: float | None = None, exact=None) -> tuple[str, dict, list[dict]]:
    """The cheapest (search parameters, re-rank candidates) reaching ``target_recall`` within
    ``max_query_ms`` (else the best recall within the bound); returns (param string, its
    evaluation, every evaluation tried). A lossy index is re-ranked when ``exact`` (the stored
    embeddings) is given. ``ms_cap`` stops the search early (e.g. once slower than exact search).
    Probes grow in the outer loop, candidates in the inner one; the search stops once the
    cheapest setting at the current probes already costs more than the best one found."""
    import faiss

    from pipelines.search.rerank import is_lossy

    limit = min(settings.max_query_ms, ms_cap if ms_cap is not None else float("inf"))
    sample = sample.rows(TUNING_ROWS)
    reranks = rerank_choices(settings, exact is not None and is_lossy(index))
    tried: list[dict] = []
    best = best_any = None
    for param in search_candidates(index, key):
        if param:
            faiss.ParameterSpace().set_index_parameters(index, param)
        first = None
        for rerank in reranks:
            if best is not None and rerank > best["rerank"]:
                break
            ev = {"index_key": key, "index_param": param, **evaluate(index, sample, settings, exact, rerank)}
            tried.append(ev)
            first = first or ev
            within = ev["ms_per_query"] <= limit
            if within and (best_any is None or ev["neighbor_recall"] > best_any["neighbor_recall"]):
                best_any = ev
            if within and ev["neighbor_recall"] >= settings.target_recall:
                if best is None or ev["ms_per_query"] < best["ms_per_query"]:
                    best = ev
                break
            gain = ev["neighbor_recall"] - (tried[-2]["neighbor_recall"] if ev is not first else 0.0)
            if not within or (ev is not first and gain < RERANK_MIN_GAIN):
                break  # slower than allowed, or more candidates no longer help at these probes
        if first is None or first["ms_per_query"] > limit or (best is not None and first["ms_per_query"] >= best["ms_per_query"]):
            break
    chosen = best or best_any or tried[0]
    if chosen["index_param"]:
        faiss.ParameterSpace().set_index_parameters(index, chosen["index_param"])
    return chosen["index_param"], chosen, tried
