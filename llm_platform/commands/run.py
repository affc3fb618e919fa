"""`llm-platform run`: data -> train (or tune) -> register -> eval -> serve, then a sample query.

`--from STAGE` / `--until STAGE` select stages (same as `run.from_stage=` / `run.until_stage=`); each stage is
skipped when its output for the same inputs and config exists, so a second run is fast. It keeps serving until
interrupted unless `run.keep_serving=false`.
"""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


@stage_main("run")
def main(cfg: PlatformConfig) -> None:
    import logging
    import time

    from llm_platform import cluster, storage
    from llm_platform.runner import run_all
    from llm_platform.serve import ingress

    storage.configure(cfg.storage)
    ingress.prepare(cfg.serve.ingress)  # a local Ray started next runs Serve with the ingress the serve stage wants
    cluster.connect(cfg.cluster)
    summary = run_all(cfg)
    print(summary.table())
    print("lineage: " + " -> ".join(f"{k}={v}" for k, v in summary.chain.items() if v))
    if not (summary.endpoint and cfg.run.keep_serving):
        return
    print(f"serving at {summary.endpoint}/v1 (Ctrl-C stops); try: llm-platform query \"{cfg.run.query}\" "
          f"--url {summary.endpoint}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from llm_platform.serve.app import undeploy

        logging.getLogger("llm_platform.run").info("stopping the endpoint")
        undeploy(cfg.serve)
