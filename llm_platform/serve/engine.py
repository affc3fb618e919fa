"""Batched generation with a KV cache and iteration-level (continuous) batching: plain torch, no Ray.

One background thread runs the loop. Each iteration it admits waiting requests (one batched prefill of their prompts,
left-padded, whose KV cache is then merged into the running batch's) or, when nobody waits, runs one decode step for
every running sequence; finished sequences leave the batch at once, so a long request never holds short ones back.
Asyncio callers get their tokens through `call_soon_threadsafe`, so the model never blocks an event loop.

The `Engine` is a thin loop over three parts, as vLLM splits its engine:
- the `Scheduler` (scheduler.py) owns the queue, the running rows and the KV-cache block they hold: what joins the
  batch (the block it will allocate stays within the budget), what leaves it; no model, no tensors;
- the `ModelRunner` (model_runner.py) runs the prefill and decode forward passes and holds the cache tensors,
  allocated at exactly the block the scheduler granted;
- the `OutputProcessor` (outputs.py) turns each step's sampled tokens into text, stop-string cuts, finish reasons and
  the chunks each request's reader gets.
Whether the engine still works is its `StepHealth`'s (health.py: failed steps fail their requests, repeated failures
and stalls make the replica unhealthy).

Why not `transformers`' own continuous batching (`generate_batch`, `init_continuous_batching`): it runs on CPU, but
sampling settings (do_sample, num_return_sequences) are fixed per manager, there is no per-request seed, and its
outputs carry no top-k alternatives and no prompt log-probabilities, all of which the OpenAI API (`seed`, `n`,
`logprobs`, `echo`) needs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
import time
from collections.abc import AsyncIterator

import torch

from llm_platform.serve.health import StepHealth
from llm_platform.serve.kv_cache import bound_cpu_allocator
from llm_platform.serve.loading import (  # noqa: F401 - load_model, kv_bytes_per_token: the engine's public names too
    default_batch_tokens,
    kv_bytes_per_token,
    load_model,
)
from llm_platform.serve.model_runner import ModelRunner, PrefillRow
from llm_platform.serve.outputs import OutputProcessor
from llm_platform.serve.requests import (  # noqa: F401 - RequestOutput, SeqDelta: the engine's public names too
    ChunkHold,
    Request,
    RequestOutput,
    Seq,
    SeqDelta,
    coalesce,
)
from llm_platform.serve.sampling import SamplingParams, sample_step
from llm_platform.serve.scheduler import BatchShape, Scheduler

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many requests wait for a batch slot (the API answers 429 with Retry-After)."""


class EngineStopped(Exception):
    """The engine is draining or stopped (the API answers 503)."""


class RequestTooLarge(ValueError):
    """A request whose KV cache could never fit the replica's budget, even alone (the API answers 400)."""


HEALTH_RECHECK_S = 0.1  # how often `wait_idle` re-checks a step for a stall while no iteration ends


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
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0)
                                 or getattr(model.config, "n_positions", 2048))
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        budget = max_batch_tokens or default_batch_tokens(model, self.kv_bytes_per_token, kv_memory_fraction,
                                                          device_share)
        self.scheduler: Scheduler[Request, Seq] = Scheduler(int(budget), max_batch_size, max_prefill_tokens)
        self.runner = ModelRunner(model, tokenizer.pad_token_id)
        self.device = self.runner.device
        self.eos_token_id = tokenizer.eos_token_id
        self.outputs = OutputProcessor(self.eos_token_id, self.max_positions)
        self.health = StepHealth(stall_timeout_s, max_consecutive_failed_steps)
        self.score_prompts_every = score_prompts_every  # the drift monitor's prompt perplexity samples prompts
        self._admitted_requests = 0
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._cancels: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._settled = threading.Condition()  # notified after every iteration: `wait_idle` re-checks then
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._admitting: list[Seq] = []  # admitted this iteration: in the step even before they join the batch
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "requests": 0, "failed_steps": 0}

    # ------------------------------------------------------------------ the parts' state, by its old names
    @property
    def max_batch_tokens(self) -> int:
        """The KV-cache budget in token slots (the scheduler's)."""
        return self.scheduler.max_batch_tokens

    @property
    def kv_slots_allocated(self) -> int:
        """Token slots the batch's cache holds now (`BatchShape.slots` of the scheduler's `allocated` block)."""
        return self.scheduler.allocated.slots

    @property
    def token_gaps(self):
        """Each sequence's gaps between consecutive tokens, for the metrics sampler (the output processor's)."""
        return self.outputs.token_gaps

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
        return self._inbox.qsize() + len(self.scheduler.waiting)

    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.scheduler.running)

    def kv_cache_used_fraction(self) -> float:
        """The share of the KV-cache budget (`max_batch_tokens`) the running batch's cache holds now."""
        return self.kv_slots_allocated / max(self.max_batch_tokens, 1)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request runs or waits, or the engine is unhealthy (nothing more will finish), for at most
        `timeout_s`; whether it is idle. The generation thread wakes the wait after each iteration; it also
        re-checks every `HEALTH_RECHECK_S`, since a stalled step is noticed by the clock, not by an event."""
        deadline = time.monotonic() + timeout_s
        with self._settled:
            while (self.num_running() or self.num_waiting()) and self.healthy():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._settled.wait(min(left, HEALTH_RECHECK_S))
        return not (self.num_running() or self.num_waiting())

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the admitted ones finish (up to `drain_timeout_s`), then stop the thread."""
        self._draining = True
        if self._thread is not None and self._thread.is_alive():
            self.wait_idle(drain_timeout_s)
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
            with self._settled:
                self._settled.notify_all()

    def _iteration(self) -> bool:
        """Admit, then prefill the admitted or decode the batch; False when there was nothing to do."""
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get_nowait())
        while not self._cancels.empty():
            self._shrink(self.scheduler.cancel(self._cancels.get_nowait()))
        admitted, shape = self.scheduler.schedule()
        if admitted:
            self._admitting = [seq for req in admitted for seq in self._open(req)]
            self._prefill(self._admitting, shape)
            self._admitting = []
        elif self.scheduler.running:
            self._decode()
        else:
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            return False
        return True

    def _open(self, req: Request) -> list[Seq]:
        """An admitted request's sequences (one per choice), each with its own generator."""
        every = self.score_prompts_every
        req.score_prompt = bool(every) and self._admitted_requests % every == 0
        self._admitted_requests += 1
        base = req.params.seed if req.params.seed is not None else random.getrandbits(62)
        seqs = [Seq(req, i, self.tokenizer, base + i) for i in range(req.params.n)]
        req.open_seqs = len(seqs)
        return seqs

    def _prefill(self, seqs: list[Seq], shape: BatchShape) -> None:
        """Prefill the admitted sequences into the batch, whose cache becomes the block `shape` the scheduler
        granted, and take each one's first token."""
        rows = [PrefillRow(s.req.prompt_ids, self._prompt_scoring(s)) for s in seqs]
        result = self.runner.prefill(rows, len(self.scheduler.running), shape)
        for i, logprobs in result.prompt_logprobs.items():
            seqs[i].req.prompt_logprobs = logprobs
        for s in seqs:
            if s.index == 0 and not s.req.prompt_sent:
                s.req.prompt_sent = True
                self.stats["prompt_tokens"] += len(s.req.prompt_ids)
                self.stats["requests"] += 1
        new = [seqs[i] for i in result.order]  # the order of their cache rows
        self.scheduler.join(new, shape)
        self._step_tokens(result.logits, new)

    @staticmethod
    def _prompt_scoring(seq: Seq) -> int | None:
        """The top alternatives wanted with its prompt's log-probabilities, or None: not wanted (only the first
        sequence of a request scores the prompt, for the drift monitor's sample or `echo` with `logprobs`)."""
        p = seq.req.params
        if seq.index != 0 or seq.req.prompt_sent or not (seq.req.score_prompt or (p.echo and p.logprobs is not None)):
            return None
        return (p.logprobs or 0) if p.echo else 0

    def _decode(self) -> None:
        running = self.scheduler.running
        self._step_tokens(self.runner.decode([s.tokens[-1] for s in running]), running)

    def _step_tokens(self, logits: torch.Tensor, seqs: list[Seq]) -> None:
        """One token for each of `seqs` (rows of `logits`, (B, V)): sample, hand the tokens to the output processor,
        and drop the finished sequences from the batch."""
        infos = sample_step(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(seqs)
        finished = self.outputs.process(seqs, infos)
        if finished:
            self._shrink(self.scheduler.remove(lambda s: id(s) in finished))

    def _shrink(self, kept: tuple[list[int], BatchShape] | None) -> None:
        """The runner's cache follows the scheduler's batch after rows left (`Scheduler.remove`)."""
        if kept is not None:
            self.runner.keep(*kept)

    def _fail_step(self, message: str, everyone: bool = False) -> None:
        """End the requests of the step that failed (all waiting ones too when `everyone`) with `message`, and
        drop the batch: its cache may be half built."""
        in_step = [s.req for s in self.scheduler.running + self._admitting]
        in_step += self.scheduler.clear(waiting_too=everyone)
        if everyone:
            while not self._inbox.empty():
                in_step.append(self._inbox.get_nowait())
        self.outputs.fail(in_step, message)
        self._admitting = []
        self.runner.reset()
