"""Runs the stages of a build in order, with checks before any work and a summary after each."""
from __future__ import annotations

import sys
from typing import Callable

from pipelines.artifacts.publish import refuse_reindexed
from pipelines.artifacts.storage import Location, check_writable, open_location
from pipelines.runtime.config import config_to_dict
from pipelines.runtime.ray_session import cluster_cpus, cluster_gpus, init_ray
from pipelines.runtime.redact import redact
from pipelines.stages.build_config import DEMO_OUT, BuildConfig, bundled_corpus


def _tokenize(cfg: BuildConfig, out: Location, corpus: list[str], concurrency: int):
    from pipelines.stages.tokenize import run_tokenize

    return run_tokenize(corpus=corpus, out=out, chunk_size=cfg.chunk_size, seq_len=cfg.seq_len,
                        text_field=cfg.text_field, tokenizer=cfg.tokenizer, unit_bytes=int(cfg.unit_mb * (1 << 20)),
                        max_doc_mb=cfg.max_doc_mb, concurrency=concurrency, config={**config_to_dict(cfg), "corpus": corpus})


def embed_workers(concurrency: int, cpus_per_worker: float, gpus_per_worker: float, cluster_gpus: float) -> int:
    """Encoder actors to start: CPU workers share ``concurrency`` CPUs; GPU workers are bounded by the
    cluster's GPUs (asking for more GPU actors than fit would leave them pending forever).

    Raises:
        ValueError: ``gpus_per_worker`` > 0 on a cluster without that many GPUs.
    """
    if gpus_per_worker == 0:
        return max(1, int(concurrency // cpus_per_worker))
    fit = int(cluster_gpus // gpus_per_worker)
    if fit < 1:
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g} but the Ray cluster has {cluster_gpus:g} GPU(s)")
    return max(1, min(fit, concurrency))


def _embed(cfg: BuildConfig, out: Location, corpus: list[str], concurrency: int):
    from pipelines.stages.embed import run_embed

    gpus = cfg.gpus_for(cluster_gpus())
    workers = embed_workers(concurrency, cfg.cpus_per_worker, gpus, cluster_gpus() if gpus else 0.0)
    return run_embed(out=out, encoder=cfg.encoder, pooling=cfg.pooling, embedding_dtype=cfg.embedding_dtype,
                     compute_dtype=cfg.compute_dtype, batch_size=cfg.embed_batch_size, concurrency=workers,
                     cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=gpus,
                     allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch,
                     config=config_to_dict(cfg) | {"gpus_per_worker": gpus})  # the re-index reads it as a number


def _index(cfg: BuildConfig, out: Location, corpus: list[str], concurrency: int):
    from pipelines.stages.index import run_index

    return run_index(out=out, index_key=cfg.index_key, max_index_memory=cfg.max_index_memory,
                     max_query_ms=cfg.max_query_ms, metric=cfg.metric, single_node_max_vectors=cfg.single_node_max_vectors,
                     distributed=cfg.distributed, k=cfg.k, extra_neighbors=cfg.extra_neighbors,
                     target_recall=cfg.target_recall, concurrency=concurrency, gpus_per_worker=cfg.gpus_for(cluster_gpus()),
                     config=config_to_dict(cfg))


def _neighbors(cfg: BuildConfig, out: Location, corpus: list[str], concurrency: int):
    from pipelines.stages.neighbors import run_neighbors

    return run_neighbors(out=out, k=cfg.k, extra_neighbors=cfg.extra_neighbors, concurrency=concurrency,
                         search=cfg.neighbors_search, shard_memory=cfg.shard_memory,
                         gpus_per_worker=cfg.gpus_for(cluster_gpus()), config=config_to_dict(cfg))


STAGES: dict[str, Callable] = {"tokenize": _tokenize, "embed": _embed, "index": _index, "neighbors": _neighbors}


def run_build(cfg: BuildConfig) -> int:
    """Run the chosen stages of a build in order, printing each stage's summary.

    Args:
        cfg: the build's options (``python -m jobs.build_index --help``).

    Returns:
        The process exit code: 0, or 1 when more input was quarantined than ``--max-bad-fraction`` allows.

    Raises:
        ReindexedBuild: the index or neighbors stage on a build that jobs.reindex has changed (before Ray starts).
    """

    corpus = cfg.corpus or [bundled_corpus()]
    out = open_location(cfg.out or DEMO_OUT)
    check_writable(out)
    stages = cfg.stage_list
    if "tokenize" in stages:
        from pipelines.text.corpus import list_corpus

        list_corpus(corpus, exclude=out)  # a missing corpus fails here, before Ray starts
    if {"index", "neighbors"} & set(stages):
        refuse_reindexed(out, "the index and neighbors stages")
    init_ray(cfg.ray_address or None, cfg.num_cpus or None)
    concurrency = cfg.concurrency or cluster_cpus()
    code = 0
    for name in stages:
        summary = STAGES[name](cfg, out, corpus, concurrency)
        for line in summary.lines():
            print(redact(line), flush=True)
        if name == "tokenize" and summary.bad_fraction > cfg.max_bad_fraction:
            # stop here: nothing is embedded, indexed or published from a corpus the user said is too damaged;
            # the tokenized parts stay, so a rerun with a higher --max-bad-fraction resumes after them
            rest = stages[stages.index(name) + 1:]
            print(f"error: {summary.quarantined} of {summary.documents_read} documents quarantined "
                  f"({summary.bad_fraction:.1%} > --max-bad-fraction {cfg.max_bad_fraction:.1%}); "
                  f"see {redact(out.url_of('quarantine'))}" + (f"; not run: {', '.join(rest)}" if rest else ""),
                  file=sys.stderr)
            code = 1
            break
    print(f"build: artifacts in {redact(out.url)}", flush=True)
    return code
