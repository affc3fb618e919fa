"""`llm-platform data`: corpus URIs -> dataset (token shards + tokenizer + manifest)."""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


@stage_main("data")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import cluster, storage
    from llm_platform.data.pipeline import build_dataset

    storage.configure(cfg.storage)
    # Ray starts only if there is work: re-running a finished data stage answers at once.
    result = build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, connect=lambda: cluster.connect(cfg.cluster))
    print(result.summary())
