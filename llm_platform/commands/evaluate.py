"""`llm-platform eval`: model version -> metrics.json and report under `evals/<model>/<version>/<name>/`.

With `eval.compare_to=<version>` it prints the metrics side by side with that version's stored evaluation and exits
with code 1 when a guard metric regresses beyond `eval.gate.max_regression_pct`, so promotion can be gated on it.
"""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig

GATE_FAILED_EXIT = 1


@stage_main("eval")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import cluster, storage
    from llm_platform.evaluate.gate import format_table
    from llm_platform.evaluate.run import run_eval

    storage.configure(cfg.storage)
    # Ray starts only if the evaluation takes the Ray Data path (eval.use_ray; by default only for large inputs).
    result = run_eval(cfg.eval, cfg.storage.root, connect=lambda: cluster.connect(cfg.cluster))
    print(result.summary())
    if result.gate is not None:
        print(format_table(result.gate))
        if not result.gate.passed:
            raise SystemExit(GATE_FAILED_EXIT)
