"""Schema of the `eval` group: which model, which measurements, where the report goes, and the promotion gate."""

from dataclasses import dataclass, field


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

    method: str = "grad_x_input"
    """Attribution method: grad_x_input or integrated_gradients."""
    ig_steps: int = 16
    """Interpolation steps of integrated gradients."""
    prompt: str | None = None
    """Prompt of the report's saliency example; None uses the first task prompt, or skips it."""
    output_uri: str | None = None
    """Where `llm-platform explain` writes its PNG/HTML files; None writes `explain/` under the current folder."""


@dataclass
class GateConfig:
    """The promotion gate of `eval.compare_to`."""

    guard_metrics: list[str] = field(default_factory=lambda: ["val/perplexity", "gen/rougeL", "gen/bleu"])
    """Metrics that must not regress; lower is better for names containing loss, perplexity or disparity."""
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
    use_ray: bool = True
    """Run perplexity and generation as Ray Data batch inference; False computes in this process."""
    num_actors: int = 2
    """Actors in the Ray Data pool that holds the model."""
    actor_num_cpus: float = 0.5
    """Logical CPUs per actor (fractional, so the pool does not starve other Ray work)."""
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
    gate: GateConfig = field(default_factory=GateConfig)
    """Promotion gate against `compare_to`."""
