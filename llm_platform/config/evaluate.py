"""Schema of the `eval` group."""

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """An evaluation of one model version."""

    model: str = "registry:debug"
    """What to evaluate: `registry:<name>[/<version>]`, a local path or an s3:// URI of an HF-format model."""
    name: str = "default"
    """Evaluation name: `evals/<model>/<version>/<name>/`."""
