"""Batches and loss masking per objective."""

import numpy as np
import torch

from llm_platform.train.objectives import IGNORE, count_targets, loss_sum, mask_tokens, prepare_batch

SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


def test_clm_targets_are_next_tokens():
    ids = np.array([[5, 6, 7, 8]])
    inputs, targets = prepare_batch("clm", {"input_ids": ids}, special=SPECIAL, vocab_size=50)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert targets.tolist() == [[6, 7, 8, IGNORE]]


def test_sft_loss_only_on_the_response():
    # prompt 5 6, response 7 8 <eos>, then padding
    batch = {"input_ids": np.array([[5, 6, 7, 8, 0, 1, 1]]),
             "labels": np.array([[IGNORE, IGNORE, 7, 8, 0, IGNORE, IGNORE]]),
             "attention_mask": np.array([[1, 1, 1, 1, 1, 0, 0]])}
    inputs, targets = prepare_batch("sft", batch, special=SPECIAL, vocab_size=50)
    # position t predicts token t+1: only positions 1..3 (predicting 7, 8, eos) carry a loss
    assert targets.tolist() == [[IGNORE, 7, 8, 0, IGNORE, IGNORE, IGNORE]]
    assert count_targets(targets) == 3
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0]]
    # the loss ignores what the model says at masked positions
    logits = torch.randn(1, 7, 50)
    changed = logits.clone()
    changed[0, 0] += 100.0
    changed[0, 5] -= 100.0
    assert torch.allclose(loss_sum(logits, targets), loss_sum(changed, targets))


def test_seq2seq_decoder_inputs_are_shifted_right_behind_the_start_token():
    batch = {"input_ids": np.array([[5, 6, 0]]), "attention_mask": np.array([[1, 1, 1]]),
             "labels": np.array([[7, 8, 0, IGNORE]])}
    inputs, targets = prepare_batch("seq2seq", batch, special=SPECIAL, vocab_size=50)
    assert inputs["decoder_input_ids"].tolist() == [[1, 7, 8, 0]]
    assert targets.tolist() == [[7, 8, 0, IGNORE]]


def test_mlm_masking_is_seeded_and_follows_80_10_10():
    ids = torch.randint(3, 500, (64, 128))
    ids[:, -8:] = SPECIAL["pad"]
    masked, targets = mask_tokens(ids, probability=0.15, mask_id=2, pad_id=1, vocab_size=500,
                                  generator=torch.Generator().manual_seed(0))
    chosen = targets != IGNORE
    assert not chosen[:, -8:].any()  # padding is never chosen
    assert 0.13 < chosen.float().mean().item() / (120 / 128) < 0.17
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    as_mask = (masked[chosen] == 2).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < as_mask < 0.83 and 0.08 < unchanged < 0.12
    again, _ = mask_tokens(ids, probability=0.15, mask_id=2, pad_id=1, vocab_size=500,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


def test_loss_sum_is_the_summed_token_cross_entropy():
    logits = torch.randn(2, 3, 10)
    targets = torch.tensor([[1, 2, IGNORE], [3, IGNORE, IGNORE]])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), targets.reshape(-1), ignore_index=IGNORE,
                                                 reduction="mean") * 3
    assert torch.allclose(loss_sum(logits, targets), expected)
