"""The serving engine without Ray: continuous batching matches HF generate, sampling, stops, UTF-8 streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fixtures.serving import build_tiny_model

from llm_platform.serve.engine import Engine, EngineOverloaded, load_model
from llm_platform.serve.sampling import SamplingParams, StopMatcher, TextStream, sample_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = load_model(folder)
    return folder, model, tokenizer


@pytest.fixture
def engine(tiny):
    _, model, tokenizer = tiny
    eng = Engine(model, tokenizer, max_batch_size=8)
    eng.start()
    yield eng
    eng.shutdown(drain_timeout_s=5)


def run(engine, prompt_ids, **params):
    async def go():
        texts, tokens, reasons, prompt_lp = {}, {}, {}, None
        async for out in engine.generate(prompt_ids, SamplingParams(**params)):
            assert out.error is None
            prompt_lp = prompt_lp or out.prompt_logprobs
            for d in out.deltas:
                texts[d.index] = texts.get(d.index, "") + d.text
                tokens.setdefault(d.index, []).extend(d.tokens)
                reasons[d.index] = d.finish_reason or reasons.get(d.index)
        return texts, tokens, reasons, prompt_lp
    return go()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_concurrent_greedy_matches_hf_generate(tiny, engine):
    _, model, tok = tiny
    prompts = [tok(p).input_ids for p in ["the cat", "a big red dog ran over the lazy river", "once upon a time"]]
    # 9 requests of different lengths and budgets share the batch (max 8): joins and leaves mid-flight.
    jobs = [(p, 4 + 7 * (i % 3)) for i, p in enumerate(prompts * 3)]

    async def all_():
        return await asyncio.gather(*[run(engine, p, max_tokens=n, temperature=0, ignore_eos=True) for p, n in jobs])

    results = asyncio.run(all_())
    for (p, n), (_, tokens, reasons, _) in zip(jobs, results):
        assert [t.token_id for t in tokens[0]] == hf_greedy(model, p, n)
        assert reasons[0] == "length"
    assert engine.num_running() == 0 and engine.stats["generated_tokens"] >= sum(n for _, n in jobs)


def test_a_slow_reader_gets_queued_tokens_coalesced_and_nothing_lost(tiny, engine):
    _, model, tok = tiny
    ids = tok("once upon a time").input_ids

    async def read(delay: float):
        events, text, tokens, reason = 0, "", [], None
        async for out in engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                             logprobs=1)):
            events += 1
            for d in out.deltas:
                text, tokens, reason = text + d.text, tokens + d.tokens, d.finish_reason or reason
            if events == 1:
                await asyncio.sleep(delay)  # a slow client: the engine runs ahead and the other 23 events queue up
        return events, text, tokens, reason

    fast = asyncio.run(read(0.0))
    slow = asyncio.run(read(1.5))
    # The reader that lagged after the first event gets the queued rest as one event (two if the engine had not
    # finished within 1.5 s), where the engine emitted 24.
    assert slow[0] <= 3
    assert slow[1:] == fast[1:] and slow[3] == "length"
    assert [t.token_id for t in slow[2]] == hf_greedy(model, ids, 24)
    assert all(t.logprob is not None for t in slow[2])


def test_stream_interval_gathers_tokens_after_the_first_and_changes_nothing_else(tiny, engine):
    _, model, tok = tiny
    ids = tok("a small dog").input_ids

    async def events(interval: int, max_delay_s: float):
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
        return [out async for out in engine.generate(ids, params, True, interval, max_delay_s)]

    def tokens(outs):
        return [[t for d in o.deltas for t in d.tokens] for o in outs]

    every, by4, held = asyncio.run(events(1, 0.0)), asyncio.run(events(4, 60.0)), asyncio.run(events(1000, 60.0))
    # The first event goes out as soon as the reader takes it (with any token that already queued behind it on a
    # loaded machine); after it, at least 4 tokens a chunk but the last: 1+4+4+4+3 when read at once.
    assert all(len(t) >= 4 for t in tokens(by4)[1:-1]) and len(by4) <= 5
    assert len(held) == 2 and len(tokens(held)[1]) >= 14  # nothing flushes a chunk early but the request's end
    for outs in (by4, held):
        assert [t.token_id for t in sum(tokens(outs), [])] == [t.token_id for t in sum(tokens(every), [])]
        assert "".join(d.text for o in outs for d in o.deltas) == "".join(d.text for o in every for d in o.deltas)
        assert outs[-1].finished and outs[-1].deltas[-1].finish_reason == "length"
    assert [t.token_id for t in sum(tokens(by4), [])] == hf_greedy(model, ids, 16)
    # A held token goes out once max_delay_s has passed: with no delay allowed, the interval never holds anything.
    assert len(asyncio.run(events(1000, 0.0))) > 2

    async def emitted(interval: int):
        # The engine itself holds the tokens (the reader's event loop wakes once a chunk, not once a token): what
        # reaches the request's queue, whatever the reader's timing, is 1, then 4 at a time, then the rest.
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, n=2)
        req = engine.submit(ids, params, True, interval, 60.0)
        outs = [await req.queue.get()]
        while not outs[-1].finished:
            outs.append(await req.queue.get())
        return outs

    outs = asyncio.run(emitted(4))
    for index in (0, 1):  # one delta per sequence per event, its tokens gathered
        assert [len(d.tokens) for o in outs for d in o.deltas if d.index == index] == [1, 4, 4, 4, 3]


def test_a_failed_step_delivers_the_held_tokens_before_its_error(tiny, caplog):
    import re

    _, model, tok = tiny
    eng = Engine(model, tok, max_batch_size=4)
    real, calls = eng.runner.forward, {"n": 0}

    def fails_at_the_sixth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    eng.runner.forward = fails_at_the_sixth_step
    eng.start()
    try:
        async def events():
            params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
            return [out async for out in eng.generate(tok("a small dog").input_ids, params, True, 1000, 60.0)]

        outs = asyncio.run(events())
    finally:
        eng.shutdown(drain_timeout_s=1)
    # The prefill's token went out at once, the next 4 were held for their chunk when step 6 failed: they still
    # reach the reader, then the error.
    got = [t.token_id for o in outs for d in o.deltas for t in d.tokens]
    assert got == hf_greedy(model, tok("a small dog").input_ids, 5)
    assert all(o.error is None for o in outs[:-1])
    # The request's error is generic; the replica's log has the exception under the same id.
    found = re.fullmatch(r"internal error \(id ([0-9a-f]+)\)", outs[-1].error or "")
    assert found and "boom" not in outs[-1].error
    assert any(found.group(1) in r.getMessage() and "boom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_non_streamed_request_gets_its_first_token_then_the_rest_at_once(tiny, engine):
    _, _, tok = tiny
    ids = tok("the cat sat").input_ids

    async def events(stream: bool):
        # The request's own queue, not `generate`, which may coalesce events that queue up while a loaded
        # machine keeps this reader waiting: what is asserted here is what the engine emits.
        req = engine.submit(ids, SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=2, ignore_eos=True), stream)
        outs = [await req.queue.get()]
        while not outs[-1].finished:
            outs.append(await req.queue.get())
        return outs

    streamed, held = asyncio.run(events(True)), asyncio.run(events(False))
    assert len(streamed) == 10 and len(held) == 2  # 10 tokens: one event each, or the first and then the rest
    assert held[0].prompt_logprobs is not None and not held[0].finished and held[1].finished
    for index in (0, 1):
        def text(outs, i=index):
            return "".join(d.text for o in outs for d in o.deltas if d.index == i)

        def token_ids(outs, i=index):
            return [t.token_id for o in outs for d in o.deltas if d.index == i for t in d.tokens]

        assert text(held) == text(streamed) and token_ids(held) == token_ids(streamed)
        assert len(token_ids(held)) == 10
        assert [d.finish_reason for d in held[1].deltas if d.index == index][-1] == "length"


def test_seed_reproducible_and_n_independent(tiny, engine):
    _, _, tok = tiny
    ids = tok("the cat sat").input_ids
    a = asyncio.run(run(engine, ids, max_tokens=12, temperature=1.0, seed=7, n=2, ignore_eos=True))
    b = asyncio.run(run(engine, ids, max_tokens=12, temperature=1.0, seed=7, n=2, ignore_eos=True))
    c = asyncio.run(run(engine, ids, max_tokens=12, temperature=1.0, seed=8, n=1, ignore_eos=True))
    ids_of = lambda r, i: [t.token_id for t in r[1][i]]  # noqa: E731
    assert ids_of(a, 0) == ids_of(b, 0) and ids_of(a, 1) == ids_of(b, 1)
    assert ids_of(a, 0) != ids_of(a, 1) and ids_of(a, 0) != ids_of(c, 0)


def test_logprobs_and_echo(tiny, engine):
    _, model, tok = tiny
    ids = tok("the cat sat on the mat").input_ids
    _, tokens, _, prompt_lp = asyncio.run(run(engine, ids, max_tokens=3, temperature=0, logprobs=2, echo=True))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert prompt_lp[0].logprob is None and len(prompt_lp) == len(ids)
    for pos in range(1, len(ids)):
        assert prompt_lp[pos].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
    first = tokens[0][0]
    assert first.logprob == pytest.approx(ref[-1].max().item(), abs=1e-4)
    assert len(first.top) == 2 and first.top[0][0] == first.token_id


def test_sample_rows_greedy_topk_topp():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 4)
    t = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_k = torch.tensor([0, 1, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0])
    out = sample_rows(logits, t, top_k, top_p, torch.tensor([0.99, 0.99, 0.99, 0.999999]))
    assert out[:3].tolist() == [1, 1, 1]  # greedy, top_k=1, top_p keeps only the dominant token
    assert out[3].item() == 0 or out[3].item() in (2, 3)  # full distribution: the tail is reachable


def test_sample_rows_row_result_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    u = torch.tensor([0.37])
    settings = {"plain": (1.0, 0, 1.0), "greedy": (0.0, 0, 1.0), "top_k": (0.8, 5, 1.0), "top_p": (1.2, 0, 0.9)}
    for name, (temp, k, p) in settings.items():
        alone = sample_rows(logits, torch.tensor([temp]), torch.tensor([k]), torch.tensor([p]), u)
        for other_temp, other_k, other_p in settings.values():  # every neighbour kind, before and after the row
            batch = sample_rows(logits.repeat(2, 1), torch.tensor([other_temp, temp]), torch.tensor([other_k, k]),
                                torch.tensor([other_p, p]), torch.tensor([0.9, 0.37]))
            assert batch[1] == alone[0], name


def test_sample_rows_plain_and_filtered_paths_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    n = 4000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # evenly spread draws: frequencies ~ probabilities
    rows = logits.repeat(n, 1)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
    plain = torch.bincount(sample_rows(rows, ones, zeros, ones, u), minlength=5).float() / n
    assert torch.allclose(plain, logits.softmax(-1)[0], atol=2e-3)
    top2 = torch.bincount(sample_rows(rows, ones, torch.full((n,), 2), ones, u), minlength=5).float() / n
    assert torch.allclose(top2, torch.cat([logits[0, :2].softmax(-1), torch.zeros(3)]), atol=2e-3)
    # A draw of exactly 0 never lands on a zero-probability token.
    edge = sample_rows(torch.tensor([[-float("inf"), 0.0]]), torch.ones(1), torch.zeros(1, dtype=torch.long),
                       torch.ones(1), torch.zeros(1))
    assert edge.item() == 1


def test_text_stream_never_splits_a_character(tiny):
    _, _, tok = tiny
    text = "héllo 😀 日本語 wörld"
    ids = tok(text, add_special_tokens=False).input_ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces[:-1])  # some byte tokens were held back until their character completed


def test_stop_matcher_cuts_and_holds_back():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == "abc "  # "E" could start "END": held back
    assert m.feed("N") == ""
    assert m.feed("D and more") == "" and m.stopped
    assert m.text == "abc "


def test_stop_string_ends_generation(tiny, engine):
    _, model, tok = tiny
    ids = tok("the cat").input_ids
    full = tok.decode(hf_greedy(model, ids, 12))
    stop = full[3:6]
    texts, _, reasons, _ = asyncio.run(run(engine, ids, max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))
    assert reasons[0] == "stop" and texts[0] == full[:full.index(stop)]


def test_overload_is_refused(tiny):
    _, model, tok = tiny
    eng = Engine(model, tok, max_batch_size=1, max_waiting=1)
    eng.start()

    async def flood():
        results = await asyncio.gather(*[run(eng, [1, 2, 3], max_tokens=30, ignore_eos=True) for _ in range(6)],
                                       return_exceptions=True)
        return results

    try:
        results = asyncio.run(flood())
    finally:
        eng.shutdown(5)
    assert any(isinstance(r, EngineOverloaded) for r in results)
    assert any(isinstance(r, tuple) for r in results)


def test_weights_only_from_safetensors(tmp_path, tiny):
    folder = tiny[0]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)


def _head_inputs(model) -> tuple[list[tuple[int, ...]], object]:
    """Shapes of every input to the model's output head (the full-vocabulary projection), and the hook handle."""
    shapes: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_generation_computes_logits_only_at_the_last_position(tiny):
    _, model, tok = tiny
    eng = Engine(model, tok, max_batch_size=8, score_prompts_every=0)
    assert eng.runner.base is not None  # GPT-2: logits are the head over the base's last hidden state
    shapes, handle = _head_inputs(model)
    eng.start()
    try:
        long_prompt = tok("the cat sat on the mat " * 12).input_ids
        async def both():
            return await asyncio.wait_for(asyncio.gather(
                run(eng, long_prompt, max_tokens=5, temperature=0, ignore_eos=True),
                run(eng, long_prompt[:7], max_tokens=5, temperature=0, ignore_eos=True)), 60)
        results = asyncio.run(both())
    finally:
        eng.shutdown(drain_timeout_s=5)
        handle.remove()
    assert all(len(r[1][0]) == 5 for r in results) and all(r[3] is None for r in results)
    # Each call projects one position per running sequence: (rows, hidden), never (rows, prompt length, hidden).
    assert shapes and all(len(s) == 2 and s[0] <= 2 for s in shapes), shapes
    assert results[0][1][0] and [t.token_id for t in results[0][1][0]] == hf_greedy(model, long_prompt, 5)


def test_prompt_logprobs_are_exact_and_computed_a_chunk_at_a_time(tiny, monkeypatch):
    from llm_platform.serve import model_runner

    _, model, tok = tiny
    monkeypatch.setattr(model_runner, "LOGIT_CHUNK", 4)
    monkeypatch.setattr(model_runner, "PREFILL_CHUNK_TOKENS", 5)  # the prompt's hidden states come in 3 passes
    eng = Engine(model, tok, max_batch_size=8, score_prompts_every=0)
    shapes, handle = _head_inputs(model)
    eng.start()
    ids = tok("a big red dog ran over the lazy river and back again").input_ids
    try:
        _, _, _, prompt_lp = asyncio.run(asyncio.wait_for(
            run(eng, ids, max_tokens=1, temperature=0, logprobs=2, echo=True), 60))
    finally:
        eng.shutdown(drain_timeout_s=5)
        handle.remove()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    assert prompt_lp[0].logprob is None and len(prompt_lp) == len(ids)
    got = torch.tensor([t.logprob for t in prompt_lp[1:]])
    torch.testing.assert_close(got, want.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), atol=1e-4, rtol=0)
    assert [i for i, _ in prompt_lp[3].top] == want[2].topk(2).indices.tolist()
    assert max(s[0] for s in shapes if len(s) == 2) <= 4  # never more than a chunk of positions at once


def test_a_model_that_is_not_head_over_hidden_uses_its_own_forward(tiny, monkeypatch):
    from llm_platform.serve import model_runner

    _, model, tok = tiny
    ids = tok("once upon a time").input_ids
    split = Engine(model, tok, max_batch_size=4, score_prompts_every=1)
    monkeypatch.setattr(model_runner, "split_model", lambda m: (None, None))
    whole = Engine(model, tok, max_batch_size=4, score_prompts_every=1)
    assert split.runner.base is not None and whole.runner.base is None
    outs = []
    for eng in (split, whole):
        eng.start()
        try:
            outs.append(asyncio.run(asyncio.wait_for(run(eng, ids, max_tokens=4, temperature=0, ignore_eos=True,
                                                         logprobs=0), 60)))
        finally:
            eng.shutdown(drain_timeout_s=5)
    assert [t.token_id for t in outs[0][1][0]] == [t.token_id for t in outs[1][1][0]]
    for a, b in zip(outs[0][3][1:], outs[1][3][1:]):  # prompt log-probs, scored for the drift monitor
        assert abs(a.logprob - b.logprob) < 1e-4


def test_admission_keeps_the_batch_within_the_kv_budget(tiny):
    from llm_platform.serve.engine import RequestTooLarge

    _, model, tok = tiny
    ids = tok("the cat sat").input_ids
    final = len(ids) + 6
    eng = Engine(model, tok, max_batch_size=8, max_batch_tokens=2 * final + 1, score_prompts_every=0)
    running: list[int] = []
    real_step = eng._step_tokens

    def spy(logits, seqs):
        running.append(len(eng.scheduler.running))
        assert cache_bytes(eng) <= eng.max_batch_tokens * eng.kv_bytes_per_token  # what the buffers hold
        real_step(logits, seqs)

    eng._step_tokens = spy
    eng.start()
    try:
        async def go():
            with pytest.raises(RequestTooLarge, match="serve.engine.max_batch_tokens"):  # alone it could never fit
                await run(eng, ids, max_tokens=2 * final, temperature=0)
            return await asyncio.gather(*[run(eng, ids, max_tokens=6, temperature=0, ignore_eos=True)
                                          for _ in range(5)])
        results = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        eng.shutdown(drain_timeout_s=5)
    assert all(len(r[1][0]) == 6 for r in results)  # the ones that waited for room all finished
    assert max(running) == 2  # never three at once: 3 x (prompt + 5 columns to come) > the budget


def test_a_mixed_batch_never_holds_more_kv_cache_than_the_budget(tiny):
    """Issue #24: one near-context prompt wanting 1 token beside 1-token prompts wanting 100. Counted as rows x the
    longest final length (101), four rows fit a budget of 404 tokens, but the left-padded buffers of those four
    rows held 4 x (100 + 100) columns: twice the budget. Measured on the cache tensors themselves."""
    _, model, tok = tiny
    eng = Engine(model, tok, max_batch_size=8, max_batch_tokens=4 * 101, score_prompts_every=0)
    held: list[int] = []
    real_step = eng._step_tokens

    def spy(logits, seqs):
        held.append(cache_bytes(eng))
        real_step(logits, seqs)

    eng._step_tokens = spy
    long_prompt = (tok("the cat sat on the mat " * 30).input_ids * 2)[:100]
    eng.start()
    try:
        async def go():
            shorts = [eng.generate([5 + i], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
                      for i in range(3)]
            firsts = [await anext(s) for s in shorts]  # the three are running: the long prompt would join them
            long = await run(eng, long_prompt, max_tokens=1, temperature=0, ignore_eos=True)
            rest = []
            for s in shorts:
                rest.append([out async for out in s])
            return firsts, rest, long
        firsts, rest, long = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        eng.shutdown(drain_timeout_s=5)
    assert max(held) <= eng.max_batch_tokens * eng.kv_bytes_per_token, (max(held), eng.max_batch_tokens)
    assert [t.token_id for t in long[1][0]] == hf_greedy(model, long_prompt, 1)
    for i, (first, events) in enumerate(zip(firsts, rest)):
        tokens = [t.token_id for out in [first, *events] for d in out.deltas for t in d.tokens]
        assert tokens == hf_greedy(model, [5 + i], 100)


def cache_bytes(eng) -> int:
    """Bytes the engine's KV-cache buffers hold now, summed from the tensors themselves."""
    cache = eng.runner.cache
    if cache is None:
        return 0
    return sum(t.element_size() * t.numel() for layer in cache.layers for t in (layer.kbuf, layer.vbuf))


def test_kv_budget_default_comes_from_the_model_and_free_memory(tiny):
    from llm_platform.serve.engine import default_batch_tokens, kv_bytes_per_token

    _, model, _ = tiny
    cfg = model.config
    assert kv_bytes_per_token(model) == 2 * cfg.n_layer * cfg.n_embd * 4  # GPT-2: no GQA, fp32
    per_token = kv_bytes_per_token(model)
    import psutil

    before = psutil.virtual_memory().available
    tokens = default_batch_tokens(model, per_token, memory_fraction=0.5)
    after = psutil.virtual_memory().available
    assert min(before, after) * 0.5 * 0.9 <= tokens * per_token <= max(before, after) * 0.5 * 1.1
    # A model whose one context does not fit the fraction still gets one full context.
    assert default_batch_tokens(model, per_token, memory_fraction=1e-15) == cfg.n_positions


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_kv_budget_default_on_cpu_stays_within_the_cgroup_memory_limit(tiny, tmp_path, monkeypatch, layout):
    """In a pod psutil sees the node's memory; the budget must come from what is left under the pod's limit (with
    the inactive page cache, which the kernel drops first, not counted as used)."""
    from llm_platform.serve import loading as model_mod
    from llm_platform.serve.engine import default_batch_tokens, kv_bytes_per_token

    _, model, _ = tiny
    mib = 2**20
    if layout == "v2":
        (tmp_path / "memory.max").write_text(f"{1024 * mib}\n")
        (tmp_path / "memory.current").write_text(f"{700 * mib}\n")
        (tmp_path / "memory.stat").write_text(f"anon {500 * mib}\ninactive_file {100 * mib}\nactive_file 0\n")
    else:
        (tmp_path / "memory").mkdir()
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{1024 * mib}\n")
        (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{700 * mib}\n")
        (tmp_path / "memory" / "memory.stat").write_text(f"inactive_file 0\ntotal_inactive_file {100 * mib}\n")
    monkeypatch.setattr(model_mod, "CGROUP_ROOT", str(tmp_path))
    per_token = kv_bytes_per_token(model)
    assert model_mod.cgroup_available_bytes() == 424 * mib  # 1024 - (700 - 100)
    assert default_batch_tokens(model, per_token, memory_fraction=0.5) == 212 * mib // per_token
    # No limit (v2 "max", v1's huge number): the machine's available memory, as before.
    if layout == "v2":
        (tmp_path / "memory.max").write_text("max\n")
    else:
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert model_mod.cgroup_available_bytes() is None


def test_kv_budget_default_on_a_shared_gpu_is_the_replica_share(monkeypatch):
    """Two replicas with num_gpus=0.5 (conf/serve/cluster.yaml) start on one 80 GiB GPU, each loading 2 GiB of
    weights; their caches are allocated later, as batches grow. Half of what each saw free at its start was 39 and
    38 GiB of KV cache: 77 of the 80 GiB, nothing left for activations. Each replica's share is half the device:
    (40 - 2) x 0.5 = 19 GiB each."""
    from types import SimpleNamespace

    from llm_platform.serve.engine import default_batch_tokens

    gib = 2**30
    device = SimpleNamespace(free=80 * gib, held=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (device.free, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: device.held)
    replica = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]),
                              config=SimpleNamespace(max_position_embeddings=2048))
    per_token = 1 << 20
    kv = []
    for _ in range(2):
        device.free -= 2 * gib  # this replica's weights
        device.held = 2 * gib  # what this process holds
        kv.append(default_batch_tokens(replica, per_token, 0.5, 0.5) * per_token)
    assert kv == [19 * gib, 19 * gib]
    # A whole GPU per replica: half of what is free, as before.
    device.free = 78 * gib
    assert default_batch_tokens(replica, per_token, 0.5, 1.0) * per_token == 39 * gib
