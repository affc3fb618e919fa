"""What a trial hands Tune: every report carries `tune.metric`, though the training loop reports `val/...` only on the
steps that validated."""

from llm_platform.tune.trial import with_last_validation


def test_reports_between_validations_carry_the_last_one():
    last: dict = {}
    reports = [{"train/loss": 3.0, "val/loss": 2.5, "val/perplexity": 12.2},  # step 2: validated
               {"train/loss": 2.8},                                            # step 3: a checkpoint only
               {"train/loss": 2.6, "val/loss": 2.1, "val/perplexity": 8.2},   # step 4: validated again
               {"train/loss": 2.4, "budget/can_stop": 1}]                      # step 5: a budget stop
    seen = [with_last_validation(last, r) for r in reports]
    assert [s["val/loss"] for s in seen] == [2.5, 2.5, 2.1, 2.1]
    assert seen[1]["train/loss"] == 2.8 and seen[3]["budget/can_stop"] == 1
    assert reports[1] == {"train/loss": 2.8}  # the loop's own report is not changed


def test_no_validation_yet_adds_nothing():
    assert with_last_validation({}, {"train/loss": 1.0}) == {"train/loss": 1.0}
