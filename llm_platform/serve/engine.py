"""Batched generation with a KV cache and iteration-level (continuous) batching: plain torch, no Ray.

One background thread owns the model. Each iteration it admits waiting requests (one batched prefill of their
prompts, left-padded, whose KV cache is then merged into the running batch's) or, when nobody waits, runs one decode
step for every running sequence; finished sequences leave the batch at once, so a long request never holds short
ones back. Asyncio callers get their tokens through `call_soon_threadsafe`, so the model never blocks an event loop.
What joins the batch is the `Scheduler`'s call (scheduler.py: the KV-cache block the batch will allocate stays within
the budget, and the cache is allocated at exactly the admitted block); whether the engine still works is its
`StepHealth`'s (health.py: failed steps fail their requests, repeated failures and stalls make the replica unhealthy).

Why not `transformers`' own continuous batching (`generate_batch`, `init_continuous_batching`): it runs on CPU, but
sampling settings (do_sample, num_return_sequences) are fixed per manager, there is no per-request seed, and its
outputs carry no top-k alternatives and no prompt log-probabilities, all of which the OpenAI API (`seed`, `n`,
`logprobs`, `echo`) needs. The batch here is a plain `DynamicCache` of shape (B, H, T, D) per layer with a padding
mask, which works for any HF decoder (GPT-2, Llama, ...) that accepts `position_ids`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import torch

from llm_platform.serve.health import StepHealth
from llm_platform.serve.kv_cache import bound_cpu_allocator, gathered_layer, rebuild, release_freed_memory, rows_view
from llm_platform.serve.model import (  # noqa: F401 - load_model, kv_bytes_per_token: the engine's public names too
    PositionLogits,
    default_batch_tokens,
    kv_bytes_per_token,
    load_model,
    split_model,
)
from llm_platform.serve.requests import (  # noqa: F401 - RequestOutput, SeqDelta: the engine's public names too
    ChunkHold,
    Request,
    RequestOutput,
    Seq,
    SeqDelta,
    coalesce,
    deliver,
    merge_deltas,
)
from llm_platform.serve.sampling import SamplingParams, TokenLogprob, sample_step
from llm_platform.serve.scheduler import BatchShape, Candidate, Scheduler

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many requests wait for a batch slot (the API answers 429 with Retry-After)."""


class EngineStopped(Exception):
    """The engine is draining or stopped (the API answers 503)."""


class RequestTooLarge(ValueError):
    """A request whose KV cache could never fit the replica's budget, even alone (the API answers 400)."""


LOGIT_CHUNK = 64
PREFILL_CHUNK_TOKENS = 512  # prompt columns per prefill forward pass (see Engine._prefill_group)
PREFILL_SCORE_BYTES = 64 << 20  # attention scores a prefill group may hold per layer (see Engine._prefill)
TOKEN_GAPS_KEPT = 65536  # inter-token gaps held for the metrics sampler (monitor.py) between two of its reads
"""Prompt positions whose full-vocabulary logits exist at once when prompt log-probabilities are computed."""


class Engine:
    """Continuous-batching generator over one HF causal LM.

    Args:
        model: an HF causal LM (eval mode).
        tokenizer: its tokenizer.
        max_batch_size: sequences decoded together at most.
        max_waiting: requests allowed to wait for a slot before `submit` raises `EngineOverloaded`.
        max_prefill_tokens: prompt tokens prefilled in one iteration at most (bounds the decode stall).
        max_batch_tokens: KV-cache budget in token slots of the running batch's padded block (`BatchShape.slots`:
            rows x (widest row + room for the longest to go)); None derives it from free memory
            (`default_batch_tokens`).
        score_prompts_every: compute the prompt log-probabilities of every Nth request (the drift monitor's
            perplexity samples them; 0: none), besides those of requests that ask (`echo` with `logprobs`).
        kv_memory_fraction: with `max_batch_tokens` None, the share of the replica's memory the cache may take.
        device_share: with `max_batch_tokens` None, the fraction of the GPU this replica was given (Serve's
            `num_gpus` per replica).
        stall_timeout_s: a step running this long with requests pending makes the engine unhealthy (None: never).
        max_consecutive_failed_steps: failed steps in a row that mark the engine failed (unhealthy for good).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, max_batch_tokens: int | None = None, score_prompts_every: int = 1,
                 kv_memory_fraction: float = 0.5, device_share: float = 1.0, stall_timeout_s: float | None = None,
                 max_consecutive_failed_steps: int = 3):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting, self.max_prefill_tokens = max_batch_size, max_waiting, max_prefill_tokens
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0)
                                 or getattr(model.config, "n_positions", 2048))
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        budget = max_batch_tokens or default_batch_tokens(model, self.kv_bytes_per_token, kv_memory_fraction,
                                                          device_share)
        self.scheduler = Scheduler(int(budget), max_batch_size, max_prefill_tokens)
        self.health = StepHealth(stall_timeout_s, max_consecutive_failed_steps)
        self.score_prompts_every = score_prompts_every  # the drift monitor's prompt perplexity samples prompts
        self._admitted_requests = 0
        self._base, self._head = split_model(model)
        cfg = model.config
        self._heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1)
        self.eos_token_id = tokenizer.eos_token_id
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._cancels: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._waiting: list[Request] = []
        self._running: list[Seq] = []
        self._cache: Any = None  # DynamicCache of the running batch
        self._mask: torch.Tensor | None = None  # (B, T) 1 for real tokens, 0 for left padding
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._admitting: list[Seq] = []  # admitted this iteration: in the step even before they join `_running`
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "requests": 0, "failed_steps": 0}
        # For the metrics (monitor.py reads them from the event loop's side): the token slots the batch's cache
        # holds now (`BatchShape.slots` of the block last allocated), and each sequence's gaps between consecutive
        # tokens (its inter-token latency, prefills of others included), oldest dropped past TOKEN_GAPS_KEPT.
        self.kv_slots_allocated = 0
        self.token_gaps: collections.deque[float] = collections.deque(maxlen=TOKEN_GAPS_KEPT)
        self._last_token_s: weakref.WeakKeyDictionary[Seq, float] = weakref.WeakKeyDictionary()

    @property
    def max_batch_tokens(self) -> int:
        """The KV-cache budget in token slots (the scheduler's)."""
        return self.scheduler.max_batch_tokens

    @property
    def fatal_error(self) -> str | None:
        """Why the engine failed for good (None: it has not)."""
        return self.health.fatal_error

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        """Start the generation thread."""
        if self.device.type == "cpu":
            bound_cpu_allocator()
        self.health.last_step_s = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="llmp-engine", daemon=True)
        self._thread.start()

    def health_problem(self) -> str | None:
        """Why the engine is unhealthy, or None: its thread is not running, it failed for good (a device error,
        repeated failed steps), or a step has stalled while requests are pending."""
        if self._thread is None or not self._thread.is_alive():
            return "the generation thread is not running"
        return self.health.problem(work_pending=bool(self.num_running() or self.num_waiting()))

    def healthy(self) -> bool:
        """Nothing is wrong (`health_problem`)."""
        return self.health_problem() is None

    def num_waiting(self) -> int:
        """Requests waiting for a batch slot."""
        return self._inbox.qsize() + len(self._waiting)

    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self._running)

    def kv_cache_used_fraction(self) -> float:
        """The share of the KV-cache budget (`max_batch_tokens`) the running batch's cache holds now."""
        return self.kv_slots_allocated / max(self.max_batch_tokens, 1)

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the admitted ones finish (up to `drain_timeout_s`), then stop the thread."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while (self.num_running() or self.num_waiting()) and time.monotonic() < deadline and self.healthy():
            time.sleep(0.05)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ requests (event-loop side)
    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True, interval: int = 1,
               max_delay_s: float = 0.0) -> Request:
        """Queue a request; its events arrive on `request.queue` in the calling event loop: when `stream`, the first
        token's at once and then one every `interval` steps (sooner once `max_delay_s` has passed, and at the end);
        else the first token's and then the rest at once when the request finishes."""
        if self._draining or not self.healthy():
            raise EngineStopped("the engine is shutting down or unhealthy")
        if params.n > self.max_batch_size:  # it could never be admitted
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.max_batch_size}")
        if not self.scheduler.fits_alone(len(prompt_ids), params.max_tokens, params.n):
            slots = BatchShape.of_request(len(prompt_ids), params.max_tokens, params.n).slots
            raise RequestTooLarge(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) x n ({params.n}) needs "
                f"{slots} tokens of KV cache, more than this replica's budget of {self.max_batch_tokens} tokens "
                "(serve.engine.max_batch_tokens)")
        if self.num_waiting() >= self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting()} requests are waiting for a batch slot")
        hold = (max(1, interval), max_delay_s) if stream else (math.inf, math.inf)
        req = Request(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue(), stream=stream,
                       hold=ChunkHold(interval=hold[0], max_delay_s=hold[1]))
        self._inbox.put(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (client gone); its sequences leave the batch at the next iteration."""
        req.cancelled = True
        self._cancels.put(req)
        self._wake.set()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True,
                       interval: int = 1, max_delay_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        """Events of one request until it finishes; closing the iterator early cancels the request.

        The first token's event goes out at once. With `interval` > 1 the engine then holds a streamed request's
        tokens until `interval` steps (tokens per sequence) have gathered, or `max_delay_s` has passed since the
        oldest held one (checked at each step, so a token waits at most about max_delay_s plus one step), or the
        request ends: one streamed chunk carries several tokens, as OpenAI's may. Each chunk costs the same HTTP,
        Ray Serve and event-loop work whatever it holds, so this trades per-token smoothness for throughput (vLLM's
        stream interval). Events that queued up while the caller was busy (a slow client, a loaded replica) go
        out as one.
        """
        req = self.submit(prompt_ids, params, stream, interval, max_delay_s)
        finished = False
        try:
            while not finished:
                out: RequestOutput = await req.queue.get()
                while not out.finished and not req.queue.empty():
                    nxt: RequestOutput = req.queue.get_nowait()
                    if nxt.error:
                        yield out
                        out = nxt
                        break
                    out = coalesce(out, nxt)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.cancel(req)

    # ------------------------------------------------------------------ generation thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                did_work = self._iteration()
            except Exception as e:  # a bad step fails its requests; the health record decides about the replica
                self.stats["failed_steps"] += 1
                eid = self.health.step_failed(e)
                self._fail_step(f"internal error (id {eid})", everyone=self.health.fatal_error is not None)
            else:
                self.health.iteration_done(did_work)

    def _iteration(self) -> bool:
        """Admit, then prefill the admitted or decode the batch; False when there was nothing to do."""
        while not self._inbox.empty():
            self._waiting.append(self._inbox.get_nowait())
        while not self._cancels.empty():
            req = self._cancels.get_nowait()
            self._waiting = [r for r in self._waiting if r is not req]
            self._keep([s for s in self._running if s.req is not req])
        running = self._shape() if self._running else BatchShape()
        count, shape = self.scheduler.admit(running, (Candidate(len(r.prompt_ids), r.params.max_tokens, r.params.n)
                                                      for r in self._waiting))
        admitted: list[Seq] = []
        for req in self._waiting[:count]:
            every = self.score_prompts_every
            req.score_prompt = bool(every) and self._admitted_requests % every == 0
            self._admitted_requests += 1
            base = req.params.seed if req.params.seed is not None else random.getrandbits(62)
            seqs = [Seq(req, i, self.tokenizer, base + i) for i in range(req.params.n)]
            req.open_seqs = len(seqs)
            admitted += seqs
        del self._waiting[:count]
        if admitted:
            self._admitting = admitted
            self._prefill(admitted, shape)
            self._admitting = []
        elif self._running:
            self._decode()
        else:
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            return False
        return True

    def _shape(self) -> BatchShape:
        """The block the running batch needs now: its rows, its mask's width, room for its longest-to-go row."""
        assert self._mask is not None  # set whenever a batch runs
        return BatchShape.of_running(self._mask.shape[1],
                                     [(s.req.params.max_tokens, len(s.tokens)) for s in self._running])

    def _forward(self, input_ids, mask, cache, all_positions: bool = False):
        """One forward pass; returns (position logits, last-position logits (B, V), cache).

        Only the last position's logits are computed for generation. `all_positions` (prompt log-probs wanted)
        also returns a `PositionLogits` that computes the rest a chunk at a time, so a long prompt never has its
        full (L, V) logits in memory at once.
        """
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True)
        if self._base is not None and self._head is not None:  # (split_model sets both or neither)
            out = self._base(**kwargs)
            hidden = out.last_hidden_state  # (B, L, H): small next to (B, L, V)
            scores = PositionLogits(hidden=hidden, head=self._head) if all_positions else None
            return scores, self._head(hidden[:, -1, :]), out.past_key_values
        # A model whose logits are not just its output head over the last hidden state (a soft cap, a scale):
        # transformers' own `logits_to_keep` (0 keeps all positions).
        out = self.model(**kwargs, logits_to_keep=0 if all_positions else 1)
        scores = PositionLogits(logits=out.logits) if all_positions else None
        return scores, out.logits[:, -1, :], out.past_key_values

    def _wants_prompt_logprobs(self, seq: Seq) -> bool:
        p = seq.req.params
        return seq.index == 0 and not seq.req.prompt_sent and (
            seq.req.score_prompt or (p.echo and p.logprobs is not None))

    def _prefill(self, seqs: list[Seq], shape: BatchShape) -> None:
        """Prefill the admitted sequences and join them to the running batch, whose cache becomes the block `shape`
        (what the scheduler admitted: the running rows and these, the widest row, room for the longest to go).

        Memory is what this is shaped by. The sequences are prefilled in groups whose attention scores (rows x
        heads x width^2 floats, what an eager or masked attention holds per layer) stay within
        `PREFILL_SCORE_BYTES` (four 1k-token prompts at once held 200 MB of scores per layer on CPU; one at a
        time, 50 MB, at no cost in throughput: a 1k-token prefill is compute-bound on its own). The batch's new
        cache is allocated once, at its final size with room for the tokens to come; the running rows move into
        it layer by layer, and each group's rows are copied in and dropped right after its forward pass. So the
        peak is the new cache, one old layer, one group's cache and one forward's activations; joining all at
        the end held every group's cache and the old cache beside the new one.
        """
        groups: list[list[Seq]] = [[]]
        for s in sorted(seqs, key=lambda s: len(s.req.prompt_ids)):
            width = len(s.req.prompt_ids)
            if groups[-1] and (len(groups[-1]) + 1) * width * width * self._heads * 4 > PREFILL_SCORE_BYTES:
                groups.append([])
            groups[-1].append(s)
        new = [s for group in groups for s in group]
        running: list[Seq] = self._running if self._cache is not None else []
        masks: list[torch.Tensor] = []
        if running:
            assert self._mask is not None  # set whenever a batch runs
            masks.append(self._mask)
        width = shape.width  # the widest prompt or the running batch's width: the scheduler's `join`
        old_cache = self._cache
        self._running = running + new
        lasts: list[torch.Tensor] = []
        row = len(running)
        if running:  # the running rows move into the new buffers first; every group then writes in place
            self._cache = rebuild([(old_cache, len(running))], shape)
            old_cache = None
        for i, group in enumerate(groups):
            if i == 0 and not running:
                # No batch yet: the layers' shapes come from the first forward pass, whose rows are copied in.
                cache, mask, last = self._prefill_group(group)
                self._cache = rebuild([(old_cache, len(running)), (cache, len(group))], shape)
                old_cache = cache = None
            else:  # the rows' keys and values are written in place, straight into the batch's buffers
                cols = max(len(s.req.prompt_ids) for s in group)
                _, mask, last = self._prefill_group(group, rows_view(self._cache, row, len(group), width, cols))
            row, lasts, masks = row + len(group), lasts + [last], masks + [mask]
            if self.device.type == "cpu":
                release_freed_memory()
        self._mask = torch.cat([torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1) for m in masks])
        self.kv_slots_allocated = shape.slots
        self._step_tokens(torch.cat(lasts), new)

    def _prefill_group(self, seqs: list[Seq], cache=None):
        """One prefill forward pass into `cache` (a new DynamicCache if None): (the cache, its (B, T) mask, its
        last-position logits (B, V))."""
        from transformers import DynamicCache

        lengths = [len(s.req.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # left padding, so every row's next token goes in the last column
            ids[row, width - lengths[row]:] = torch.tensor(s.req.prompt_ids)
            mask[row, width - lengths[row]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache() if cache is None else cache
        wanted = any(self._wants_prompt_logprobs(s) for s in seqs)
        # Long prompts go through in chunks of PREFILL_CHUNK_TOKENS columns, each attending to the cache so far:
        # a forward pass's activations (its attention scores above all) scale with the chunk, not the prompt.
        # The `logits_to_keep` fallback computes all positions' logits in one pass when they are wanted.
        step = width if (wanted and self._base is None) else PREFILL_CHUNK_TOKENS
        hidden = []
        for a in range(0, width, step):
            b = min(width, a + step)
            scores, last, cache = self._forward(ids[:, a:b], mask[:, :b], cache, all_positions=wanted)
            if wanted and scores.hidden is not None:
                hidden.append(scores.hidden)
        if hidden:
            scores = PositionLogits(hidden=torch.cat(hidden, dim=1), head=self._head)  # (B, width, H)
        for row, s in enumerate(seqs):
            if s.index == 0 and not s.req.prompt_sent:
                if self._wants_prompt_logprobs(s):
                    s.req.prompt_logprobs = self._prompt_logprobs(scores, row, width - lengths[row],
                                                                  s.req.prompt_ids, s.req.params)
                s.req.prompt_sent = True
                self.stats["prompt_tokens"] += lengths[row]
                self.stats["requests"] += 1
        return cache, mask, last

    def _prompt_logprobs(self, scores: PositionLogits, row: int, start: int, ids: list[int],
                         params: SamplingParams) -> list[TokenLogprob]:
        """Log-probability of each prompt token given the ones before it (None for the first), computed over
        `LOGIT_CHUNK` positions at a time; the prompt starts at column `start` of row `row`."""
        k = (params.logprobs or 0) if params.echo else 0
        chosen: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        for a in range(0, len(ids) - 1, LOGIT_CHUNK):
            b = min(a + LOGIT_CHUNK, len(ids) - 1)
            logp = scores.rows(row, start + a, start + b).float().log_softmax(dim=-1)  # (b - a, V)
            target = torch.tensor(ids[a + 1:b + 1], device=logp.device)
            chosen += logp.gather(1, target[:, None]).squeeze(1).tolist()
            if k:
                values, indices = logp.topk(k, dim=-1)
                tops += [list(zip(i.tolist(), v.tolist())) for v, i in zip(values, indices)]
            else:
                tops += [[] for _ in range(b - a)]
        return [TokenLogprob(ids[0], None)] + [TokenLogprob(t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops)]

    def _keep(self, keep: list[Seq]) -> None:
        """Shrink the batch to `keep` (a sub-list of the running sequences) and trim all-padding columns (layer by
        layer, as `_prefill` does)."""
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            self.kv_slots_allocated = 0
            return
        assert self._mask is not None  # set whenever a batch runs
        rows = torch.tensor([self._running.index(s) for s in keep], device=self.device)
        mask = self._mask[rows]
        first = int((mask.sum(dim=0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._mask, self._running = mask[:, first:], keep
        shape = self._shape()  # never more than admitted: fewer rows, and each step since moved a column from room
        for i, layer in enumerate(self._cache.layers):
            self._cache.layers[i] = gathered_layer([(layer.keys, layer.values, rows.tolist(), first)], shape)
            layer.keys = layer.values = layer.kbuf = layer.vbuf = None
        self.kv_slots_allocated = shape.slots
        if self.device.type == "cpu":
            release_freed_memory()

    def _decode(self) -> None:
        last = torch.tensor([[s.tokens[-1]] for s in self._running], device=self.device)  # (B, 1)
        assert self._mask is not None  # set whenever a batch runs
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._running), 1))], dim=1)
        _, logits, self._cache = self._forward(last, self._mask, self._cache)
        self._step_tokens(logits, self._running)

    def _step_tokens(self, logits: torch.Tensor, seqs: list[Seq]) -> None:
        """One token for each of `seqs` (rows of `logits`, (B, V)): sample, advance each sequence, send what each
        request's chunking lets go, and drop the finished sequences from the batch."""
        infos = sample_step(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(seqs)
        by_request: dict[int, tuple[Request, list[SeqDelta]]] = {}
        finished: set[int] = set()
        now = time.monotonic()
        for seq, info in zip(seqs, infos):
            last = self._last_token_s.get(seq)  # None for a first token (that is time to first token)
            if last is not None:
                self.token_gaps.append(now - last)
            self._last_token_s[seq] = now
            delta = seq.advance(info, self.eos_token_id, self.max_positions)
            if delta.finish_reason:
                finished.add(id(seq))
                seq.req.open_seqs -= 1
            if not seq.req.cancelled:
                by_request.setdefault(id(seq.req), (seq.req, []))[1].append(delta)
        self._send(by_request.values())
        if finished:
            self._keep([s for s in self._running if id(s) not in finished])

    def _send(self, step: Iterable[tuple[Request, list[SeqDelta]]]) -> None:
        """Each request's event of this step, unless its chunking holds the deltas back."""
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        now = time.monotonic()
        for req, deltas in step:
            done = req.open_seqs == 0
            released = req.hold.release(deltas, done, now)
            if released is None:
                continue
            deliveries.setdefault(req.loop, []).append((req.queue, RequestOutput(released, req.prompt_logprobs,
                                                                                  finished=done)))
            req.prompt_logprobs = None
        # One wake-up per event loop per step, not one per request: each call_soon_threadsafe writes the loop's
        # self-pipe and makes the loop thread contend for the GIL with this one.
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(deliver, items)

    def _fail_step(self, message: str, everyone: bool = False) -> None:
        """End the requests of the step that failed (all waiting ones too when `everyone`) with `message`, and
        drop the batch: its cache may be half built."""
        in_step = [s.req for s in self._running + self._admitting] + (self._waiting if everyone else [])
        if everyone:
            while not self._inbox.empty():
                in_step.append(self._inbox.get_nowait())
        for req in {id(r): r for r in in_step}.values():
            try:
                if req.hold.pending and req.stream:  # tokens held for a streamed chunk go out before the error
                    req.loop.call_soon_threadsafe(req.queue.put_nowait,
                                                  RequestOutput(merge_deltas(req.hold.pending)))
                    req.hold.pending = []
                req.loop.call_soon_threadsafe(req.queue.put_nowait, RequestOutput([], finished=True, error=message))
            except RuntimeError:  # its event loop is closed: nobody is waiting for it
                pass
        self._running, self._admitting, self._cache, self._mask = [], [], None, None
        self.kv_slots_allocated = 0
        if everyone:
            self._waiting = []
