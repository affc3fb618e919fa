"""Tune searches and schedulers beyond random + ASHA (test_tune_sweep.py), on the local Ray with a tiny GPT-2:

- Optuna TPE (`tune.search=optuna`): the trials train exactly the configs the seeded searcher suggests (the same
  suggestions a fresh searcher with `tune.seed` makes), inside the space, and the best is registered.
- PBT (`tune.scheduler=pbt`, synchronous so the exploit happens at a known report): at the perturbation the worse
  trial is cloned from the better one: it restarts with its mutated learning rate as a new run whose
  `train.checkpoint.resume_from` is the better trial's step-4 run checkpoint, and continues from step 5.
- PBT's config checks (no cluster).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from fixtures.training import make_dataset

from llm_platform import registry
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.tune.checks import check
from llm_platform.tune.driver import run_sweep
from llm_platform.tune.schedulers import make_scheduler, make_search
from llm_platform.tune.space import flatten_params, parse_space, to_param_space

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
# Reports (validation + checkpoint) at steps 2 and 4.
TRAIN = TrainConfig(max_steps=4, micro_batch_size=4, log_interval_steps=2, eval_interval_steps=2, eval_batches=1,
                    shuffle_buffer_rows=0, checkpoint=CheckpointConfig(interval_steps=2, keep_latest=3),
                    optimizer=OptimizerConfig(warmup_steps=1, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))
SCALING = ScalingConfig(num_workers=1, cpus_per_worker=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


def run_lineage(trial) -> dict:
    return json.load(open(os.path.join(trial.run_uri, "lineage.json")))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_optuna_sweep_trains_the_suggested_configs(ray_session, dataset, tmp_path):
    root = str(tmp_path / "store")
    cfg = TuneConfig(name="optuna-sweep", space={"train.optimizer.lr": "loguniform(1e-4, 1e-2)",
                                                 "train.optimizer.warmup_steps": {"randint": [0, 3]}},
                     num_samples=2, search="optuna", seed=11, scheduler="fifo", max_concurrent_trials=2,
                     register_as="tiny-optuna", verbose=0)
    result = run_sweep(cfg, MODEL, TRAIN, SCALING, dataset, root)

    # The seeded TPE's first two suggestions (both made before any trial reports) are what the trials trained.
    keys = ["train.optimizer.lr", "train.optimizer.warmup_steps"]
    searcher = make_search(cfg)
    searcher.set_search_properties(cfg.metric, cfg.mode, to_param_space(parse_space(cfg.space)))
    expected = sorted((flatten_params(searcher.suggest(f"t{i}"), keys) for i in range(2)),
                      key=lambda p: p["train.optimizer.lr"])
    trials = sorted(result.trials, key=lambda t: t.params["train.optimizer.lr"])
    assert [t.params for t in trials] == expected
    for trial in trials:
        assert trial.status == "finished" and [r["step"] for r in trial.reports] == [2, 4]
        config = run_lineage(trial)["run"]["config"]["train"]["optimizer"]
        assert (config["lr"], config["warmup_steps"]) == (trial.params["train.optimizer.lr"],
                                                          trial.params["train.optimizer.warmup_steps"])
    best = min(trials, key=lambda t: t.last("val/loss"))
    assert result.winner.trial_id == best.trial_id
    assert result.record["search"] == "optuna"
    assert result.model_version.lineage["sweep"]["trial_id"] == best.trial_id


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pbt_clones_the_better_trial_into_the_worse(ray_session, dataset, tmp_path):
    root = str(tmp_path / "store")
    # Reports at steps 2, 4, 6 (iterations 1-3); the only perturbation is at iteration 2 (step 4).
    train = dataclasses.replace(TRAIN, max_steps=6)
    cfg = TuneConfig(name="pbt-sweep", space={"train.optimizer.lr": {"grid": [3e-3, 1e-5]}}, num_samples=1,
                     scheduler="pbt", perturbation_interval_reports=2, pbt_synch=True, max_concurrent_trials=2,
                     register_as="tiny-pbt", verbose=0)
    result = run_sweep(cfg, MODEL, train, SCALING, dataset, root)

    assert len(result.trials) == 2 and all(t.status == "finished" for t in result.trials), result.table
    at_perturbation = {t.trial_id: next(r["val/loss"] for r in t.reports if r["training_iteration"] == 2)
                       for t in result.trials}
    better = min(at_perturbation, key=at_perturbation.get)
    worse = max(at_perturbation, key=at_perturbation.get)
    assert better != worse
    by_id = {t.trial_id: t for t in result.trials}

    # The worse trial continued from the better one's step-4 checkpoint, as a new run, with its own mutated lr.
    cloned = by_id[worse]
    assert os.path.basename(cloned.run_uri) == f"pbt-sweep-{worse}-from-{better}-4"
    lineage = run_lineage(cloned)
    assert lineage["run"]["config"]["train"]["checkpoint"]["resume_from"] == os.path.join(
        root, "runs", f"pbt-sweep-{better}", "checkpoint_00000004")
    assert lineage["run"]["config"]["train"]["optimizer"]["lr"] == cloned.params["train.optimizer.lr"] in (3e-3, 1e-5)
    steps = [json.loads(line)["step"] for line in open(os.path.join(cloned.run_uri, "metrics.jsonl"))]
    assert steps and min(steps) > 4, steps  # no step before the clone's checkpoint was trained again
    assert [r["training_iteration"] for r in cloned.reports][-1] == 3 and cloned.reports[-1]["step"] == 6

    # Synchronous PBT paused the better trial too: it went on from its own step-4 checkpoint.
    kept = by_id[better]
    assert run_lineage(kept)["run"]["config"]["train"]["checkpoint"]["resume_from"] == os.path.join(
        root, "runs", f"pbt-sweep-{better}", "checkpoint_00000004")
    assert kept.params["train.optimizer.lr"] == run_lineage(kept)["run"]["config"]["train"]["optimizer"]["lr"]

    # The winner is registered from its final run.
    winner = min(result.trials, key=lambda t: t.last("val/loss"))
    assert result.winner.trial_id == winner.trial_id
    version = registry.get(root, "tiny-pbt", result.model_version.version)
    assert version.lineage["run"]["name"] == os.path.basename(winner.run_uri)
    assert os.path.exists(os.path.join(version.uri, "model.safetensors"))


def test_pbt_mutates_only_optimizer_knobs_and_refuses_sweeps_it_cannot_clone():
    dims = parse_space({"train.optimizer.lr": "loguniform(1e-4, 1e-2)",
                        "train.optimizer.schedule": "choice(cosine, linear)", "model.hidden_size": "choice(32, 64)"})
    ok = TrainConfig(max_steps=20, eval_interval_steps=10,
                     checkpoint=CheckpointConfig(interval_steps=10, keep_latest=2))
    check(TuneConfig(scheduler="pbt"), ok, ScalingConfig(), dims)
    scheduler = make_scheduler(TuneConfig(scheduler="pbt", perturbation_interval_reports=3), ok, dims)
    assert type(scheduler).__name__ == "PopulationBasedTraining" and scheduler._perturbation_interval == 3
    mutations = scheduler._hyperparam_mutations
    optimizer = mutations["train"]["optimizer"]
    assert set(mutations) == {"train"} and set(mutations["train"]) == {"optimizer"}  # not the model's shape
    assert set(optimizer) == {"lr", "schedule"}
    assert optimizer["schedule"] == ["cosine", "linear"] and optimizer["lr"].lower == 1e-4

    refused = [
        (TuneConfig(scheduler="pbt"), dataclasses.replace(ok, checkpoint=CheckpointConfig(interval_steps=10,
                                                                                          keep_latest=1)),
         dims, "train.checkpoint.keep_latest=1"),
        (TuneConfig(scheduler="pbt"), dataclasses.replace(ok, max_steps=20, eval_interval_steps=10,
                                                          checkpoint=CheckpointConfig(interval_steps=4, keep_latest=2)),
         dims, "train.eval_interval_steps=10 a multiple of train.checkpoint.interval_steps=4"),
        (TuneConfig(scheduler="pbt"), ok, parse_space({"model.hidden_size": "choice(32, 64)"}), "train.optimizer.lr"),
        (TuneConfig(scheduler="pbt", perturbation_interval_reports=0), ok, dims, "tune.perturbation_interval"),
    ]
    for tune_cfg, train, space, needle in refused:
        with pytest.raises(ConfigError) as e:
            check(tune_cfg, train, ScalingConfig(), space)
        assert needle in str(e.value)

    # The shipped preset passes these checks with the smoke debug config.
    from llm_platform.config import compose

    cfg = compose("tune", ["tune=pbt", "debug=smoke"])
    assert cfg.tune.scheduler == "pbt"
    check(cfg.tune, cfg.train, cfg.scaling, parse_space(cfg.tune.space))
