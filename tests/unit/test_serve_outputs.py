"""Output processing on its own (llm_platform/serve/outputs.py): sampled tokens -> text, stop strings, finish
reasons, chunked events and failures, with the tiny tokenizer and no model."""

from __future__ import annotations

import asyncio

import pytest
from fixtures.serving import build_tiny_model

from llm_platform.serve.outputs import OutputProcessor, advance
from llm_platform.serve.requests import ChunkHold, Request, RequestOutput, Seq
from llm_platform.serve.sampling import SamplingParams, TokenLogprob


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def request(prompt: list[int], hold: ChunkHold | None = None, **params) -> Request:
    """A request whose events go to a queue of the running event loop."""
    return Request(prompt, SamplingParams(**params), asyncio.get_running_loop(), asyncio.Queue(),
                   hold=hold or ChunkHold())


def feed(seq: Seq, tokens: list[int], eos: int | None = None, max_positions: int = 1000) -> list:
    """`advance` token by token until the sequence ends: its deltas."""
    deltas = []
    for t in tokens:
        deltas.append(advance(seq, TokenLogprob(t, None), eos, max_positions))
        if deltas[-1].finish_reason:
            break
    return deltas


def test_advance_detokenizes_and_cuts_at_a_stop_string(tok):
    async def go():
        prompt, rest = tok("once upon").input_ids, tok(" a time the cat sat on a mat", add_special_tokens=False)
        seq = Seq(request(prompt, max_tokens=50, stop=["cat"]), 0, tok, 0)
        deltas = feed(seq, rest.input_ids)
        assert "".join(d.text for d in deltas) == " a time the "  # cut before the stop string
        assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
        assert seq.tokens == rest.input_ids[:len(deltas)]  # nothing after the token that completed the stop
    asyncio.run(go())


def test_advance_ends_at_eos_max_tokens_or_the_context(tok):
    async def go():
        ids = tok(" the cat sat on a mat", add_special_tokens=False).input_ids
        eos = tok.eos_token_id
        at_eos = feed(Seq(request([1], max_tokens=50), 0, tok, 0), ids[:2] + [eos] + ids[2:], eos)
        assert len(at_eos) == 3 and at_eos[-1].finish_reason == "stop" and at_eos[-1].text == ""
        ignored = feed(Seq(request([1], max_tokens=4, ignore_eos=True), 0, tok, 0), ids[:2] + [eos] + ids[2:], eos)
        assert len(ignored) == 4 and ignored[-1].finish_reason == "length"
        at_context = feed(Seq(request([1, 2, 3], max_tokens=50), 0, tok, 0), ids, max_positions=5)
        assert len(at_context) == 2 and at_context[-1].finish_reason == "length"  # 3 prompt + 2 = the context
        assert "".join(d.text for d in at_context) == tok.decode(ids[:2])
    asyncio.run(go())


def test_process_sends_one_event_per_request_and_step_and_reports_the_finished(tok):
    async def go():
        outputs = OutputProcessor(eos_token_id=None, max_positions=1000)
        ids = tok(" the cat sat", add_special_tokens=False).input_ids
        a, b = request([1], max_tokens=2, n=2), request([1], max_tokens=1)
        seqs = [Seq(a, 0, tok, 0), Seq(a, 1, tok, 1), Seq(b, 0, tok, 2)]
        a.open_seqs, b.open_seqs = 2, 1
        finished = outputs.process(seqs, [TokenLogprob(t, None) for t in ids[:3]])
        assert finished == {id(seqs[2])} and b.open_seqs == 0  # b wanted one token
        first_a, only_b = await a.queue.get(), await b.queue.get()
        assert [d.index for d in first_a.deltas] == [0, 1] and not first_a.finished
        assert only_b.finished and only_b.deltas[0].finish_reason == "length"
        assert len(outputs.token_gaps) == 0  # first tokens: time to first token, not a gap
        finished = outputs.process(seqs[:2], [TokenLogprob(ids[0], None)] * 2)
        assert finished == {id(seqs[0]), id(seqs[1])} and (await a.queue.get()).finished
        assert len(outputs.token_gaps) == 2 and a.queue.empty() and b.queue.empty()
    asyncio.run(go())


def test_a_cancelled_request_gets_nothing_but_its_rows_still_finish(tok):
    async def go():
        outputs = OutputProcessor(eos_token_id=None, max_positions=1000)
        req = request([1], max_tokens=1)
        req.open_seqs, req.cancelled = 1, True
        seq = Seq(req, 0, tok, 0)
        assert outputs.process([seq], [TokenLogprob(5, None)]) == {id(seq)}
        # Callbacks run in order: once this marker's has run, any delivery scheduled before it has too.
        marker = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon_threadsafe(marker.set_result, None)
        await marker
        assert req.queue.empty()
    asyncio.run(go())


def test_held_tokens_go_out_before_the_error_of_a_failed_step(tok):
    async def go():
        outputs = OutputProcessor(eos_token_id=None, max_positions=1000)
        held = request([1], hold=ChunkHold(interval=100, max_delay_s=60.0), max_tokens=50)
        plain = request([1], max_tokens=50)
        held.open_seqs = plain.open_seqs = 1
        seqs = [Seq(held, 0, tok, 0), Seq(plain, 0, tok, 1)]
        ids = tok(" the cat sat", add_special_tokens=False).input_ids
        for t in ids:
            outputs.process(seqs, [TokenLogprob(t, None)] * 2)
        first = await held.queue.get()
        assert [t.token_id for t in first.deltas[0].tokens] == ids[:1] and held.queue.empty()  # the rest are held
        outputs.fail([held, plain, held], "internal error (id 1)")
        rest, error = await held.queue.get(), await held.queue.get()
        assert [t.token_id for t in rest.deltas[0].tokens] == ids[1:] and rest.error is None
        assert error == RequestOutput([], finished=True, error="internal error (id 1)") and held.queue.empty()
        for _ in ids:
            await plain.queue.get()
        assert (await plain.queue.get()).error and plain.queue.empty()  # one error each, though named twice
    asyncio.run(go())
