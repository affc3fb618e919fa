"""The root schema: one typed tree that every stage's primary config composes onto.

Every stage shares one schema so that an `experiment/` preset can set any key and be used with any stage, and a
typo or a wrong type anywhere fails at compose time with the key named. Entry points hand each component only its
own node.
"""

from dataclasses import dataclass, field

from llm_platform.config.choices import Stage
from llm_platform.config.cluster import ClusterConfig
from llm_platform.config.data import DataConfig
from llm_platform.config.evaluate import EvalConfig
from llm_platform.config.model import ModelConfig
from llm_platform.config.serve import ServeConfig
from llm_platform.config.storage import StorageConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.config.train import PlanConfig, ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig


@dataclass
class RunConfig:
    """`llm-platform run`: the stages in order."""

    stages: list[Stage] = field(default_factory=lambda: [Stage.data, Stage.train, Stage.register, Stage.eval,
                                                         Stage.promote, Stage.serve])
    """Stages to run, in this order (data, train or tune, register, eval, promote, serve); only promote moves
    LATEST, and only after a passing gate on an evaluation of that version."""
    from_stage: Stage | None = None
    """Start at this stage (`--from`); one of `stages`."""
    until_stage: Stage | None = None
    """Stop after this stage (`--until`); one of `stages`. `--until eval` or earlier leaves LATEST where it is."""
    use_tune: bool = False
    """Run a sweep instead of a single training run."""
    query: str = "Once upon a time"
    """Prompt of the sample query at the end."""
    keep_serving: bool = True
    """Keep serving after the sample query until interrupted."""


@dataclass
class PlatformConfig:
    """Everything a stage can be configured with."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    log_level: str = "INFO"
    """Level of the platform's own log lines."""
    verbose: bool = False
    """Also show Ray's, Ray Data's, Serve's and the workers' own log lines on the console (`-v`); they always go to
    the log file under `log_dir`."""
    log_dir: str = "${oc.env:LLM_PLATFORM_HOME,.llm-platform}/logs"
    """Local folder of the per-command log files (`<stage>-<time>.log`)."""
