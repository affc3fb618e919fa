"""`llm-platform run`: data -> train (or tune) -> register -> eval -> promote -> serve, then a sample query.

Only the promote stage moves LATEST, after a passing gate on an evaluation of that version (runner/).

`--from STAGE` / `--until STAGE` select stages (same as `run.from_stage=` / `run.until_stage=`); each stage is
skipped when its output for the same inputs and config exists, so a second run is fast. It keeps serving until
interrupted unless `run.keep_serving=false`.
"""

from llm_platform.commands import stage_main, wait_until_interrupted
from llm_platform.config import PlatformConfig


def preflight(cfg: PlatformConfig) -> None:
    """Every check of the selected stages that needs no earlier stage's output, before the first one starts: a bad
    train or serve key fails before the data stage has written anything."""
    from llm_platform.commands.train import check_plan
    from llm_platform.config.choices import Stage
    from llm_platform.runner import selected_stages

    todo = selected_stages(cfg)
    if Stage.data in todo:
        from llm_platform.data.pipeline import validate

        validate(cfg.data, cfg.tokenizer)
    if Stage.train in todo:
        from llm_platform.train.checks import check_config

        check_config(cfg.model, cfg.train, cfg.scaling)
        if cfg.run.use_tune:
            from llm_platform.tune.space import parse_space

            parse_space(cfg.tune.space)
        check_plan(cfg, None)  # GPU memory, from the data config's sequence length
    # serve: `serve.http.ingress` is an Enum, refused at compose time; nothing is left to check before the run.


@stage_main("run")
def main(cfg: PlatformConfig) -> None:
    import logging

    from llm_platform import cluster, storage
    from llm_platform.runner import run_all
    from llm_platform.serve import ingress

    storage.configure(cfg.storage)
    preflight(cfg)
    # A local Ray started later runs Serve with the ingress the serve stage wants.
    ingress.prepare(cfg.serve.http.ingress)
    # Ray starts when a stage first needs it: a slice whose stages are all done answers at once.
    summary = run_all(cfg, connect=lambda: cluster.connect(cfg.cluster))
    print(summary.table())
    print("lineage: " + " -> ".join(f"{k}={v}" for k, v in summary.chain.items() if v))
    if not (summary.endpoint and cfg.run.keep_serving):
        return
    print(f"serving at {summary.endpoint}/v1 (Ctrl-C stops); try: llm-platform query \"{cfg.run.query}\" "
          f"--url {summary.endpoint}", flush=True)  # flushed: a log file or a pipe sees it before the wait
    try:
        wait_until_interrupted()  # Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        from llm_platform.serve.app import undeploy

        logging.getLogger("llm_platform.run").info("stopping the endpoint")
        undeploy(cfg.serve)
