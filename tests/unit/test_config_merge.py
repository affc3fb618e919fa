"""config.merge: changes applied onto the typed dataclasses (a Tune trial's params, a RayService's build_app args),
Enums restored from their strings, unknown keys and bad values refused naming the full key."""

import dataclasses
import pickle

import pytest

from llm_platform.config.choices import Ingress, MixedPrecision, Parallelism, Schedule, WeightDtype
from llm_platform.config.merge import merge, nest
from llm_platform.config.serve import ServeConfig
from llm_platform.config.train import OptimizerConfig, TrainConfig
from llm_platform.errors import ConfigError


def test_nest_reads_dotted_and_nested_keys_alike():
    assert nest({"a.b": 1, "a": {"c": 2}, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert nest({"a": {"b.c": 1}}) == {"a": {"b.c": 1}}  # a key inside a mapping is a name, not a path
    with pytest.raises(ConfigError, match="'a.b.c'"):
        nest({"a.b": 1, "a.b.c": 2})


def test_trial_params_land_on_the_dataclasses_as_enums():
    base = TrainConfig(max_steps=10, optimizer=OptimizerConfig(lr=1e-3))
    out = merge(base, {"optimizer.lr": 0.01, "optimizer.schedule": "linear", "parallelism.strategy": "ddp",
                       "parallelism": {"mixed_precision": "fp32"}, "optimizer.warmup_steps": 3}, prefix="train.")
    assert isinstance(out, TrainConfig) and isinstance(out.optimizer, OptimizerConfig)
    assert out.optimizer.schedule is Schedule.linear  # the string Tune sampled, back as the schema's member
    assert out.parallelism.strategy is Parallelism.ddp and out.parallelism.mixed_precision is MixedPrecision.fp32
    assert out.optimizer.lr == 0.01 and out.optimizer.warmup_steps == 3 and out.max_steps == 10  # the rest kept
    assert base.optimizer.lr == 1e-3 and base.optimizer.schedule is Schedule.cosine  # the base is not modified
    assert pickle.loads(pickle.dumps(out)) == out  # what crosses a Ray boundary: the typed object itself


def test_an_int_becomes_a_float_field_but_a_fraction_is_no_int():
    assert merge(TrainConfig(), {"optimizer.lr": 1}, prefix="train.").optimizer.lr == 1.0
    with pytest.raises(ConfigError, match="train.max_steps=0.5"):
        merge(TrainConfig(), {"max_steps": 0.5}, prefix="train.")
    with pytest.raises(ConfigError, match="train.max_steps='ten'"):
        merge(TrainConfig(), {"max_steps": "ten"}, prefix="train.")


def test_unknown_keys_and_bad_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key train\.optimizer\.lrr \(did you mean "
                                          r"train\.optimizer\.lr\?\)"):
        merge(TrainConfig(), {"optimizer.lrr": 0.01}, prefix="train.")
    with pytest.raises(ConfigError, match=r"unknown config key train\.no_such_key:"):
        merge(TrainConfig(), {"no_such_key": 1}, prefix="train.")
    with pytest.raises(ConfigError, match="train.optimizer.schedule='cosin': must be one of cosine, linear, constant"):
        merge(TrainConfig(), {"optimizer.schedule": "cosin"}, prefix="train.")
    with pytest.raises(ConfigError, match=r"train\.optimizer=3: train\.optimizer is a group"):
        merge(TrainConfig(), {"optimizer": 3}, prefix="train.")


def test_a_dict_field_takes_new_entries_and_other_keys_keep_their_values():
    cfg = merge(ServeConfig(), {"model": "/m", "engine.vllm.lora_adapters": {"sql": "/adapters/sql"}}, prefix="serve.")
    assert cfg.model == "/m" and cfg.engine.vllm.lora_adapters == {"sql": "/adapters/sql"}
    defaults = ServeConfig()
    assert cfg.http == defaults.http and dataclasses.replace(cfg.engine, vllm=defaults.engine.vllm) == defaults.engine


def test_build_app_refuses_a_bad_key_or_value_naming_it():
    from llm_platform.serve.app import build_app

    with pytest.raises(ConfigError, match=r"unknown config key serve\.engine\.max_batch \(did you mean "
                                          r"serve\.engine\.max_batch_size\?\)"):
        build_app({"model": "/nowhere", "engine": {"max_batch": 4}})
    with pytest.raises(ConfigError, match="serve.http.ingress='haproxy': must be one of proxy, direct"):
        build_app({"model": "/nowhere", "http": {"ingress": "haproxy"}})
    with pytest.raises(ConfigError, match=r"serve\.deployment\.num_replicas='two'"):
        build_app({"model": "/nowhere", "deployment": {"num_replicas": "two"}})


def test_build_app_gives_the_replicas_the_typed_config():
    from llm_platform.serve.app import build_app

    app = build_app({"model": "/nowhere", "http": {"ingress": "direct"}, "engine": {"dtype": "bfloat16"},
                     "storage_root": "/tmp/root"})
    cfg, storage_root = app._bound_deployment.init_args[:2]
    assert isinstance(cfg, ServeConfig) and cfg.http.ingress is Ingress.direct and storage_root == "/tmp/root"
    assert cfg.engine.dtype is WeightDtype.bfloat16


def test_names_inside_a_dict_field_keep_their_dots():
    """Only the dotted keys given at the top are paths: a key inside a dict field (a LoRA adapter `tuned.v2`) is a
    name, dots and all, and is checked as a name, not split into sub-keys."""
    from llm_platform.config.serve import ServeConfig

    cfg = merge(ServeConfig(), {"engine": {"vllm": {"lora_adapters": {"tuned.v2": "registry:a/1"}}},
                                "engine.vllm.max_loras": 2}, prefix="serve.")
    assert cfg.engine.vllm.lora_adapters == {"tuned.v2": "registry:a/1"} and cfg.engine.vllm.max_loras == 2
