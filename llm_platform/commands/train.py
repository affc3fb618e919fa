"""`llm-platform train`: dataset [+ base model] -> run (sharded checkpoints, metrics, HF export, lineage)."""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


def resolve_dataset_uri(cfg: PlatformConfig) -> str:
    """`train.dataset`, else the finished output of the data stage for the same data and tokenizer config."""
    from llm_platform.errors import DataError

    if cfg.train.dataset:
        return cfg.train.dataset
    try:
        from llm_platform.data.pipeline import resolve_dataset
    except ImportError:  # the data stage is not installed in this checkout
        uri = None
    else:
        uri = resolve_dataset(cfg.data, cfg.tokenizer, cfg.storage.root)
    if not uri:
        raise DataError(f"no finished dataset for data.name={cfg.data.name!r} with this data and tokenizer config "
                        f"under {cfg.storage.root}: run `llm-platform data` with the same overrides first, or set "
                        f"train.dataset=<dataset folder>")
    return uri


def check_plan(cfg: PlatformConfig, dataset_uri: str | None) -> None:
    """On GPUs, refuse a config whose memory estimate does not fit the device (unless plan.force=true).

    Without a dataset yet (`llm-platform run` checks before its data stage), the data and tokenizer configs give
    the sequence length and vocabulary size.
    """
    import logging

    from llm_platform.errors import ConfigError
    from llm_platform.train.plan import make_plan

    if not cfg.scaling.use_gpu:
        return
    if dataset_uri:
        from llm_platform.data.dataset import open_dataset

        info = open_dataset(dataset_uri)
        seq_len, vocab_size = info.seq_len, info.vocab_size
    else:
        seq_len, vocab_size = cfg.data.seq_len, cfg.tokenizer.vocab_size
    plan_cfg = cfg.plan
    if cfg.scaling.gpu_type:
        plan_cfg.gpu_type = cfg.scaling.gpu_type
    plan = make_plan(cfg.model, cfg.train, cfg.scaling, plan_cfg, seq_len=seq_len, vocab_size=vocab_size,
                     storage_root=cfg.storage.root)
    if not plan.fits:
        if not cfg.plan.force:
            raise ConfigError("the plan does not fit (plan.force=true launches anyway): " + "; ".join(plan.problems))
        logging.getLogger("llm_platform.train").warning("launching despite the plan: %s", "; ".join(plan.problems))


@stage_main("train")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import cluster, storage
    from llm_platform.train.checks import preflight
    from llm_platform.train.launcher import launch, register_run

    storage.configure(cfg.storage)
    dataset_uri = resolve_dataset_uri(cfg)
    preflight(cfg.model, cfg.train, cfg.scaling, dataset_uri, cfg.storage.root)  # bad config: fail before Ray
    check_plan(cfg, dataset_uri)
    # Ray starts only if there is training to do: a run already finished with this config answers at once.
    result = launch(cfg.model, cfg.train, cfg.scaling, dataset_uri, cfg.storage.root,
                    connect=lambda: cluster.connect(cfg.cluster), prices=cfg.plan.prices)
    if cfg.train.register_as:  # a run registered under this name before is not registered twice
        register_run(cfg.storage.root, cfg.train.register_as, result)
    shown = {k: v for k, v in sorted(result.metrics.items()) if k.startswith(("train/loss", "val/", "perf/"))}
    print(f"run: {result.run_uri}\nexport: {result.export_uri}\ncheckpoint: {result.checkpoint_uri}")
    for key, value in shown.items():
        print(f"  {key} = {value:.6g}" if isinstance(value, float) else f"  {key} = {value}")
