"""Options of `python -m jobs.serve`, apart from the service so that ``--help`` and a bad flag need no Ray Serve import."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.runtime.config import option
from pipelines.runtime.ray_session import LOOPBACK


@dataclass(kw_only=True)
class ServeConfig:
    """Options of `python -m jobs.serve`."""

    data: str = option("", "the build to serve (local folder, s3://..., any fsspec URL); required")
    host: str = option(LOOPBACK, "address the HTTP proxy listens on (0.0.0.0 exposes it to the network)")
    port: int = option(8000, "HTTP port")
    replicas: int = option(1, "replicas, each with its own encoder and index (Ray places them on the cluster)")
    gpus_per_replica: float = option(0.0, "GPUs per replica (the encoder runs on it; the index stays on the CPU)")
    cpus_per_replica: float = option(1.0, "CPUs reserved per replica")
    max_batch_size: int = option(32, "most texts embedded together in one encoder pass (and most texts per request)")
    batch_wait_ms: float = option(5.0, "how long a batch waits for more requests before it runs")
    follow_seconds: float = option(5.0, "how often each replica checks LATEST (and tombstones) for a new version")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (the URL of a build made by jobs.build_index)")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.replicas < 1 or self.max_batch_size < 1:
            raise ValueError(f"--replicas and --max-batch-size must be >= 1, got {self.replicas} and {self.max_batch_size}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0 or self.batch_wait_ms < 0:
            raise ValueError("--gpus-per-replica, --cpus-per-replica and --batch-wait-ms must be >= 0")
        if self.follow_seconds <= 0:
            raise ValueError(f"--follow-seconds must be positive, got {self.follow_seconds}")
