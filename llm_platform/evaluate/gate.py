"""The promotion gate: compare this evaluation with a stored baseline and fail when a guard metric regresses.

A baseline is the `metrics.json` of the same evaluation name on another version of the same model:
`evals/<model>/<compare_to>/<name>/metrics.json`. Lower is better for names containing `loss` or `perplexity`, and
for `disparity` the magnitude counts (a gap either way is a bias); higher is better for everything else, except the
lm-evaluation-harness metrics (`harness/<task>/<metric>`) that lm-eval itself marks lower-is-better, which the caller
passes as `lower_is_better`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llm_platform.errors import ConfigError

if TYPE_CHECKING:
    from llm_platform.config.evaluate import GateConfig
    from llm_platform.evaluate.section import SectionResult

LOWER_IS_BETTER = ("loss", "perplexity")
HARNESS_PREFIX = "harness/"


@dataclass
class GateRow:
    """One metric side by side; `regression_pct` > 0 means worse than the baseline."""

    metric: str
    baseline: float | None
    current: float | None
    guard: bool
    regression_pct: float | None
    status: str


@dataclass
class GateResult:
    """All rows and the guard failures (empty when the gate passes)."""

    baseline_uri: str
    max_regression_pct: float
    rows: list[GateRow] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"baseline_uri": self.baseline_uri, "max_regression_pct": self.max_regression_pct,
                "passed": self.passed, "failures": self.failures, "rows": [vars(r) for r in self.rows]}


def regression_pct(metric: str, baseline: float, current: float, lower_is_better: bool = False) -> float:
    """How much worse `current` is than `baseline`, in percent of the baseline (negative: better).

    `lower_is_better` marks a metric whose name does not say so (a harness metric such as `bits_per_byte`).
    """
    if "disparity" in metric:
        baseline, current = abs(baseline), abs(current)
        worse = current - baseline
    elif lower_is_better or any(s in metric for s in LOWER_IS_BETTER):
        worse = current - baseline
    else:
        worse = baseline - current
    if baseline == 0:
        return 0.0 if worse == 0 else math.copysign(math.inf, worse)
    return 100.0 * worse / abs(baseline)


def compare(current: dict[str, float], baseline: dict[str, float], guard_metrics: list[str],
            max_regression_pct: float, baseline_uri: str = "", *, lower_is_better: Collection[str] = (),
            expected: Collection[str] = ()) -> GateResult:
    """Side-by-side rows for every metric in either set; guard metrics fail beyond `max_regression_pct`.

    Args:
        lower_is_better: names whose regression is an increase although the name does not say so.
        expected: guard names this evaluation was asked to produce (harness metrics): absent from both sets, they
            fail as misnamed instead of passing unseen.
    """
    result = GateResult(baseline_uri=baseline_uri, max_regression_pct=max_regression_pct)
    for name in sorted(n for n in expected if n not in current and n not in baseline):
        produced = sorted(k for k in current if k.startswith(HARNESS_PREFIX)) if name.startswith(HARNESS_PREFIX) \
            else []
        result.failures.append(f"{name}: guard metric produced by neither evaluation"
                               + (f" (this one has {', '.join(produced)})" if produced else ""))
        result.rows.append(GateRow(name, None, None, True, None, "FAIL"))
    for name in sorted(set(current) | set(baseline)):
        base, cur = baseline.get(name), current.get(name)
        guard = name in guard_metrics
        if base is None or cur is None:
            status = "new" if base is None else "missing"
            if guard and base is not None:
                result.failures.append(f"{name}: guard metric missing from this evaluation")
                status = "FAIL"
            result.rows.append(GateRow(name, base, cur, guard, None, status))
            continue
        reg = regression_pct(name, float(base), float(cur), name in lower_is_better)
        status = "ok"
        if guard and reg > max_regression_pct:
            status = "FAIL"
            result.failures.append(f"{name}: {base:.4g} -> {cur:.4g} ({reg:+.1f}% worse, limit {max_regression_pct}%)")
        result.rows.append(GateRow(name, base, cur, guard, reg, status))
    return result


def judge(results: Sequence[SectionResult], baseline: tuple[dict[str, float], str], cfg: GateConfig) -> GateResult:
    """The gate over every section's metrics against `baseline` (`load_baseline`'s metrics and URI).

    A harness guard that this evaluation did not produce is a misnamed metric, not a skipped measurement."""
    metrics = {k: v for r in results for k, v in r.metrics.items()}
    lower_is_better = [m for r in results for m in r.lower_is_better]
    return compare(metrics, baseline[0], cfg.guard_metrics, cfg.max_regression_pct, baseline[1],
                   lower_is_better=lower_is_better,
                   expected=[g for g in cfg.guard_metrics if g.startswith(HARNESS_PREFIX)])


def load_baseline(storage_root: str, model_name: str, version: str, eval_name: str) -> tuple[dict[str, float], str]:
    """The stored metrics of `evals/<model>/<version>/<eval_name>/metrics.json`; a clear error when absent."""
    from llm_platform import storage
    from llm_platform.storage import layout

    uri = layout.eval_metrics(storage_root, model_name, version, eval_name)
    if not storage.exists(uri):
        raise ConfigError(f"eval.compare_to={version}: no stored evaluation at {uri} (evaluate version {version} "
                          f"with eval.name={eval_name} first)")
    return dict(storage.read_json(uri).get("metrics") or {}), uri


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(result: GateResult, only_guards: bool = False) -> str:
    """A plain-text side-by-side table, guards marked with `*`."""
    rows = [r for r in result.rows if r.guard or not only_guards]
    width = max([len(r.metric) for r in rows] + [6]) + 2
    lines = [f"{'metric':<{width}}{'baseline':>12}{'current':>12}{'worse %':>10}  status",
             "-" * (width + 42)]
    for r in rows:
        pct = "-" if r.regression_pct is None else f"{r.regression_pct:+.1f}"
        lines.append(f"{(r.metric + (' *' if r.guard else '')):<{width}}{_fmt(r.baseline):>12}{_fmt(r.current):>12}"
                     f"{pct:>10}  {r.status}")
    verdict = "PASSED" if result.passed else "FAILED: " + "; ".join(result.failures)
    lines.append(f"gate (limit {result.max_regression_pct}% on * metrics) {verdict}")
    return "\n".join(lines)
