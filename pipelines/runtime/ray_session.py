"""Connecting to Ray: a cluster when one is configured, otherwise a local instance on loopback.

``ray job submit`` sets RAY_ADDRESS for the driver, so ``ray.init()`` joins the cluster. Without
it, the job starts its own local instance bound to 127.0.0.1 (Ray otherwise picks the machine's
external interface) with the dashboard on loopback too.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import ray

LOOPBACK = "127.0.0.1"

# Environment of every Ray worker this project starts: single-threaded tokenizers (a worker owns one CPU),
# no model hub, and Ray Train's print patch off (it sends a worker's print both to the log and to the
# redirected stdout, so the driver showed every training line twice). (Not THP_MEM_ALLOC_ENABLE: huge pages
# made a kNN gather 2.5x faster but Memorizing Transformer training steps 25% slower here.)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# Loggers whose warnings a local instance repeats without meaning anything: Ray Train's placement-group cleaner
# (a detached actor) asks the State API, which the dashboard serves and a local instance does not start, whether
# the controller still lives, and warns every second that it cannot. Their errors still show;
# RETROFORGE_RAY_LOGS=1 keeps every Ray log line.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_worker_logs() -> None:
    """Worker setup hook of a local instance: :data:`QUIET_LOGGERS` at ERROR."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process; quiet by default (Ray Data still shows progress bars)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": WORKER_ENV}
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if os.environ.get("RETROFORGE_RAY_LOGS") != "1":
        env["worker_process_setup_hook"] = quiet_worker_logs
        # a new local instance turns Ray's token auth on (kept: cluster.yaml does too) and warns that it did, each run
        logging.getLogger(AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
    ray.init(
        # "local": a new instance even when a `ray start` cluster on this machine left its address in Ray's
        # temp dir (ray.init() would join it, or fail on a stale one); clusters are joined only when asked
        address="local",
        num_cpus=num_cpus,
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,
        include_dashboard=False,
        runtime_env=env,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def bounded_as_completed(submit: Callable[[Any], ray.ObjectRef], items: list, limit: int
                         ) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` of ``submit(items[index])`` for every item, in the order the tasks finish, with at
    most ``limit`` tasks in flight (so a driver merges results as they come without holding them all)."""
    pending: dict = {}
    next_item = 0
    while next_item < len(items) or pending:
        while next_item < len(items) and len(pending) < max(1, limit):
            pending[submit(items[next_item])] = next_item
            next_item += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


def run_bounded(submit: Callable[[Any], ray.ObjectRef], items: list, limit: int, label: str) -> list:
    """Results of ``submit(item)`` for every item, in order, with at most ``limit`` tasks in flight and a
    progress line about every 10% of the items (``label: done/all units``)."""
    results: list = [None] * len(items)
    step = max(1, len(items) // 10)
    for done, (index, result) in enumerate(bounded_as_completed(submit, items, limit), 1):
        results[index] = result
        if done % step == 0 or done == len(items):
            print(f"{label}: {done}/{len(items)} units", flush=True)
    return results


def task_cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapper (whose text is the remote traceback), so that a
    job reports it in one line."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else e


def one_per_node(count: int) -> list:
    """Scheduling strategies for the first ``count`` tasks of a stage: one soft pin to each live node with a
    CPU, then None (the task's own strategy). A driver reuses a worker it already holds for the next task of
    the same kind, so a stage of short tasks could finish on one node before another node's worker has even
    started; pinning the first wave gives every node work. Soft: a node that dies hands its task on."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    pins = [NodeAffinitySchedulingStrategy(node_id, soft=True) for node_id in nodes[:count]]
    return pins + [None] * (count - len(pins))


def max_node_cpus() -> int:
    """CPUs of the largest live node: the most threads one task or actor can be given."""
    return max([int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")] or [1])
