"""Property: whatever sequence of `llm-platform run`s a user types, LATEST only moves to a version whose fresh
evaluation passed the gate in force.

A generated sequence of runs, each with a `--from/--until` slice over every stage, `run.use_tune` on or off, a
model of known quality (`train.max_steps` -> perplexity, tests/fixtures/promotion_fakes.py), and a gate
(`eval.compare_to` none or an earlier version, a 5% or 50% limit); reruns of the previous run are drawn often, so
reruns after a failed gate and after a pass come up in most sequences. The expensive stage functions are fast fakes
writing real records in a real local storage root; the registry, the sweep's registration, the gate and the runner
are real.

After every run, against a plain reference (the gate recomputed from the known perplexities):
- LATEST moved only in a run whose slice holds the promote stage (so `--until register` or `--until eval` never
  moves it), and only to a version that passes the reference gate under that run's gate config;
- a run that raised left LATEST where it was (a failed gate says "LATEST not moved", and it is true);
- a run that finished with the promote stage selected left LATEST at its version (a rerun after a pass promotes),
  and a finished serve stage served LATEST;
- a rerun of a run that failed its gate fails again;
- LATEST is always a version that got there that way.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from fixtures import promotion_fakes as fakes
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from llm_platform import registry
from llm_platform.errors import StageError
from llm_platform.runner import STAGES, run_all, selected_stages

ENDS = [None, *STAGES]
SLICES = [(start, stop) for start in ENDS for stop in ENDS
          if start is None or stop is None or STAGES.index(start) <= STAGES.index(stop)]
WITHOUT_EVAL = [s for s in STAGES if s != "eval"]

# Whole runs and gates against v0001 are drawn more often than the rest: they are what makes versions to compare.
runs = st.fixed_dictionaries({
    "max_steps": st.sampled_from(sorted(fakes.PERPLEXITY)),
    "use_tune": st.booleans(),
    "compare_to": st.sampled_from([None, "v0001", "v0001", "v0002", "v0003"]),
    "max_regression_pct": st.sampled_from([5.0, 50.0]),
    "slice": st.sampled_from([(None, None)] * len(SLICES) + SLICES),
    "stages": st.sampled_from([None, None, None, WITHOUT_EVAL]),
})


def perplexity(root: str, version: str) -> float | None:
    """The known quality of a registered version (from the train config in its lineage), None if absent."""
    try:
        mv = registry.get(root, "debug", version)
    except registry.RegistryError:
        return None
    return fakes.PERPLEXITY[mv.lineage["run"]["config"]["train"]["max_steps"]]


def reference_passes(root: str, version: str, spec: dict) -> bool:
    """The gate, recomputed: no compare_to passes; else at most `max_regression_pct` worse than the baseline's."""
    if spec["compare_to"] is None:
        return True
    current, baseline = perplexity(root, version), perplexity(root, spec["compare_to"])
    if current is None or baseline is None:
        return False
    return 100.0 * (current - baseline) / baseline <= spec["max_regression_pct"]


class Runs(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="llmp-promotion-")
        self.root = os.path.join(self.tmp, "store")
        self.previous: tuple[dict, StageError | None] | None = None
        self.promoted: set[str] = set()  # versions that became LATEST in a run whose gate they pass

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(spec=runs, start=st.booleans())
    def first_run(self, spec, start):
        """About half the sequences start from a first whole run without a gate (as after `make demo`), the rest
        from an empty storage."""
        if start:
            self._run({**spec, "slice": (None, None), "stages": None, "compare_to": None})

    @rule(spec=runs)
    def run(self, spec):
        self._run(spec)

    @precondition(lambda self: self.previous is not None)
    @rule()
    def rerun(self):
        spec, error = self.previous  # type: ignore[misc]
        again = self._run(spec)
        if error is not None and "regressed against" in str(error):
            assert again is not None and "regressed against" in str(again), "a rerun after a failed gate refuses"

    def _run(self, spec: dict) -> StageError | None:
        start, stop = spec["slice"]
        cfg = fakes.config(self.root, max_steps=spec["max_steps"], use_tune=spec["use_tune"],
                           compare_to=spec["compare_to"], max_regression_pct=spec["max_regression_pct"],
                           from_stage=start, until_stage=stop, stages=spec["stages"])
        before = fakes.latest(self.root)
        served = len(self.calls["served"])
        error, summary = None, None
        try:
            summary = run_all(cfg)
        except StageError as e:
            error = e
        after = fakes.latest(self.root)
        todo = selected_stages(cfg) if error is None or "not one of the run's stages" not in str(error) else []
        if after != before:
            assert "promote" in todo, f"LATEST moved {before} -> {after} in a run of {todo}"
            assert error is None, f"LATEST moved {before} -> {after} in a run that failed: {error}"
            assert reference_passes(self.root, after, spec), f"{after} promoted although it fails the gate {spec}"
            self.promoted.add(after)
        if summary is not None and "promote" in todo:
            assert summary.chain["model_version"] == f"debug/{after}", (summary.chain, after)
        if summary is not None and "serve" in todo:
            assert self.calls["served"][served:] == [after]
        self.previous = (spec, error)
        return error

    @invariant()
    def latest_got_there_through_a_passing_gate(self):
        latest = fakes.latest(self.root)
        assert latest is None or latest in self.promoted, latest


def test_latest_moves_only_after_a_passing_gate_on_a_fresh_evaluation(monkeypatch):
    # One set of fakes for every generated sequence: they keep no state but the calls they record.
    Runs.calls = fakes.install(monkeypatch)  # type: ignore[attr-defined]
    run_state_machine_as_test(Runs, settings=settings(max_examples=100, stateful_step_count=15))
