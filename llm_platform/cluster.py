"""Connect to Ray: the cluster named by `cluster.address` or `RAY_ADDRESS`, else a local instance.

Nothing in the package calls `ray.init()` at import time (that breaks workers); stages call `connect()`.
"""

from __future__ import annotations

import logging
import os

from llm_platform import storage
from llm_platform.config.cluster import ClusterConfig

log = logging.getLogger(__name__)

# Environment that Ray workers need to reach the same storage as the driver. Credentials are never forwarded
# (runtime envs are logged): workers take them from their own environment, which is IRSA or an instance role on a
# cluster and the driver's inherited env for a local Ray.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "LLM_PLATFORM_CONF", "HF_HUB_OFFLINE",
                  "OMP_NUM_THREADS")
# Experiment trackers' own settings (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, WANDB_MODE...) reach rank 0 this way, as
# Ray's experiment-tracking guide does it.
_FORWARDED_PREFIXES = ("MLFLOW_", "WANDB_")


def worker_env() -> dict[str, str]:
    """Env vars forwarded to Ray workers so they resolve storage like the driver."""
    env = {k: v for k, v in os.environ.items() if v and (k in _FORWARDED_ENV or k.startswith(_FORWARDED_PREFIXES))}
    endpoint = storage.endpoint_url()
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def connect(cfg: ClusterConfig | None = None) -> str:
    """Join or start Ray once per process; returns the address in use ("local" for a started instance)."""
    import ray

    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.log_to_driver)
        return address
    # Serve's HTTP proxy reads this at start-up: its own plain-text errors become OpenAI-shaped (serve/proxy.py).
    # A local Ray's processes inherit the driver's environment; cluster images set it themselves (Dockerfile).
    from llm_platform.serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # One machine has no spot nodes to be preempted: skip Ray Train's per-run preemption-watcher actor (one process
    # fewer per training run). Clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    temp_dir = cfg.temp_dir or os.environ.get("RAY_TMPDIR")
    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
    log.info("starting a local Ray (%s logical CPUs)", cfg.num_cpus)
    ray.init(
        # "local" always starts a new instance; None would attach to any cluster a `ray start` left on this machine.
        address="local",
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        _temp_dir=temp_dir,
        object_store_memory=cfg.object_store_memory_bytes,
        # The dashboard serves Ray's State API, which Ray Train V2's placement-group cleaner polls to see whether a
        # run's controller is alive; without it a run whose controller is killed (an ASHA-stopped trial) keeps its
        # workers' CPUs forever, and a sweep with more trials than CPUs deadlocks. Bound to 127.0.0.1.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=cfg.log_to_driver,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return "local"
