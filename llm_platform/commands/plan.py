"""`llm-platform plan`: parameters, FLOPs per token, memory per device, time and cost of a training config (or, with
`plan.sweep=true`, of the `tune` sweep over it), on-demand and spot at the dated prices of `plan.prices`.

Reads the same config tree as `train` (same overrides), and never starts Ray. Exit code 2 when the config does not
fit, unless `plan.force=true`.
"""

from llm_platform.commands import stage_main
from llm_platform.config import PlatformConfig


@stage_main("plan")
def main(cfg: PlatformConfig) -> None:
    from llm_platform import storage
    from llm_platform.errors import ConfigError
    from llm_platform.train.plan import make_plan
    from llm_platform.tune.space import sweep_size

    storage.configure(cfg.storage)  # model.pretrained may be a registry: or s3:// checkpoint whose config.json it reads

    # The vocab follows the tokenizer: a trained BPE's configured size, unless the model pins one.
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    plan = make_plan(cfg.model, cfg.train, cfg.scaling, cfg.plan, seq_len=cfg.data.seq_len, vocab_size=vocab,
                     storage_root=cfg.storage.root, sweep=sweep_size(cfg.tune) if cfg.plan.sweep else None)
    print(f"model {cfg.model.name} ({cfg.model.family}), {cfg.train.parallelism.strategy}, micro-batch "
          f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, grad accum {cfg.train.grad_accum_steps}")
    print(plan.table())
    if not plan.fits and not cfg.plan.force:
        raise ConfigError("the config does not fit: " + "; ".join(plan.problems))
