"""A finished (or interrupted) Tuner's ResultGrid read back as TrialRecords: reports, params, status, run URIs.

A trial counts as finished when its run wrote its lineage and its export; a PBT trial's run is the one its last
pointer checkpoint names (tune/pbt.py).
"""

from __future__ import annotations

from llm_platform import storage
from llm_platform.storage import layout
from llm_platform.tune import space as spaces
from llm_platform.tune.summary import ERROR, FINISHED, STOPPED, TrialRecord
from llm_platform.tune.trial import run_name


def _saved_params(result) -> dict:
    """The trial folder's `params.json` (what Tune wrote when the trial started), or {}."""
    import json

    try:
        fs = result.filesystem
        with fs.open_input_stream(str(result.path).rstrip("/") + "/params.json") as f:
            return json.loads(f.read())
    except Exception:  # noqa: BLE001 - a missing or unreadable file leaves the params unknown, as before
        return {}


def _reports_frame(result):
    """A trial's reports as a DataFrame: Tune's `metrics_dataframe` (its result.json), or the trial folder's
    progress.csv when that holds more rows. Ray 2.60 rewrites result.json when a paused trial resumes (synchronous
    PBT pauses every trial), losing the earlier reports, while progress.csv keeps them."""
    import io

    import pandas as pd

    df = result.metrics_dataframe
    try:
        with result.filesystem.open_input_stream(str(result.path).rstrip("/") + "/progress.csv") as f:
            progress = pd.read_csv(io.BytesIO(f.read()), dtype={"trial_id": str})
    except Exception:  # noqa: BLE001 - no progress.csv (no report yet): Tune's frame as is
        return df
    return progress if df is None or len(progress) > len(df) else df


def collect(grid, keys: list[str], sweep_name: str, storage_root: str) -> list[TrialRecord]:
    """Tune's ResultGrid as TrialRecords: reports, params, status (finished = the run wrote its lineage)."""
    import math
    import os

    trials = []
    for result in grid:
        trial_id = os.path.basename(str(result.path).rstrip("/"))  # trial_dirname_creator names it by trial id
        df = _reports_frame(result)
        reports = []
        if df is not None and len(df):
            for row in df.to_dict("records"):
                reports.append({k: v for k, v in row.items()
                                if not (isinstance(v, float) and math.isnan(v)) and not k.startswith("config/")})
        run_uri = layout.run(storage_root, final_run_name(result, sweep_name, trial_id))
        export_uri = storage.join(run_uri, "export")
        if result.error is not None:
            status = ERROR
        elif storage.exists(storage.join(run_uri, "lineage.json")) and storage.exists(
                storage.join(export_uri, "config.json")):
            status = FINISHED
        else:
            status = STOPPED
        error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else None
        params = spaces.flatten_params(result.config or {}, keys)
        if all(v is None for v in params.values()):
            # A restored trial that errored before the restore has no config on its Result; Tune kept its params.json.
            params = spaces.flatten_params(_saved_params(result), keys)
        trials.append(TrialRecord(trial_id=trial_id, params=params,
                                  reports=reports, status=status, error=error, run_uri=run_uri,
                                  export_uri=export_uri if status == FINISHED else None))
    return sorted(trials, key=lambda t: t.trial_id)


def final_run_name(result, sweep_name: str, trial_id: str) -> str:
    """The run a trial trained last: its last PBT pointer's run, else `<sweep>-<trial_id>`."""
    if result.checkpoint is not None:
        from llm_platform.tune.pbt import read_pointer

        try:
            pointer = read_pointer(result.checkpoint)
        except OSError:  # a checkpoint folder that is gone leaves the default name, as without PBT
            pointer = None
        if pointer:
            return pointer["run_name"]
    return run_name(sweep_name, trial_id)
