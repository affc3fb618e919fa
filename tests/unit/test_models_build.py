"""HF models from ModelConfig, LoRA adapters, and the blocks that FSDP2 shards."""

import pytest
import torch

from llm_platform.config.model import LoraConfig, ModelConfig
from llm_platform.errors import ConfigError
from llm_platform.models.build import build_model, merge_lora, transformer_blocks

SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


@pytest.mark.parametrize("family,blocks", [("gpt2", 2), ("llama", 2), ("t5", 4), ("bert", 2)])
def test_each_family_builds_from_config(family, blocks):
    cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    model = build_model(cfg, 300, SPECIAL, seed=3)
    assert model.config.vocab_size == 300
    assert len(transformer_blocks(model)) == blocks
    again = build_model(cfg, 300, SPECIAL, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_bad_shapes_name_the_key():
    with pytest.raises(ConfigError, match="model.hidden_size"):
        build_model(ModelConfig(hidden_size=30, num_heads=4), 300, SPECIAL)
    with pytest.raises(ConfigError, match="model.family"):
        build_model(ModelConfig(family="rnn"), 300, SPECIAL)


def test_an_untied_t5_is_refused_not_silently_tied():
    """transformers 5 ties T5's head to its embedding whatever `tie_word_embeddings` says: asking for an untied T5
    names the key instead of training a tied one."""
    with pytest.raises(ConfigError, match="model.tie_word_embeddings"):
        build_model(ModelConfig(family="t5", num_layers=1, hidden_size=32, num_heads=4, tie_word_embeddings=False),
                    300, SPECIAL)
    tied = build_model(ModelConfig(family="t5", num_layers=1, hidden_size=32, num_heads=4), 300, SPECIAL)
    assert tied.lm_head.weight.data_ptr() == tied.shared.weight.data_ptr()
    untied = build_model(ModelConfig(family="gpt2", num_layers=1, hidden_size=32, num_heads=4,
                                     tie_word_embeddings=False), 300, SPECIAL)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_lora_trains_only_adapters_and_merges_into_plain_weights():
    cfg = ModelConfig(family="llama", hidden_size=32,
                      lora=LoraConfig(enabled=True, rank=4, target_modules=["q_proj", "v_proj", "c_attn"]))
    model = build_model(cfg, 300, SPECIAL)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # make the adapters non-trivial
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = merge_lora(model)
        after = merged(input_ids=ids).logits
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(before, after, atol=1e-4)


def test_lora_targets_that_match_nothing_are_refused():
    cfg = ModelConfig(family="gpt2", hidden_size=32, lora=LoraConfig(enabled=True, target_modules=["nope"]))
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        build_model(cfg, 300, SPECIAL)
