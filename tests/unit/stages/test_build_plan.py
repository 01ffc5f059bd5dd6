"""How many encoder actors a build asks Ray for: GPU actors never outnumber the cluster's GPUs."""
from __future__ import annotations

import pytest

from pipelines.stages.build import embed_workers


def test_cpu_workers_share_the_cpus():
    assert embed_workers(8, 1.0, 0.0, cluster_gpus=0) == 8
    assert embed_workers(8, 2.0, 0.0, cluster_gpus=0) == 4
    assert embed_workers(1, 4.0, 0.0, cluster_gpus=0) == 1  # never zero workers


def test_gpu_workers_are_bounded_by_the_clusters_gpus_not_its_cpus():
    # 64 CPUs and 4 GPUs: asking for 64 one-GPU actors would leave 60 of them pending forever
    assert embed_workers(64, 1.0, 1.0, cluster_gpus=4) == 4
    assert embed_workers(64, 1.0, 0.5, cluster_gpus=4) == 8
    assert embed_workers(2, 1.0, 1.0, cluster_gpus=4) == 2  # an explicit --concurrency still caps it


def test_too_few_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match="--gpus-per-worker 1 but the Ray cluster has 0 GPU"):
        embed_workers(8, 1.0, 1.0, cluster_gpus=0)
