"""`llm-platform data`: corpus URIs -> dataset (token shards + tokenizer + manifest)."""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


@stage_main("data")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import cluster, storage
    from llm_platform.data.pipeline import build_dataset

    storage.configure(cfg.storage)
    cluster.connect(cfg.cluster)
    result = build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root)
    print(result.summary())
