"""Connect to Ray: the cluster named by `cluster.address` or `RAY_ADDRESS`, else a local instance.

Nothing in the package calls `ray.init()` at import time (that breaks workers); stages call `connect()`.
"""

from __future__ import annotations

import logging
import os
import re

from llm_platform import console, storage
from llm_platform.config.cluster import ClusterConfig

log = logging.getLogger(__name__)

# Environment that Ray workers need to reach the same storage as the driver. Credentials are never forwarded:
# Ray writes runtime envs to its logs (runtime_env_agent.log) in plain text and shows them in the dashboard.
# Workers take credentials from their own environment: on a cluster the pods' (a Kubernetes Secret, IRSA, an
# instance role; docs/cloud.md), on a local Ray the driver's, which its processes inherit when Ray starts.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "LLM_PLATFORM_CONF", "HF_HUB_OFFLINE",
                  "OMP_NUM_THREADS")
# Experiment trackers' settings that rank 0 needs and that are not secrets: where the tracker is, which
# project/experiment, how to talk to it. An allowlist, not a prefix: MLFLOW_TRACKING_TOKEN/PASSWORD/USERNAME,
# WANDB_API_KEY and any setting added by a later client release stay out until someone reads them and adds them.
_FORWARDED_TRACKER_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_S3_ENDPOINT_URL",
    "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_SILENT", "WANDB_QUIET",
    "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS", "WANDB_NOTES", "WANDB_HTTP_TIMEOUT", "WANDB_INIT_TIMEOUT",
    "WANDB_DISABLE_CODE", "WANDB_DISABLE_GIT", "WANDB_CONSOLE",
)
# Names of variables that hold secrets: never forwarded by `worker_env`, refused by `llm-platform submit --env`.
# Over-broad on purpose (KEY matches API_KEY, API_KEYS, ACCESS_KEY_ID, PRIVATE_KEY...); TOKENIZERS_PARALLELISM is
# the one common setting it would otherwise catch.
SECRET_NAME = re.compile(r"KEY|TOKEN(?!IZER)|SECRET|PASS(?:WORD|WD|PHRASE)|CREDENTIAL|PRIVATE|COOKIE|AUTHORIZATION"
                         r"|^AWS_PROFILE$", re.I)
# A URL with a password in it (`https://user:pass@host`), e.g. an MLFLOW_TRACKING_URI with basic auth.
_URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")
# The variable Serve's HTTP proxy reads for its middlewares, and our callback (serve/proxy.py, named by import path
# so that this module, below serving, never imports it).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "llm_platform.serve.proxy:middlewares"


def is_secret(name: str, value: str = "") -> bool:
    """True when an environment variable looks like it holds a credential, by its name or a URL password."""
    return bool(SECRET_NAME.search(name) or _URL_WITH_PASSWORD.search(value))


def worker_env() -> dict[str, str]:
    """Env vars forwarded to Ray workers (allowlisted, never secrets) so they resolve storage and trackers like the
    driver."""
    allowed = _FORWARDED_ENV + _FORWARDED_TRACKER_ENV
    env = {k: os.environ[k] for k in allowed if os.environ.get(k) and not is_secret(k, os.environ[k])}
    endpoint = storage.endpoint_url()
    if endpoint and not is_secret("AWS_ENDPOINT_URL", endpoint):
        env["AWS_ENDPOINT_URL"] = endpoint
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# The GCS address of the local instance `connect` started in this process and the cores this machine gives it.
_LOCAL: dict[str, object] = {}


def machine_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)


def cpu_task_slots() -> int | None:
    """How many CPU-bound tasks are worth running at once on the connected Ray, where that is fewer than its CPUs:
    a local instance that `connect` started is given more logical CPUs than the machine has cores (headroom, so
    Ray Data's operators and Train's workers never starve each other), and filling them with CPU-bound tasks only
    starts more worker processes (each about 2.7 CPU-seconds to start and import, and its own memory) that then
    share the same cores. None on a cluster, whose CPUs are real."""
    import ray

    if not _LOCAL or not ray.is_initialized():
        return None
    if ray.get_runtime_context().gcs_address != _LOCAL["gcs_address"]:
        return None
    return int(_LOCAL["cores"])  # type: ignore[call-overload]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.log_to_driver and console.verbose())
        console.adopt_ray_loggers()
        return address
    # Serve's HTTP proxy reads this at start-up: its own plain-text errors become OpenAI-shaped (serve/proxy.py).
    # A local Ray's processes inherit the driver's environment; cluster images set it themselves (Dockerfile).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # One machine has no spot nodes to be preempted: skip Ray Train's per-run preemption-watcher actor (one process
    # fewer per training run). Clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The raylet warns on the console whenever more worker processes start than a few times its concurrency limit
    # (the physical cores): on a laptop that is every pipeline. Let as many start at once as logical CPUs are given.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(int(cfg.num_cpus or 1), 1)))
    temp_dir = cfg.temp_dir or os.environ.get("RAY_TMPDIR")
    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
    # Ray Train V2's placement-group cleaner asks the State API whether a run's controller is still alive. Given no
    # address, Ray's State API client scans this machine for Ray instances and, finding two (a `llm-platform serve`
    # beside a `llm-platform tune`, or a test's Ray beside a CLI's), raises; the cleaner's thread dies, a killed
    # controller's workers (an ASHA-stopped trial's) keep their CPUs, and a sweep deadlocks once Ray Data has no CPU
    # left. So this instance's processes are told which API server is theirs: they inherit the variable from the
    # environment `ray.init` starts them with. It is set only for that call: a process this one starts later (a
    # test's other Ray, a `ray start`) must not inherit an address that is not its own.
    dashboard_port = _free_port()
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    log.info("starting a local Ray (%s logical CPUs)", cfg.num_cpus)
    try:
        _init_local(ray, cfg, temp_dir, dashboard_port, runtime_env)
        _LOCAL.update(gcs_address=ray.get_runtime_context().gcs_address, cores=machine_cores())
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
    console.adopt_ray_loggers()
    return "local"


def _init_local(ray, cfg: ClusterConfig, temp_dir: str | None, dashboard_port: int, runtime_env: dict) -> None:
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
        dashboard_port=dashboard_port,
        runtime_env=runtime_env,
        # Workers' and replicas' own output stays in Ray's session logs unless -v (console.py).
        log_to_driver=cfg.log_to_driver and console.verbose(),
        configure_logging=True,
        # Ray's own start-up warnings (token authentication...) go to the log file unless -v.
        logging_level=logging.WARNING if console.verbose() else logging.ERROR,
    )
