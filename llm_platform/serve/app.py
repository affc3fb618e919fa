"""The Ray Serve seam: one deployment (engine + FastAPI ingress) per model version, and the app builder.

`build_app(args)` is what `serve.run`, `llm-platform serve` and a KubeRay RayService
(`import_path: llm_platform.serve.app:build_app`) call; `args` are the `serve` config fields as a plain dict, plus
`storage_root` for `registry:` references. Rolling to a new version is `serve.run(build_app({... model: new ...}))`
under the same app name: Serve starts the new replicas before stopping the old ones, and each old replica refuses new
work but finishes its in-flight requests (`graceful_shutdown_timeout_s`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from ray import serve

from llm_platform.config import as_dict, from_dict
from llm_platform.config.serve import ServeConfig
from llm_platform.errors import ConfigError
from llm_platform.serve import auth, ingress

log = logging.getLogger(__name__)

# The replica's Service, looked up per request by the routes (one replica per process).
_REPLICA: dict[str, Any] = {}


def resolve_model(ref: str, storage_root: str | None) -> tuple[str, str]:
    """(local folder, default model id) of `serve.model`: a registry reference, an s3:// URI or a local path."""
    if ref.startswith("registry:"):
        from llm_platform import registry

        if not storage_root:
            raise ValueError(f"serve.model={ref!r} needs storage_root to find the registry")
        version = registry.resolve(ref, storage_root)
        return registry.materialize(version.uri), version.name
    if ref.startswith(("s3://", "s3a://")):
        from llm_platform import registry

        return registry.materialize(ref), ref.rstrip("/").rsplit("/", 1)[-1]
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    if not os.path.isdir(path):
        raise FileNotFoundError(f"serve.model={ref!r}: no such folder")
    return path, os.path.basename(os.path.normpath(path))


def _asgi_app():
    from llm_platform.serve.routes import create_api

    def get_service():
        replica = importlib.import_module(__name__)._REPLICA
        if "service" not in replica:
            raise RuntimeError("replica not initialised")
        return replica["service"]

    return create_api(get_service)


@serve.deployment(name="openai")
@serve.ingress(_asgi_app)
class OpenAIServer:
    """One replica: loads the model (safetensors only), starts the engine thread, serves the OpenAI routes."""

    def __init__(self, args: dict[str, Any]):
        import torch

        from llm_platform import storage
        from llm_platform.serve.engine import Engine, load_model
        from llm_platform.serve.monitor import DriftMonitor, ServeMetrics, reference_for_model
        from llm_platform.serve.routes import Service

        cfg = from_dict(ServeConfig, {k: v for k, v in args.items() if k in ServeConfig.__dataclass_fields__})
        ingress.check(cfg.ingress)  # before the model loads: a mismatch fails the deployment at once, naming the key
        # Fail closed, also before the model loads: no key and reachable from other hosts (by `serve.host`, or by
        # where this cluster's Serve really listens, which a RayService's http_options decide) is refused.
        auth.check_exposure(cfg, auth.load_api_keys(cfg), [cfg.host, auth.serve_http_host()])
        if args.get("storage"):
            storage.configure(args["storage"])
        if cfg.device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        folder, default_id = resolve_model(cfg.model, args.get("storage_root"))
        model, tokenizer = load_model(folder, cfg.device, cfg.dtype)
        if cfg.gil_switch_interval_ms > 0:  # this process is the replica: the engine is its main workload
            sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
        self.engine = Engine(model, tokenizer, cfg.max_batch_size, cfg.max_waiting_requests, cfg.max_prefill_tokens,
                             max_batch_tokens=cfg.max_batch_tokens, kv_memory_fraction=cfg.kv_memory_fraction,
                             score_prompts_every=cfg.drift_perplexity_every)
        self.engine.start()
        metrics = ServeMetrics(self.engine)
        reference = args.get("drift_reference") or reference_for_model(folder)
        if isinstance(reference, list):  # texts given by the caller (tests, models without lineage)
            from llm_platform.serve.monitor import reference_from_texts

            reference = reference_from_texts(tokenizer, reference)
        monitor = DriftMonitor(reference, cfg.drift_window_prompts, cfg.drift_min_prompts, cfg.drift_threshold,
                               cfg.drift_psi_threshold, metrics)
        self.cfg = cfg
        service = Service(self.engine, tokenizer, cfg.model_name or default_id, cfg, monitor, metrics)
        # Through the imported module: Serve pickles this wrapped class by value, so a bare `_REPLICA` here would be
        # a copy of the dict, not the one the routes read.
        importlib.import_module(__name__)._REPLICA["service"] = service
        log.info("serving %s from %s (%d API keys configured)", service.model_id, folder, len(service.api_keys))

    async def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising replaces the replica."""
        if not self.engine.healthy():
            raise RuntimeError(f"engine unhealthy: {self.engine.fatal_error or 'generation thread not running'}")

    def __del__(self):
        # Serve calls this on shutdown after draining; let admitted sequences finish, then stop the thread.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain_timeout_s=self.cfg.graceful_shutdown_timeout_s)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """`.options(...)` of the deployment from the config (replicas or autoscaling, limits, resources)."""
    from ray.serve.config import BackpressureConfig

    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=cfg.backpressure_status_code,
                                                  retry_after_s=cfg.retry_after_s),
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    if cfg.autoscaling_min_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": cfg.autoscaling_min_replicas,
                                      "max_replicas": cfg.autoscaling_max_replicas,
                                      "target_ongoing_requests": cfg.autoscaling_target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (ServeConfig fields, plus optional `storage_root`, `storage`,
    `drift_reference` (a list of reference texts)); unknown keys are rejected naming the key."""
    extra = set(args) - set(ServeConfig.__dataclass_fields__) - {"storage_root", "storage", "drift_reference"}
    if extra:
        raise ConfigError(f"build_app: unknown serve keys {sorted(extra)}")
    cfg = from_dict(ServeConfig, dict(args))
    if cfg.gil_switch_interval_ms < 0:
        raise ConfigError(f"serve.gil_switch_interval_ms={cfg.gil_switch_interval_ms}: must be >= 0 (0 keeps "
                          f"Python's default)")
    if cfg.stream_interval_tokens < 1:
        raise ConfigError(f"serve.stream_interval_tokens={cfg.stream_interval_tokens}: must be >= 1 (1 streams "
                          f"every token)")
    ingress.validate(cfg.ingress)
    if cfg.stream_max_delay_ms < 0:
        raise ConfigError(f"serve.stream_max_delay_ms={cfg.stream_max_delay_ms}: must be >= 0")
    for key in ("max_prompts_per_request", "max_generated_tokens_per_request"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"serve.{key}={getattr(cfg, key)}: must be >= 1")
    replica_args = {**as_dict(cfg), **{k: args[k] for k in ("storage_root", "storage", "drift_reference")
                                       if k in args}}
    return OpenAIServer.options(**deployment_options(cfg)).bind(replica_args)


def deploy(cfg: ServeConfig, storage_root: str | None = None, storage_settings: dict | None = None) -> str:
    """Start Serve's HTTP proxy on `cfg.host:cfg.port` (if not running) and deploy the app; returns its base URL."""
    from llm_platform import console

    console.adopt_ray_loggers()  # Serve's driver-side INFO lines go to the log file (console.py)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    console.adopt_ray_loggers()
    args: dict[str, Any] = {**as_dict(cfg), "storage_root": storage_root, "storage": storage_settings}
    try:
        serve.run(build_app(args), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RuntimeError:
        reason = replica_error(cfg.app_name)
        if reason is None:
            raise
        raise ConfigError(f"serve app {cfg.app_name!r}: its replicas refused to start: {reason}") from None
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def replica_error(app_name: str) -> str | None:
    """The one-line StageError (a bad key, no API key on an exposed address...) that made the app's replicas fail,
    from the traceback Serve keeps in the deployment's status; None when the failure was something else."""
    import re

    app = serve.status().applications.get(app_name)
    found = []
    for deployment in (app.deployments.values() if app else []):
        found += re.findall(r"llm_platform\.[\w.]*Error: (.+)", deployment.message or "")
    return found[-1].strip() if found else None


def undeploy(cfg: ServeConfig) -> None:
    """Delete the app: replicas stop taking requests and finish the in-flight ones first."""
    serve.delete(cfg.app_name)
