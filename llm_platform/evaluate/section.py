"""What an evaluator is (`Evaluator`), what it returns (`SectionResult`) and what it reads (`EvalContext`).

`run_eval` reads and validates every input first (`read_inputs`: the task file, bias pairs, the ratings file, the
val split, lm-eval's tasks, the gate's baseline), so bad input fails before any model loads. Then it runs the
evaluators of `evaluators.EVALUATORS` in order. Each one returns its own result: its metrics, what it did not measure
and why (`skipped`), its entries for details.json and the report, its images. A section reads the inputs, the
model (loaded once, on first use) and the results of the sections before it (robustness reads generation's outputs),
and never writes into another's. The report and the gate read the list of results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from llm_platform import storage
from llm_platform.config.evaluate import EvalConfig
from llm_platform.errors import ConfigError, DataError

if TYPE_CHECKING:
    from llm_platform.evaluate.bias import Pair
    from llm_platform.evaluate.generation import Task
    from llm_platform.evaluate.harness import HarnessTasks
    from llm_platform.evaluate.scoring import LoadedModel
    from llm_platform.registry import ModelVersion

R = TypeVar("R", bound="SectionResult")


@dataclass
class SectionResult:
    """One section's share of the evaluation."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """What the section did not measure and why, under the report's name for it (mostly the section's own)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Entries of details.json and of the report's tables (`examples`, `robustness`, `harness`, `bias`, `human`)."""
    images: dict[str, str] = field(default_factory=dict)
    """Caption -> file the section wrote into the report folder."""
    lower_is_better: list[str] = field(default_factory=list)
    """Metrics whose regression is an increase although their name does not say so (lm-eval's), for the gate."""

    @classmethod
    def skip(cls, name: str, reason: str, key: str | None = None) -> SectionResult:
        """A section that measured nothing, and why (`key`: the report's name for it, if not `name`)."""
        return cls(name, skipped={key or name: reason})


@dataclass
class ValSplit:
    """The val split of the model's dataset: its parquet files and the dataset kind (pretrain, sft, preference...)."""

    files: list[str]
    kind: str


@dataclass
class EvalInputs:
    """Every input file, read and validated before anything expensive starts."""

    tasks: list[Task] | None = None
    pairs: list[Pair] | None = None
    val: ValSplit | None = None
    val_missing: str | None = None
    """Why there is no val split to score (None: there is one)."""
    harness_tasks: HarnessTasks | None = None
    baseline: tuple[dict[str, float], str] | None = None
    """The gate's baseline metrics and where they are stored (with `eval.compare_to`)."""


@dataclass
class EvalContext:
    """What an evaluator reads. `earlier` is the results of the sections before it, appended by `run_eval` only."""

    cfg: EvalConfig
    storage_root: str
    mv: ModelVersion
    inputs: EvalInputs
    folder: str
    """The local report folder, where sections write their images and files."""
    earlier: list[SectionResult] = field(default_factory=list)
    _loaded: LoadedModel | None = None

    @property
    def lineage(self) -> dict:
        return self.mv.lineage or {}

    def model(self) -> LoadedModel:
        """The model's weights in this process, loaded on first use (endpoint and Ray paths may never need them)."""
        if self._loaded is None:
            from llm_platform.evaluate import scoring

            self._loaded = scoring.load(self.mv.uri)
        return self._loaded

    def result(self, kind: type[R]) -> R | None:
        """The earlier section's result of this type, or None if that section did not run."""
        return next((r for r in self.earlier if isinstance(r, kind)), None)


class Evaluator(Protocol):
    """One section of the evaluation. `applies` decides from the config alone whether the section is part of this
    evaluation at all (no entry in the report); `run` may still skip, with the reason in its result."""

    name: str

    def applies(self, cfg: EvalConfig) -> bool: ...

    def run(self, ctx: EvalContext) -> SectionResult: ...


def read_inputs(cfg: EvalConfig, mv: ModelVersion, storage_root: str) -> EvalInputs:
    """Read and validate every input before any model loads: a bad file fails with nothing written."""
    from llm_platform.evaluate import bias, gate, generation

    inputs = EvalInputs()
    inputs.tasks = generation.read_tasks(cfg.tasks_uri) if cfg.tasks_uri else None
    inputs.pairs = bias.load_pairs(cfg.bias.pairs_uri, cfg.bias.include_builtin) if cfg.bias.enabled else None
    if cfg.human.ratings_uri:
        if not storage.exists(cfg.human.ratings_uri):
            raise DataError(f"eval.human.ratings_uri: no file at {cfg.human.ratings_uri}")
        if not cfg.human.export_uri and cfg.human.num_samples <= 0:
            raise ConfigError("eval.human.ratings_uri needs eval.human.export_uri (the export folder with key.json)")
    inputs.val, inputs.val_missing = _val_split(cfg, mv.lineage or {})
    inputs.harness_tasks = _harness_tasks(cfg)
    if cfg.compare_to:
        inputs.baseline = gate.load_baseline(storage_root, mv.name, cfg.compare_to, cfg.name)
    return inputs


def _val_split(cfg: EvalConfig, lineage: dict) -> tuple[ValSplit | None, str | None]:
    from llm_platform.data.dataset import open_dataset

    uri = cfg.dataset_uri or (lineage.get("dataset") or {}).get("uri")
    if not uri:
        return None, "no dataset: the model's lineage has no dataset.uri and eval.dataset_uri is unset"
    dataset = open_dataset(uri)
    files = dataset.files.get("val") or []
    if not files:
        return None, f"the dataset at {uri} has no val split"
    return ValSplit(files, dataset.kind), None


def _harness_tasks(cfg: EvalConfig) -> HarnessTasks | None:
    """lm-eval's tasks resolved up front (`harness.prepare`), or None; harness guards need harness tasks."""
    from llm_platform.evaluate.gate import HARNESS_PREFIX

    named = [g for g in cfg.gate.guard_metrics if g.startswith(HARNESS_PREFIX)]
    if named and not cfg.harness.tasks:
        raise ConfigError(f"eval.gate.guard_metrics names {', '.join(named)} but eval.harness.tasks is empty "
                          f"(set eval.harness.tasks=[...] to produce harness metrics)")
    if not cfg.harness.tasks:
        return None
    from llm_platform.evaluate import harness

    return harness.prepare(cfg.harness)


def merged(results: list[SectionResult]) -> tuple[dict[str, float], dict[str, str], dict[str, Any], dict[str, str]]:
    """Every section's metrics, skips, details and images, in section order (the report's order)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    details: dict[str, Any] = {}
    images: dict[str, str] = {}
    for r in results:
        metrics.update(r.metrics)
        skipped.update(r.skipped)
        details.update(r.details)
        images.update(r.images)
    return metrics, skipped, details, images
