"""`llm-platform tune`: dataset + search space -> sweep (`sweeps/<name>/`) and the winner in the registry.

The sweep registers its winner without moving LATEST (`run_sweep`); this command, which evaluates nothing, then
points LATEST at it at once, as `llm-platform train train.register_as=...` does for its run. `llm-platform run
run.use_tune=true` instead promotes the winner only after its evaluation passes the gate (runner/).
"""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


@stage_main("tune")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import cluster, storage
    from llm_platform.commands.train import check_plan, resolve_dataset_uri
    from llm_platform.tune.driver import run_sweep
    from llm_platform.tune.space import parse_space

    storage.configure(cfg.storage)
    parse_space(cfg.tune.space)  # a bad key fails here, before Ray starts
    dataset_uri = resolve_dataset_uri(cfg)
    check_plan(cfg, dataset_uri)  # the base config's GPU memory plan, as `train` checks it
    cluster.connect(cfg.cluster)
    result = run_sweep(cfg.tune, cfg.model, cfg.train, cfg.scaling, dataset_uri, cfg.storage.root,
                       prices=cfg.plan.prices)
    print(result.table)
    print(f"sweep: {result.uri}")
    winner = result.record.get("winner") or {}
    print(f"winner: {winner.get('trial_id')} {cfg.tune.metric}={winner.get('value')} params={winner.get('params')}")
    version = result.record.get("model_version")
    if version:
        print(f"registered: registry:{version['name']}/{version['version']} ({version['uri']})")
    if result.model_version is not None:  # registered just now (a sweep finished earlier promoted then)
        from llm_platform import registry

        registry.promote(cfg.storage.root, result.model_version.name, result.model_version.version)
        print(f"LATEST -> {result.model_version.version}")
