# ruff: noqa: F821, B018 - a list of names for vulture to count as used, never imported or run
"""Names vulture reports as unused that are used, only by name, by a framework or a file format (`make lint` passes
this file to vulture beside the code). Never imported or run: each name below counts as used wherever it is
defined, so list a name here only for the reason its group gives, and prefer deleting code that is really dead.
"""

_: object  # vulture only reads the names below; `_.<name>` marks <name> used

# Enum members chosen by name from YAML and the command line (`train.schedule=linear`), never spelt in code.
_.sft, _.mlm, _.ipo, _.jsonl  # config/choices.py: objectives, data formats, preference losses
_.linear, _.constant, _.fifo, _.optuna  # schedules, Tune schedulers and searchers
_.fp32, _.bfloat16, _.float16, _.eager  # precisions, attention implementations
_.SPREAD, _.STRICT_PACK, _.STRICT_SPREAD  # Ray placement strategies (the value is passed to Ray)
_.integrated_gradients  # explain methods

# Config fields read by a name built at run time (`getattr(cfg, f"max_top_{n}gram_char_frac")`) or by dict key.
_.max_top_2gram_char_frac, _.max_top_3gram_char_frac, _.max_top_4gram_char_frac
_.max_dup_5gram_char_frac, _.max_dup_6gram_char_frac, _.max_dup_7gram_char_frac, _.max_dup_8gram_char_frac
_.max_dup_9gram_char_frac, _.max_dup_10gram_char_frac
_.mlflow_experiment  # train/tracking.py reads the train node as a dict

# Fields of the dataset manifest (data/manifest.py): a JSON record that other stages, tools and people read by key.
_.num_records, _.remainder_tokens, _.format_version, _.timings_s, _.created_at, _.resumed_phases
_.filter_examples

# Attributes set on other libraries' objects, which those libraries read.
_.enable_progress_bars, _.enable_operator_progress_bars  # Ray Data's DataContext
_.pre_tokenizer, _.decoder, _.post_processor, _.padding_side  # Hugging Face tokenizers
_.use_cache  # Hugging Face model configs
_.should_exit  # uvicorn.Server
_.protocol_version, _.close_connection, _.daemon_threads  # http.server (tests' fake servers)

# Methods and arguments a framework calls by name or position.
_.check_health  # Ray Serve: a deployment's health check
_.build_app  # Ray Serve: the RayService application builder named by cluster/ray-service.*.yaml
_.middlewares  # Ray Serve: the HTTP proxy's callback (serve/proxy.py, set through the environment)
_.on_trial_start, _.on_trial_error, _.iteration  # Ray Tune callbacks (and their arguments)
_.after_report, _.run_context  # Ray Train callbacks
_.stop_all  # Ray Tune: Stopper
_.log_engine_initialized, _.engine_index, _.engine_idx, _.iteration_stats, _.mm_cache_stats  # vLLM stat loggers
_.redoc, _.monitoring  # FastAPI route handlers (registered by decorator)
_._prompt, _._suffix  # pydantic field validators (registered by decorator)
_.__getattr__  # a module's lazy attributes (PEP 562)
_.frame  # signal handlers take (signum, frame)
_.do_GET, _.do_POST, _.do_PUT, _.do_HEAD, _.do_DELETE, _.log_message  # http.server handlers (tests' fake servers)
_.on_step_end  # transformers TrainerCallback (benchmarks)

# pytest and Hypothesis: hooks, marks, fixtures requested by argument name, state-machine rules.
_.pytestmark
_.pytest_configure, _.pytest_collection_modifyitems, _.pytest_runtest_logreport, _.pytest_terminal_summary
_.another_ray_instance, _.one_process_group, _.vllm_service, _.no_tensorboard  # fixtures used for their effect
_.teardown, _.first_run, _.rerun, _.latest_got_there_through_a_passing_gate  # RuleBasedStateMachine

# Arguments of fakes that keep the signature of the function they replace.
_.key_env, _.include_defaults
