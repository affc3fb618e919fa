"""The model runner on its own (llm_platform/serve/model_runner.py): prefill, decode and shrink over a tiny GPT-2,
with the cache allocated at the block it is given, checked against the model's own forward passes."""

from __future__ import annotations

import pytest
import torch
from fixtures.serving import build_tiny_model

from llm_platform.serve.engine import load_model
from llm_platform.serve.model_runner import ModelRunner, PrefillRow
from llm_platform.serve.scheduler import BatchShape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    model, tok = load_model(build_tiny_model(tmp_path_factory.mktemp("tiny")))
    return model, tok


def next_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's logits for the token after `ids`, alone and unpadded ((V,))."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def block(*requests: tuple[int, int]) -> BatchShape:
    """The block the scheduler would grant a batch of these (prompt tokens, max_tokens) requests."""
    shape = BatchShape()
    for prompt, max_tokens in requests:
        shape = shape.join(BatchShape.of_request(prompt, max_tokens))
    return shape


def cache_shape(runner) -> tuple[int, ...]:
    return tuple(runner.cache.layers[0].kbuf.shape)


def test_prefill_orders_rows_by_prompt_length_and_allocates_the_block_it_is_given(tiny):
    model, tok = tiny
    runner = ModelRunner(model, tok.pad_token_id)
    prompts = [tok(t).input_ids for t in ["a big red dog ran over the lazy river", "the cat", "once upon a time"]]
    shape = block(*[(len(p), 5) for p in prompts])
    with torch.no_grad():
        result = runner.prefill([PrefillRow(p) for p in prompts], running=0, shape=shape)
    assert result.order == sorted(range(3), key=lambda i: len(prompts[i])) and result.prompt_logprobs == {}
    for row, i in enumerate(result.order):  # the logits of each cache row are its prompt's, as if alone
        torch.testing.assert_close(result.logits[row], next_logits(model, prompts[i]), atol=1e-4, rtol=0)
        assert runner.mask[row].tolist() == [0] * (shape.width - len(prompts[i])) + [1] * len(prompts[i])
    heads, head_dim = model.config.n_head, model.config.n_embd // model.config.n_head
    assert cache_shape(runner) == (3, heads, shape.columns, head_dim)  # exactly the block: no more is held


def test_decode_join_and_keep_continue_every_row_as_the_model_alone(tiny):
    """Greedy decoding through the runner, with a second prompt joining the batch and the first leaving it, gives
    each row the tokens the model gives its prompt alone."""
    model, tok = tiny
    runner = ModelRunner(model, tok.pad_token_id)
    first, second = tok("a big red dog ran over the lazy river").input_ids, tok("the cat sat on").input_ids
    texts = {0: list(first)}
    with torch.no_grad():
        result = runner.prefill([PrefillRow(first)], running=0, shape=block((len(first), 6)))
        texts[0].append(int(result.logits[0].argmax()))
        logits = runner.decode([texts[0][-1]])
        texts[0].append(int(logits[0].argmax()))
        # The second joins: the block is the running row (2 filled columns past its prompt, 4 to go) and its own.
        running = BatchShape.of_running(len(first) + 1, [(6, 2)])
        shape = running.join(BatchShape.of_request(len(second), 4))
        result = runner.prefill([PrefillRow(second)], running=1, shape=shape)
        texts[1] = list(second) + [int(result.logits[0].argmax())]
        assert cache_shape(runner)[0] == 2 and cache_shape(runner)[2] == shape.columns
        for _ in range(2):
            logits = runner.decode([texts[0][-1], texts[1][-1]])
            for row in (0, 1):
                torch.testing.assert_close(logits[row], next_logits(model, texts[row]), atol=1e-4, rtol=0)
                texts[row].append(int(logits[row].argmax()))
        # The first (the long prompt) leaves: the second's row stays, trimmed to its own columns (its prompt and the
        # 2 tokens fed back): the columns that were padding for it go.
        kept = BatchShape.of_running(len(second) + 2, [(4, 3)])
        assert runner.mask.shape[1] > kept.width
        runner.keep([1], kept)
        assert runner.mask.shape == (1, kept.width) and bool(runner.mask.all())
        assert cache_shape(runner)[0] == 1 and cache_shape(runner)[2] == kept.columns
        logits = runner.decode([texts[1][-1]])
        torch.testing.assert_close(logits[0], next_logits(model, texts[1]), atol=1e-4, rtol=0)
        runner.keep([], BatchShape())
    assert runner.cache is None and runner.mask is None


@pytest.mark.parametrize("chunk", [3, 512])
def test_prompt_logprobs_are_the_model_own_for_the_rows_that_ask(tiny, monkeypatch, chunk):
    from llm_platform.serve import model_runner

    model, tok = tiny
    monkeypatch.setattr(model_runner, "PREFILL_CHUNK_TOKENS", chunk)  # the prompt in passes of 3 columns, or one
    runner = ModelRunner(model, tok.pad_token_id)
    asks, quiet = tok("the cat sat on the mat").input_ids, tok("a dog").input_ids
    with torch.no_grad():
        result = runner.prefill([PrefillRow(quiet), PrefillRow(asks, score_top=2)], running=0,
                                shape=block((len(quiet), 1), (len(asks), 1)))
        want = model(torch.tensor([asks])).logits[0].float().log_softmax(-1)  # (L, V)
    assert set(result.prompt_logprobs) == {1}  # by index into the rows passed, only the one that asked
    got = result.prompt_logprobs[1]
    assert [t.token_id for t in got] == asks and got[0].logprob is None
    for pos in range(1, len(asks)):
        assert got[pos].logprob == pytest.approx(float(want[pos - 1, asks[pos]]), abs=1e-4)
        assert [i for i, _ in got[pos].top] == want[pos - 1].topk(2).indices.tolist()


def test_every_forward_goes_through_the_replaceable_forward(tiny):
    """Tests and benchmarks wrap `runner.forward` (faults, timers): prefill and decode both call it."""
    model, tok = tiny
    runner = ModelRunner(model, tok.pad_token_id)
    real, calls = runner.forward, []

    def counted(input_ids, mask, cache, all_positions=False):
        calls.append(tuple(input_ids.shape))
        return real(input_ids, mask, cache, all_positions)

    runner.forward = counted
    ids = tok("the cat sat").input_ids
    with torch.no_grad():
        runner.prefill([PrefillRow(ids)], running=0, shape=block((len(ids), 3)))
        runner.decode([1])
    assert calls == [(1, len(ids)), (1, 1)]
