"""Third-party-like checkpoints built here (nothing downloads): tiny models saved with `save_pretrained` beside
their own tokenizer files, laid out as released checkpoints are, and chat data to fine-tune them on.

    gpt2_checkpoint    GPT-2 layout: byte-level BPE with `<|endoftext|>` only (no pad, no mask), no chat template,
                       vocabulary not padded (embedding rows == tokenizer length), tied embeddings, fp32
    llama3_checkpoint  Llama-3 layout: `<|begin_of_text|>`, header tokens and `<|eot_id|>`, Llama 3's chat template,
                       embeddings padded past the tokenizer, untied embeddings, GQA (4 heads, 2 KV heads), bf16

Both are 2 layers of width 64.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLORS = ["red", "blue", "green", "yellow", "white", "black"]
THINGS = ["sky", "grass", "sun", "snow", "coal", "sea", "leaf", "cloud", "road", "lemon"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
# Llama 3's template (as released: no {% generation %} markers), shortened to what these tests use.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """A short multi-turn chat whose answers follow from the questions (so a few steps lower the loss)."""
    messages = [{"role": "system", "content": "You answer with colors."}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 2)):
        thing = rng.choice(THINGS)
        color = COLORS[THINGS.index(thing) % len(COLORS)]
        messages += [{"role": "user", "content": f"What color is the {thing}?"},
                     {"role": "assistant", "content": f"The {thing} is {color}."}]
    return messages


def write_chats(path: Path, n: int = 96, seed: int = 0, bad: bool = True) -> dict[str, int]:
    """A chats.jsonl of `n` good conversations in the three accepted shapes, plus (with `bad`) one bad record per
    reason. Returns {reason: line} of the bad ones."""
    rng = random.Random(seed)
    lines, bad_lines = [], {}
    for i in range(n):
        messages = conversation(rng)
        if i % 8 == 3:  # Alpaca shape
            lines.append({"instruction": messages[-2]["content"], "input": "", "output": messages[-1]["content"]})
        elif i % 8 == 5:  # prompt/response shape
            lines.append({"prompt": messages[-2]["content"], "response": messages[-1]["content"]})
        else:
            lines.append({"messages": messages})
    if bad:
        cases = {
            "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "empty_assistant": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "missing_assistant": {"messages": [{"role": "user", "content": "hi"}]},
            "wrong_type": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
        }
        for k, (reason, record) in enumerate(cases.items()):
            at = min(10 + 7 * k, len(lines))
            lines.insert(at, record)
            bad_lines[reason] = at + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return bad_lines


def _corpus() -> list[str]:
    rng = random.Random(1)
    texts = []
    for _ in range(300):
        for m in conversation(rng):
            texts.append(f"{m['role']}: {m['content']}")
    return texts + ["system user assistant What color is the"] * 5


def _bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def gpt2_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A GPT-2-layout checkpoint in `folder` (see the module docstring)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"], 400), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def llama3_checkpoint(folder: Path, seed: int = 0, head_dim: int | None = None, max_positions: int = 1024) -> Path:
    """A Llama-3-layout checkpoint in `folder` (see the module docstring). `head_dim` 32: the smallest vLLM's CPU
    attention takes (the default is 64 / 4 heads = 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(LLAMA3_SPECIALS, 400), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", model_max_length=8192)
    tok.chat_template = LLAMA3_TEMPLATE
    torch.manual_seed(seed)
    padded = 64 * ((len(tok) + 63) // 64) + 64  # rows past the tokenizer, as Llama 3's 128256 > its tokens
    config = LlamaConfig(vocab_size=padded, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         **({"head_dim": head_dim} if head_dim else {}),
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_theta=500000.0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files of a checkpoint folder, by name."""
    from llm_platform.data.dataset import TOKENIZER_FILES

    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).exists()}
