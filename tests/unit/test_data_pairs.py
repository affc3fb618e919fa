"""Preference pairs (data/pairs.py): the record shapes, the skip reasons, and which tokens carry a label when a
released-layout tokenizer's chat template renders them (fixtures/checkpoints.py: Llama 3's template; GPT-2: none)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from fixtures.checkpoints import gpt2_checkpoint, llama3_checkpoint
from fixtures.preferences import BAD, pair

from llm_platform.data import pairs
from llm_platform.data.pack import IGNORE_INDEX

NAMES = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_checkpoint(tmp_path_factory.mktemp("llama3")))


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_checkpoint(tmp_path_factory.mktemp("gpt2")))


@pytest.mark.parametrize("shape", ["plain", "conversation", "implicit"])
def test_every_shape_parses_to_a_prompt_and_two_answers(shape):
    record = pair(random.Random(3), shape)
    (prompt, chosen, rejected), reason = pairs.parse_pair(record, NAMES)
    assert reason is None
    assert prompt[-1] == {"role": "user", "content": prompt[-1]["content"]} and "What color" in prompt[-1]["content"]
    assert [m["role"] for m in chosen] == [m["role"] for m in rejected] == ["assistant"]
    assert chosen != rejected


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_pairs_name_their_reason(reason):
    parsed, got = pairs.parse_pair(BAD[reason], NAMES)
    assert parsed is None and got.split(":")[0] == reason, got


def test_conversations_without_a_shared_start_have_no_prompt():
    record = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
              "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert pairs.parse_pair(record, NAMES)[1].startswith("no_prompt")


def labelled_text(tok, row: dict, side: str) -> str:
    labels = row[f"{side}_labels"]
    return tok.decode([int(t) for t in labels if t != IGNORE_INDEX])


def test_only_the_final_answer_carries_labels_with_llama3s_template(llama_tok):
    prompt = [{"role": "user", "content": "What color is the sky?"},
              {"role": "assistant", "content": "The sky is blue."},  # an earlier turn: context, not scored
              {"role": "user", "content": "And the grass?"}]
    chosen = [{"role": "assistant", "content": "The grass is green."}]
    rejected = [{"role": "assistant", "content": "The grass is red."}]
    row = pairs.pair_record(pairs.render_pair(llama_tok, prompt, chosen, rejected), seq_len=96,
                            pad_id=llama_tok.eos_token_id)
    assert labelled_text(llama_tok, row, "chosen") == "The grass is green.<|eot_id|>"
    assert labelled_text(llama_tok, row, "rejected") == "The grass is red.<|eot_id|>"
    # Both rows hold the same rendered prompt, then their own answer, then padding.
    full = llama_tok.apply_chat_template(prompt + chosen, tokenize=False)
    n = int(row["chosen_attention_mask"].sum())
    assert llama_tok.decode([int(t) for t in row["chosen_input_ids"][:n]]) == full
    first_label = int(np.argmax(row["chosen_labels"] != IGNORE_INDEX))
    assert (row["chosen_input_ids"][:first_label] == row["rejected_input_ids"][:first_label]).all()


def test_without_a_template_the_default_one_renders_and_eos_ends_the_answer(gpt2_tok):
    (prompt, chosen, rejected), _ = pairs.parse_pair(pair(random.Random(0), "plain"), NAMES)
    row = pairs.pair_record(pairs.render_pair(gpt2_tok, prompt, chosen, rejected), seq_len=64, pad_id=0)
    text = labelled_text(gpt2_tok, row, "chosen")
    assert text.endswith("<|endoftext|>") and chosen[0]["content"] in text


def test_too_long_pairs_are_cut_or_skipped_and_counted(llama_tok):
    (prompt, chosen, rejected), _ = pairs.parse_pair(pair(random.Random(0), "conversation"), NAMES)
    sides = pairs.render_pair(llama_tok, prompt, chosen, rejected)
    prompt_len = sides[0][1].index(1)
    cut = pairs.pair_record(sides, seq_len=prompt_len + 2, pad_id=0)
    assert not isinstance(cut, str) and (cut["chosen_labels"] != IGNORE_INDEX).sum() == 2
    assert pairs.pair_record(sides, seq_len=prompt_len, pad_id=0) == "too_long"
    raw = [json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})] * 3
    rendered = pairs.pack_pairs(llama_tok, raw, seq_len=prompt_len, pad_id=0)
    assert rendered.columns == {} and rendered.counts["skipped_too_long"] == 3 and len(rendered.lengths) == 6
    assert rendered.kept == []
    rendered = pairs.pack_pairs(llama_tok, raw, seq_len=prompt_len + 2, pad_id=0)
    assert sorted(rendered.columns) == sorted(pairs.COLUMNS) and len(rendered.columns["chosen_input_ids"]) == 3
    assert rendered.counts["truncated"] == 3 and rendered.kept == [0, 1, 2]
