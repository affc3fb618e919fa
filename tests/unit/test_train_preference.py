"""DPO losses (train/preference.py) against the papers' formulas written out here, on a tiny Llama built from a config.

The reference path is deliberately another one: each pair runs alone and unpadded, and log pi(y|x) comes from the
Hugging Face model's own shifted cross-entropy (`labels=`: the mean over response tokens, times their count). Loss
and every parameter's gradient at step 0 must agree with ours (padded batch, chosen rows then rejected rows).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_platform.train.objectives import shift_left
from llm_platform.train.preference import dpo_losses, sequence_logps, split_pairs

VOCAB, PAD = 97, 0


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()  # no dropout either way; eval keeps it explicit
    return model


@pytest.fixture(scope="module")
def models():
    policy = tiny_llama(0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, as after some training: the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy, reference


def hf_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt) through HF's own loss: mean CE over the response tokens x their count."""
    ids = torch.tensor([prompt + response])
    labels = torch.tensor([[-100] * len(prompt) + response])
    return -model(input_ids=ids, labels=labels).loss * len(response)


def plain_loss(policy, reference, pairs, *, beta: float, loss_type: str, eps: float) -> torch.Tensor:
    losses = []
    for prompt, chosen, rejected in pairs:
        pc, pr = hf_logp(policy, prompt, chosen), hf_logp(policy, prompt, rejected)
        with torch.no_grad():
            rc, rr = hf_logp(reference, prompt, chosen), hf_logp(reference, prompt, rejected)
        if loss_type == "sigmoid":
            z = beta * ((pc - rc) - (pr - rr))
            losses.append(-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
        else:  # IPO, eq. 17, each log-ratio averaged over its response tokens
            h = (pc - rc) / len(chosen) - (pr - rr) / len(rejected)
            losses.append((h - 1 / (2 * beta)) ** 2)
    return torch.stack(losses).mean()


def batch(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows, chosen ones then rejected ones: input ids, attention mask, labels (-100 off the response)."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(y) for p, y in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, y) in enumerate(rows):
        ids[i, :len(p) + len(y)] = torch.tensor(p + y)
        mask[i, :len(p) + len(y)] = 1
        labels[i, len(p):len(p) + len(y)] = torch.tensor(y)
    return ids, mask, labels


def our_loss(policy, reference, pairs, *, beta: float, loss_type: str, eps: float):
    ids, mask, labels = batch(pairs)
    targets = shift_left(labels)
    logps, counts = sequence_logps(policy(input_ids=ids, attention_mask=mask).logits, targets)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference(input_ids=ids, attention_mask=mask).logits, targets)
    out = dpo_losses(split_pairs(logps), split_pairs(ref_logps), split_pairs(counts), beta=beta,
                     loss_type=loss_type, label_smoothing=eps)
    return out.loss.mean(), out


tokens = st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=9)
pairs_strategy = st.lists(st.tuples(tokens, tokens, tokens), min_size=1, max_size=4)


@settings(max_examples=12)
@given(pairs=pairs_strategy, variant=st.sampled_from([("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]),
       beta=st.sampled_from([0.1, 0.5]))
def test_loss_and_gradients_equal_the_papers_formula(models, pairs, variant, beta):
    policy, reference = models
    loss_type, eps = variant
    policy.zero_grad()
    ours, _ = our_loss(policy, reference, pairs, beta=beta, loss_type=loss_type, eps=eps)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    theirs = plain_loss(policy, reference, pairs, beta=beta, loss_type=loss_type, eps=eps)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_figures_users_read(models):
    policy, reference = models
    pairs = [([5, 6, 7], [8, 9], [10]), ([11], [12, 13, 14], [15, 16])]
    _, out = our_loss(policy, reference, pairs, beta=0.1, loss_type="sigmoid", eps=0.0)
    sums = out.sums()
    chosen = [hf_logp(policy, p, c).item() - hf_logp(reference, p, c).item() for p, c, _ in pairs]
    rejected = [hf_logp(policy, p, r).item() - hf_logp(reference, p, r).item() for p, _, r in pairs]
    assert sums["rewards/chosen"].item() == pytest.approx(0.1 * sum(chosen), abs=1e-5)
    assert sums["rewards/rejected"].item() == pytest.approx(0.1 * sum(rejected), abs=1e-5)
    assert sums["rewards/accuracy"].item() == sum(c > r for c, r in zip(chosen, rejected))
    assert sums["rewards/margin"].item() == pytest.approx(0.1 * (sum(chosen) - sum(rejected)), abs=1e-5)
    assert sums["logps/chosen"].item() == pytest.approx(sum(hf_logp(policy, p, c).item() for p, c, _ in pairs),
                                                        abs=1e-4)


def test_identical_policy_and_reference_give_log_2():
    policy = tiny_llama(1)
    pairs = [([3, 4], [5], [6, 7])]
    loss, out = our_loss(policy, policy, pairs, beta=0.1, loss_type="sigmoid", eps=0.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.chosen_rewards.abs().max().item() < 1e-6


def test_an_unknown_loss_is_refused():
    zero = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        dpo_losses((zero, zero), (zero, zero), (zero, zero), beta=0.1, loss_type="hinge")


def test_pair_rows_cut_the_padding_every_row_shares_and_score_the_same(models):
    from llm_platform.train.preference import pair_rows

    policy, _ = models
    pairs = [([5, 6, 7], [8, 9], [10]), ([11], [12, 13, 14], [15, 16])]
    ids, mask, labels = batch(pairs)  # as wide as the longest row
    seq_len = 24  # the dataset's rows: right-padded to data.seq_len
    rows = {}
    for side, sl in (("chosen", slice(0, 2)), ("rejected", slice(2, 4))):
        pad = seq_len - ids.shape[1]
        rows[f"{side}_input_ids"] = F.pad(ids[sl], (0, pad), value=PAD).numpy()
        rows[f"{side}_attention_mask"] = F.pad(mask[sl], (0, pad)).numpy()
        rows[f"{side}_labels"] = F.pad(labels[sl], (0, pad), value=-100).numpy()
    inputs, targets = pair_rows(rows)
    assert inputs["input_ids"].shape == (4, 5) == targets.shape  # the longest row: 3 + 2 tokens
    with torch.no_grad():
        cut, _ = sequence_logps(policy(**inputs).logits, targets)
        full, _ = sequence_logps(policy(input_ids=torch.as_tensor(np.concatenate(
            [rows["chosen_input_ids"], rows["rejected_input_ids"]])).long(), attention_mask=torch.as_tensor(
            np.concatenate([rows["chosen_attention_mask"], rows["rejected_attention_mask"]])).long()).logits,
            shift_left(torch.as_tensor(np.concatenate([rows["chosen_labels"], rows["rejected_labels"]])).long()))
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
