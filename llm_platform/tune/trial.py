"""One trial's driver function, run by Ray Tune in the trial's actor: the trial's typed config, then a Ray Train run
(`train.launcher.launch`) whose reports reach Tune through `TuneReportCallback`.

The base config crosses into the actor as the typed `TrialConfig` (it pickles); the trial's parameters, which Tune
hands over as a nested dict, are applied onto it with `space.apply_params`, so a tuned choice arrives as its Enum.
With PBT every report carries a pointer checkpoint, and a trial (re)started from one trains a new run from the
pointed checkpoint (`tune/pbt.py`).
"""

from __future__ import annotations

import logging
from typing import Any

from llm_platform import storage
from llm_platform.config.merge import merge
from llm_platform.config.prices import PricesConfig
from llm_platform.storage import layout
from llm_platform.tune import space as spaces

log = logging.getLogger("llm_platform.tune")


def run_name(sweep_name: str, trial_id: str) -> str:
    """The training run of a trial (`runs/<name>/`)."""
    return f"{sweep_name}-{trial_id}"


def run_trial(config: dict, *, base: spaces.TrialConfig, keys: list[str], dataset_uri: str, storage_root: str,
              storage_settings: dict, sweep: dict, pbt: bool = False, prices: PricesConfig | None = None) -> None:
    """Train one trial: `base` with the trial's params from `config` (Tune's sampled values, nested by key)."""
    import ray.tune

    from llm_platform.train.launcher import launch

    storage.configure(storage_settings)
    params = spaces.flatten_params(config, keys)
    trial = spaces.apply_params(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    name = run_name(sweep["name"], trial_id)
    lineage = {"sweep": {**sweep, "trial_id": trial_id, "params": params}}
    if not pbt:
        launch(trial.model, trial.train, trial.scaling, dataset_uri, storage_root, run_name=name,
               callbacks=[tune_report_callback()], extra_lineage=lineage, prices=prices)
        return
    from llm_platform.tune import pbt as pbt_

    pointer = pbt_.read_pointer(ray.tune.get_checkpoint())
    if pointer and pointer["step"] >= trial.train.max_steps:
        # Cloned at its last report: the source run has trained this trial's whole budget already.
        log.info("trial %s continues from %s at its last step: nothing left to train", trial_id,
                 pointer["checkpoint_uri"])
        return
    train = trial.train
    if pointer:
        name = pbt_.resumed_run_name(name, pointer)
        train = merge(train, {"checkpoint.resume_from": pointer["checkpoint_uri"]}, prefix="train.")
        log.info("trial %s continues %s's run checkpoint %s as run %s", trial_id, pointer["trial_id"],
                 pointer["checkpoint_uri"], name)
    pbt_.train_reporting_pointers(
        lambda callbacks: launch(trial.model, train, trial.scaling, dataset_uri, storage_root, run_name=name,
                                 callbacks=callbacks, extra_lineage=lineage, prices=prices),
        run_uri=layout.run(storage_root, name), run_name=name, trial_id=trial_id)


# Tune saves the trainable's name in every trial's state and refuses `Tuner.restore` under another name; this function
# was `driver._trial` when sweeps now on disk started, and those must still resume with `tune.resume=true`.
run_trial.__name__ = "_trial"


def with_last_validation(last: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with the latest `val/...` figures filled in, `last` updated. The training loop reports `val/...` only
    on the steps that validated, but Tune refuses a report without `tune.metric` (a checkpoint-only step, a
    `train.budget` stop between validations): those reports carry the last validation, as a sweep's curve would."""
    last.update({k: v for k, v in metrics.items() if k.startswith("val/")})
    return {**last, **metrics}


def tune_report_callback():
    """Ray Train's `TuneReportCallback`, each report with the last validation figures (`with_last_validation`)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneReportLastValidation(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.last_val: dict[str, Any] = {}

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            first = with_last_validation(self.last_val, metrics[0]) if metrics else None
            super().after_report(run_context, [first, *metrics[1:]] if first is not None else metrics, checkpoint)

    return TuneReportLastValidation()

