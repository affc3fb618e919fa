"""Search space: the YAML syntax, validation against the config schema, and applying a trial's params."""

import pytest
from hydra.errors import ConfigCompositionException

from llm_platform.config import compose
from llm_platform.config.choices import Schedule
from llm_platform.config.model import LoraConfig, ModelConfig
from llm_platform.config.train import CheckpointConfig, ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.tune.checks import check, expected_trials, reports_per_trial
from llm_platform.tune.schedulers import make_scheduler
from llm_platform.tune.space import TrialConfig, apply_params, flatten_params, parse_space, to_param_space


def test_every_distribution_dotted_nested_and_string_forms():
    dims = parse_space({
        "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "train": {"optimizer": {"weight_decay": {"uniform": [0, 0.2]}, "warmup_steps": "randint(0, 10)"}},
        "train.optimizer.schedule": {"choice": ["cosine", "linear"]},
        "model.hidden_size": "grid(32, 64)",
        "train.optimizer.grad_clip": 0.5,
    })
    by_key = {d.key: d for d in dims}
    assert set(by_key) == {"train.optimizer.lr", "train.optimizer.weight_decay", "train.optimizer.warmup_steps",
                           "train.optimizer.schedule", "model.hidden_size", "train.optimizer.grad_clip"}
    assert (by_key["train.optimizer.lr"].kind, by_key["train.optimizer.lr"].args) == ("loguniform", (1e-4, 1e-2))
    warmup = by_key["train.optimizer.warmup_steps"]
    assert (warmup.kind, warmup.args) == ("randint", (0, 10))
    assert by_key["model.hidden_size"].args == (32, 64) and by_key["model.hidden_size"].kind == "grid"
    assert by_key["train.optimizer.grad_clip"].kind == "fixed"

    from ray.tune.search.sample import Categorical, Float, Integer

    space = to_param_space(dims)
    optimizer = space["train"]["optimizer"]
    assert isinstance(optimizer["lr"], Float) and optimizer["lr"].lower == 1e-4
    assert isinstance(optimizer["warmup_steps"], Integer) and optimizer["warmup_steps"].upper == 10
    assert isinstance(optimizer["schedule"], Categorical)
    assert space["model"]["hidden_size"] == {"grid_search": [32, 64]}
    assert optimizer["grad_clip"] == 0.5


@pytest.mark.parametrize("spec, needle", [
    ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "train.lrr"),
    ({"trian.lr": {"uniform": [0, 1]}}, "trian.lr"),
    ({"model.lora.rnk": {"choice": [4, 8]}}, "model.lora.rnk"),
    ({"serve.port": {"choice": [1, 2]}}, "serve.port"),
    ({"model.lora": {"choice": [1]}}, "model.lora"),
    ({"train.optimizer.lr": {"lognormal": [1, 2]}}, "lognormal"),
    ({"train.optimizer.lr": {"loguniform": [0, 1e-2]}}, "positive"),
    ({"train.optimizer.lr": {"uniform": [0.2, 0.1]}}, "lower < upper"),
    ({"train.max_steps": {"uniform": [10, 20]}}, "integer"),
    ({"train.max_steps": {"choice": [10, "many"]}}, "'many'"),
    ({"train.optimizer.schedule": {"choice": ["cosine", 3]}}, "train.optimizer.schedule"),
    ({"train.optimizer.warmup_steps": {"randint": [0.5, 3]}}, "integers"),
    ({}, "empty"),
])
def test_bad_space_names_the_key(spec, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_space(spec)
    assert needle in str(e.value)


def test_shipped_spaces_compose_and_parse():
    for preset in ("default", "debug"):
        cfg = compose("tune", [f"tune={preset}", "debug=smoke"])
        assert parse_space(cfg.tune.space)
        check(cfg.tune, cfg.train, cfg.scaling, parse_space(cfg.tune.space))


def test_apply_params_overrides_only_the_named_keys():
    base = TrialConfig(model=ModelConfig(hidden_size=64, lora=LoraConfig(rank=8)), train=TrainConfig(),
                       scaling=ScalingConfig())
    params = flatten_params({"train": {"optimizer": {"lr": 0.01}}, "model": {"lora": {"rank": 4}}},
                            ["train.optimizer.lr", "model.lora.rank"])
    assert params == {"train.optimizer.lr": 0.01, "model.lora.rank": 4}
    out = apply_params(base, params)
    assert isinstance(out.train, TrainConfig) and isinstance(out.model, ModelConfig)
    assert out.train.optimizer.lr == 0.01 and out.model.lora.rank == 4 and out.model.hidden_size == 64
    assert base.train.optimizer.lr == TrainConfig().optimizer.lr and base.model.lora.rank == 8  # base not mutated
    assert out.scaling is base.scaling  # an untouched group is passed on as it is


def test_apply_params_restores_a_choice_as_its_enum():
    # Tune hands a sampled choice over as its string; the trial's launch must get the schema's Enum member.
    base = TrialConfig(model=ModelConfig(), train=TrainConfig(), scaling=ScalingConfig())
    out = apply_params(base, {"train.optimizer.schedule": "linear"})
    assert out.train.optimizer.schedule is Schedule.linear


def test_apply_params_refuses_an_unknown_key_or_value_naming_it():
    base = TrialConfig(model=ModelConfig(), train=TrainConfig(), scaling=ScalingConfig())
    with pytest.raises(ConfigError, match=r"unknown config key train\.optimizer\.lrr \(did you mean "
                                          r"train\.optimizer\.lr\?\)"):
        apply_params(base, {"train.optimizer.lrr": 0.01})
    with pytest.raises(ConfigError, match="train.optimizer.schedule='cosin': must be one of cosine, linear"):
        apply_params(base, {"train.optimizer.schedule": "cosin"})
    with pytest.raises(ConfigError, match="data.seq_len"):
        apply_params(base, {"data.seq_len": 64})


def test_asha_max_t_counts_reports_and_checks_refuse_bad_sweeps():
    assert reports_per_trial(20, 5, 10) == 4
    assert reports_per_trial(21, 5, 10) == 5  # the end always reports
    train = TrainConfig(max_steps=20, eval_interval_steps=5, checkpoint=CheckpointConfig(interval_steps=10))
    dims = parse_space({"train.max_steps": {"choice": [20, 40]}})
    assert make_scheduler(TuneConfig(), train, dims)._max_t == 9  # one beyond the longest trial's 8 reports
    ok = parse_space({"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigCompositionException, match="tune.scheduler"):  # an Enum: refused at compose time
        compose("tune", ["tune.scheduler=hyperband"])
    with pytest.raises(ConfigError, match="grid"):
        check(TuneConfig(search="optuna"), train, ScalingConfig(),
              parse_space({"train.optimizer.lr": "grid(0.1, 0.2)"}))
    with pytest.raises(ConfigError, match="train.checkpoint.interval_steps"):
        check(TuneConfig(), TrainConfig(max_steps=20, eval_interval_steps=10,
                                        checkpoint=CheckpointConfig(interval_steps=5)),
              ScalingConfig(), ok)
    assert type(make_scheduler(TuneConfig(scheduler="pbt"), train, ok)).__name__ == "PopulationBasedTraining"


def test_expected_trials_multiplies_grid_axes():
    dims = parse_space({"train.optimizer.lr": "grid(0.1, 0.2, 0.3)", "model.hidden_size": "grid(32, 64)",
                        "train.optimizer.weight_decay": "uniform(0, 0.1)"})
    assert expected_trials(TuneConfig(num_samples=2), dims) == 12
