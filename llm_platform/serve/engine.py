"""Batched generation with a KV cache and iteration-level (continuous) batching: plain torch, no Ray.

One background thread owns the model. Each iteration it admits waiting requests (one batched prefill of their
prompts, left-padded, whose KV cache is then merged into the running batch's) or, when nobody waits, runs one decode
step for every running sequence; finished sequences leave the batch at once, so a long request never holds short
ones back. Asyncio callers get their tokens through `call_soon_threadsafe`, so the model never blocks an event loop.

Why not `transformers`' own continuous batching (`generate_batch`, `init_continuous_batching`): it runs on CPU, but
sampling settings (do_sample, num_return_sequences) are fixed per manager, there is no per-request seed, and its
outputs carry no top-k alternatives and no prompt log-probabilities, all of which the OpenAI API (`seed`, `n`,
`logprobs`, `echo`) needs. The batch here is a plain `DynamicCache` of shape (B, H, T, D) per layer with a padding
mask, which works for any HF decoder (GPT-2, Llama, ...) that accepts `position_ids`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_platform.serve.sampling import SamplingParams, StopMatcher, TextStream, TokenLogprob, sample_step

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
"""Prompt positions whose full-vocabulary logits exist at once when prompt log-probabilities are computed."""


class PositionLogits:
    """Logits of any prompt positions of a prefill, computed on demand from the hidden states (or sliced from
    logits a model computed whole)."""

    def __init__(self, hidden: torch.Tensor | None = None, head=None, logits: torch.Tensor | None = None):
        self.hidden, self.head, self.logits = hidden, head, logits

    def rows(self, row: int, start: int, end: int) -> torch.Tensor:
        """(end - start, V) logits of positions [start, end) of batch row `row`."""
        if self.logits is not None:
            return self.logits[row, start:end]
        assert self.hidden is not None and self.head is not None  # built with either logits or hidden and head
        return self.head(self.hidden[row, start:end])


def split_model(model) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(base model, output head) when the causal LM's logits are exactly the head over the base's last hidden
    state (GPT-2, Llama, Mistral, Qwen2...), checked on a few tokens; else (None, None) and the engine asks the model
    for the positions it needs (`logits_to_keep`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or base is model:
        return None, None
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None, :] % max(int(model.config.vocab_size), 2)
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = head(base(input_ids=ids).last_hidden_state).float()
    except Exception:  # noqa: BLE001 - an unusual model: use its own forward
        return None, None
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        return None, None
    return base, head


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values, the model's dtype)."""
    cfg = model.config
    # A missing attribute reads as 0 (falsy, as None would), so the fallback name or default applies.
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", heads))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def default_batch_tokens(model, per_token: int, memory_fraction: float = 0.5) -> int:
    """KV-cache tokens a replica may hold: `memory_fraction` of the accelerator's free memory after the weights
    (CUDA), or of the machine's available memory (CPU), over the bytes a token takes; at least one full context."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:  # pragma: no cover - psutil comes with Ray
            free = 8 * 2**30
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    return max(context, int(free * memory_fraction) // max(per_token, 1))


@dataclass
class SeqDelta:
    """New output of one sequence (choice `index`) since the previous event."""

    index: int
    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One event of a request: deltas of its sequences; the first event carries the prompt's log-probabilities."""

    deltas: list[SeqDelta]
    prompt_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    error: str | None = None


@dataclass
class ChunkHold:
    """When a request's deltas go out. The first event at once; after it, deltas are held until `interval` engine
    steps have gathered (or `max_delay_s` has passed since the oldest held one, or the request ends), so the reader's
    event loop wakes once a chunk, not once a token. A non-streamed request holds them to its end (an unbounded
    interval and delay): its loop wakes twice, at the first token (time to first token) and at the last."""

    interval: float = 1
    max_delay_s: float = 0.0
    first_sent: bool = False
    pending: list[SeqDelta] = field(default_factory=list)
    held_steps: int = 0
    held_since: float = 0.0

    def release(self, deltas: list[SeqDelta], done: bool, now: float) -> list[SeqDelta] | None:
        """The deltas to send now (the held ones merged in), or None while this step's are held too."""
        if self.first_sent and not done:
            if not self.held_steps:
                self.held_since = now
            self.held_steps += 1
            if self.held_steps < self.interval and now - self.held_since < self.max_delay_s:
                self.pending += deltas
                return None
        self.held_steps = 0
        out = _merge_deltas(self.pending + deltas) if self.pending else deltas
        self.pending, self.first_sent = [], True
        return out


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool = True
    hold: ChunkHold = field(default_factory=ChunkHold)
    open_seqs: int = 0
    cancelled: bool = False
    score_prompt: bool = False
    """Its prompt log-probabilities are computed (the drift monitor samples them, or `echo` with `logprobs`)."""
    prompt_sent: bool = False
    prompt_logprobs: list[TokenLogprob] | None = None
    """Computed at prefill; sent with the first event, then dropped."""


class _Seq:
    """One sequence (choice `index`) of a request: its tokens, text stream, stop matcher and generator."""

    def __init__(self, req: _Request, index: int, tokenizer, seed: int):
        self.req, self.index = req, index
        self.tokens: list[int] = []
        self.stream = TextStream(tokenizer, req.prompt_ids)
        self.stop = StopMatcher(req.params.stop)
        self.generator = torch.Generator().manual_seed(seed)
        self.final_length = len(req.prompt_ids) + req.params.max_tokens  # its longest: what admission reserves

    def advance(self, info: TokenLogprob, eos_token_id: int | None, max_positions: int) -> SeqDelta:
        """Append the sampled token; its new text (detokenized, cut at a stop string) and why it ends, if it does."""
        token, p = info.token_id, self.req.params
        self.tokens.append(token)
        if token == eos_token_id and not p.ignore_eos:
            return SeqDelta(self.index, self.stop.feed(self.stream.flush(), final=True), [info], "stop")
        at_limit = len(self.tokens) >= p.max_tokens or len(self.req.prompt_ids) + len(self.tokens) >= max_positions
        text = self.stop.feed(self.stream.push(token), final=at_limit)
        if self.stop.stopped:
            return SeqDelta(self.index, text, [info], "stop")
        if at_limit:
            return SeqDelta(self.index, text + self.stop.feed(self.stream.flush(), final=True), [info], "length")
        return SeqDelta(self.index, text, [info])


def load_model(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """Model and tokenizer of an HF-format folder; weights only from safetensors (never pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: serve.model must be an HF-format model folder")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors in {folder}: weights are loaded only from safetensors")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                                  dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def _merge_deltas(deltas: list[SeqDelta]) -> list[SeqDelta]:
    """Consecutive deltas as one per sequence: text and tokens joined in order, the last finish reason."""
    merged: dict[int, SeqDelta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = SeqDelta(d.index, d.text, list(d.tokens), d.finish_reason)
        else:
            m.text += d.text
            m.tokens += d.tokens
            m.finish_reason = d.finish_reason or m.finish_reason
    return list(merged.values())


def _coalesce(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive events of one request as one: each sequence's text and tokens joined, the later finish."""
    return RequestOutput(_merge_deltas(first.deltas + then.deltas), first.prompt_logprobs or then.prompt_logprobs,
                         then.finished)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """Runs in the callers' event loop: hand each request its event."""
    for q, out in items:
        q.put_nowait(out)


def _reserved_class():
    """`_ReservedLayer`, made on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    global _ReservedLayer
    if _ReservedLayer is None:
        class Reserved(DynamicLayer):
            """A `DynamicLayer` whose keys and values are views of buffers with room for the batch's remaining
            tokens: a decode step writes its column in place. `DynamicLayer.update` concatenated, allocating the
            whole layer anew at every step and leaving the old block to the allocator (on CPU, glibc kept the
            freed blocks: the resident set grew well past the cache). Past the room it concatenates again."""

            def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
                super().__init__()
                self.kbuf, self.vbuf = kbuf, vbuf
                self.dtype, self.device, self.is_initialized = kbuf.dtype, kbuf.device, True
                self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]

            def update(self, key_states, value_states, *args, **kwargs):
                t, n = self.keys.shape[-2], key_states.shape[-2]
                if t + n > self.kbuf.shape[-2]:
                    self.kbuf = self.keys = torch.cat([self.keys, key_states], dim=-2)
                    self.vbuf = self.values = torch.cat([self.values, value_states], dim=-2)
                    return self.keys, self.values
                self.kbuf[:, :, t:t + n] = key_states
                self.vbuf[:, :, t:t + n] = value_states
                self.keys, self.values = self.kbuf[:, :, :t + n], self.vbuf[:, :, :t + n]
                return self.keys, self.values

        _ReservedLayer = Reserved
    return _ReservedLayer


_ReservedLayer = None


def _libc():
    """glibc through ctypes, or None (another C library, another OS)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def bound_cpu_allocator() -> None:
    """Make the resident set of a CPU replica follow what it holds (called once when a CPU engine starts).

    glibc serves blocks below its mmap threshold from its heap and keeps the pages of freed ones; the threshold
    also rises by itself (up to 32 MB) each time a large block is freed. A replica's large tensors (prefill
    activations, cache layers) then stay resident after use: in the serving-memory benchmark the resident set
    sat about 0.4x the allowance above what the engine held. A fixed 8 MB threshold puts every block from 8 MB
    up in its own mapping, returned when freed; the per-step tensors (one row of logits per sequence, a few MB)
    stay in the heap, so decode steps fault in no new pages (the benchmark's time did not change)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, CPU_MMAP_THRESHOLD_BYTES)  # -3: M_MMAP_THRESHOLD


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`), after the batch changes shape (a
    prefill, a shrink), never per decode step."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC = None
CPU_MMAP_THRESHOLD_BYTES = 8 << 20


def _gathered_layer(parts: list[tuple[torch.Tensor, torch.Tensor, list[int], int]], rows: int, width: int,
                    room: int):
    """A reserved layer of `rows` rows and `width` columns (+ `room`) filled from `parts`: (keys, values, the rows
    to take, the column they start at), each right-aligned (left padding is zeros). Copies straight into the new
    buffers, so no intermediate concatenation is ever allocated."""
    keys = parts[0][0]
    h, d = keys.shape[1], keys.shape[3]
    kbuf, vbuf = keys.new_zeros((rows, h, width + room, d)), keys.new_zeros((rows, h, width + room, d))
    out = 0
    for k, v, take, first in parts:
        cols = k.shape[2] - first
        for r in take:
            kbuf[out, :, width - cols:width].copy_(k[r, :, first:])
            vbuf[out, :, width - cols:width].copy_(v[r, :, first:])
            out += 1
    return _reserved_class()(kbuf, vbuf, width)


class Engine:
    """Continuous-batching generator over one HF causal LM.

    Args:
        model: an HF causal LM (eval mode).
        tokenizer: its tokenizer.
        max_batch_size: sequences decoded together at most.
        max_waiting: requests allowed to wait for a slot before `submit` raises `EngineOverloaded`.
        max_prefill_tokens: prompt tokens prefilled in one iteration at most (bounds the decode stall).
        max_batch_tokens: KV-cache budget in tokens (rows x longest final length of the running batch); None
            derives it from free memory (`default_batch_tokens`).
        score_prompts_every: compute the prompt log-probabilities of every Nth request (the drift monitor's
            perplexity samples them; 0: none), besides those of requests that ask (`echo` with `logprobs`).
        kv_memory_fraction: with `max_batch_tokens` None, the share of free memory the cache may take.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, max_batch_tokens: int | None = None, score_prompts_every: int = 1,
                 kv_memory_fraction: float = 0.5):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting, self.max_prefill_tokens = max_batch_size, max_waiting, max_prefill_tokens
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0)
                                 or getattr(model.config, "n_positions", 2048))
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.max_batch_tokens = int(max_batch_tokens or default_batch_tokens(model, self.kv_bytes_per_token,
                                                                             kv_memory_fraction))
        self.score_prompts_every = score_prompts_every  # the drift monitor's prompt perplexity samples prompts
        self._admitted_requests = 0
        self._base, self._head = split_model(model)
        cfg = model.config
        self._heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1)
        self.eos_token_id = tokenizer.eos_token_id
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._cancels: queue.Queue[_Request] = queue.Queue()
        self._wake = threading.Event()
        self._waiting: list[_Request] = []
        self._running: list[_Seq] = []
        self._cache: Any = None  # DynamicCache of the running batch
        self._mask: torch.Tensor | None = None  # (B, T) 1 for real tokens, 0 for left padding
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fatal_error: str | None = None
        self.last_step_s = time.monotonic()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "requests": 0}

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        """Start the generation thread."""
        if self.device.type == "cpu":
            bound_cpu_allocator()
        self._thread = threading.Thread(target=self._loop, name="llmp-engine", daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """The generation thread is alive and has not hit a fatal error."""
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    def num_waiting(self) -> int:
        """Requests waiting for a batch slot."""
        return self._inbox.qsize() + len(self._waiting)

    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self._running)

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
               max_delay_s: float = 0.0) -> _Request:
        """Queue a request; its events arrive on `request.queue` in the calling event loop: when `stream`, the first
        token's at once and then one every `interval` steps (sooner once `max_delay_s` has passed, and at the end);
        else the first token's and then the rest at once when the request finishes."""
        if self._draining or not self.healthy():
            raise EngineStopped("the engine is shutting down or unhealthy")
        if params.n > self.max_batch_size:  # it could never be admitted
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.max_batch_size}")
        if self.footprint(params.n, len(prompt_ids) + params.max_tokens) > self.max_batch_tokens:
            raise RequestTooLarge(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) x n ({params.n}) needs more "
                f"KV cache than this replica's budget of {self.max_batch_tokens} tokens "
                "(serve.engine.max_batch_tokens)")
        if self.num_waiting() >= self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting()} requests are waiting for a batch slot")
        hold = (max(1, interval), max_delay_s) if stream else (math.inf, math.inf)
        req = _Request(list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue(), stream=stream,
                       hold=ChunkHold(interval=hold[0], max_delay_s=hold[1]))
        self._inbox.put(req)
        self._wake.set()
        return req

    def cancel(self, req: _Request) -> None:
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
                    out = _coalesce(out, nxt)
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
                self._iteration()
            except Exception as e:  # a bad batch fails its requests, not the replica
                log.exception("generation step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            self.last_step_s = time.monotonic()

    def _iteration(self) -> None:
        while not self._inbox.empty():
            self._waiting.append(self._inbox.get_nowait())
        while not self._cancels.empty():
            req = self._cancels.get_nowait()
            self._waiting = [r for r in self._waiting if r is not req]
            self._keep([s for s in self._running if s.req is not req])
        admitted: list[_Seq] = []
        budget = self.max_prefill_tokens
        # The cache is one left-padded (B, T) block, so what a batch can come to hold is its row count times its
        # longest row at the end (prompt + max_tokens): admission keeps that within `max_batch_tokens`.
        longest = max((s.final_length for s in self._running), default=0)
        while self._waiting and len(self._running) + len(admitted) + self._waiting[0].params.n <= self.max_batch_size:
            req = self._waiting[0]
            if admitted and len(req.prompt_ids) * req.params.n > budget:
                break
            final = len(req.prompt_ids) + req.params.max_tokens
            rows = len(self._running) + len(admitted) + req.params.n
            if self.footprint(rows, max(longest, final)) > self.max_batch_tokens:
                break  # it waits until finished sequences make room (submit refused any that never could fit)
            longest = max(longest, final)
            self._waiting.pop(0)
            budget -= len(req.prompt_ids) * req.params.n
            every = self.score_prompts_every
            req.score_prompt = bool(every) and self._admitted_requests % every == 0
            self._admitted_requests += 1
            base = req.params.seed if req.params.seed is not None else random.getrandbits(62)
            seqs = [_Seq(req, i, self.tokenizer, base + i) for i in range(req.params.n)]
            req.open_seqs = len(seqs)
            admitted += seqs
        if admitted:
            self._prefill(admitted)
        elif self._running:
            self._decode()
        else:
            self._wake.wait(timeout=0.1)
            self._wake.clear()

    def footprint(self, rows: int, longest: int) -> int:
        """KV-cache tokens of a batch of `rows` sequences whose longest is `longest` tokens (the padded block)."""
        return rows * longest

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

    def _wants_prompt_logprobs(self, seq: _Seq) -> bool:
        p = seq.req.params
        return seq.index == 0 and not seq.req.prompt_sent and (
            seq.req.score_prompt or (p.echo and p.logprobs is not None))

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prefill the admitted sequences and join them to the running batch.

        Memory is what this is shaped by. The sequences are prefilled in groups whose attention scores (rows x
        heads x width^2 floats, what an eager or masked attention holds per layer) stay within
        `PREFILL_SCORE_BYTES` (four 1k-token prompts at once held 200 MB of scores per layer on CPU; one at a
        time, 50 MB, at no cost in throughput: a 1k-token prefill is compute-bound on its own). The batch's new
        cache is allocated once, at its final size with room for the tokens to come; the running rows move into
        it layer by layer, and each group's rows are copied in and dropped right after its forward pass. So the
        peak is the new cache, one old layer, one group's cache and one forward's activations; joining all at
        the end held every group's cache and the old cache beside the new one.
        """
        groups: list[list[_Seq]] = [[]]
        for s in sorted(seqs, key=lambda s: len(s.req.prompt_ids)):
            width = len(s.req.prompt_ids)
            if groups[-1] and (len(groups[-1]) + 1) * width * width * self._heads * 4 > PREFILL_SCORE_BYTES:
                groups.append([])
            groups[-1].append(s)
        new = [s for group in groups for s in group]
        running: list[_Seq] = self._running if self._cache is not None else []
        masks: list[torch.Tensor] = []
        if running:
            assert self._mask is not None  # set whenever a batch runs
            masks.append(self._mask)
        width = max([len(s.req.prompt_ids) for s in new] + [m.shape[1] for m in masks])
        old_cache = self._cache
        self._running = running + new
        lasts: list[torch.Tensor] = []
        room, row = self._room(), len(running)
        if running:  # the running rows move into the new buffers first; every group then writes in place
            self._cache = self._rebuild([(old_cache, len(running))], len(self._running), width, room)
            old_cache = None
        for i, group in enumerate(groups):
            if i == 0 and not running:
                # No batch yet: the layers' shapes come from the first forward pass, whose rows are copied in.
                cache, mask, last = self._prefill_group(group)
                self._cache = self._rebuild([(old_cache, len(running)), (cache, len(group))], len(self._running),
                                             width, room)
                old_cache = cache = None
            else:  # the rows' keys and values are written in place, straight into the batch's buffers
                cols = max(len(s.req.prompt_ids) for s in group)
                _, mask, last = self._prefill_group(group, self._rows_view(row, len(group), width, cols))
            row, lasts, masks = row + len(group), lasts + [last], masks + [mask]
            if self.device.type == "cpu":
                _release_freed_memory()
        self._mask = torch.cat([torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1) for m in masks])
        self._step_tokens(torch.cat(lasts), new)

    def _rebuild(self, parts: list[tuple[Any, int]], rows: int, width: int, room: int):
        """A cache of `rows` rows, `width` columns + `room`, whose first rows come from `parts` ((cache or None,
        rows) in order; the rest are filled later), built layer by layer: each new layer is allocated, filled
        right-aligned, and the parts' layers dropped, so at most one layer is held twice."""
        from transformers import DynamicCache

        parts = [(c, n) for c, n in parts if c is not None and n]
        cache = DynamicCache()
        cache.layers = []
        for i in range(len(parts[0][0].layers)):
            sources = [c.layers[i] for c, _ in parts]
            _, h, _, d = sources[0].keys.shape
            kbuf = sources[0].keys.new_zeros((rows, h, width + room, d))
            vbuf = torch.zeros_like(kbuf)
            at = 0
            for layer in sources:
                n, cols = layer.keys.shape[0], layer.keys.shape[2]
                kbuf[at:at + n, :, width - cols:width].copy_(layer.keys)
                vbuf[at:at + n, :, width - cols:width].copy_(layer.values)
                at += n
                layer.keys = layer.values = layer.kbuf = layer.vbuf = None
            cache.layers.append(_reserved_class()(kbuf, vbuf, width))
        return cache

    def _rows_view(self, row: int, rows: int, width: int, cols: int):
        """A cache whose layers write into rows [row, row + rows) of the batch cache, right-aligned at `width`, for
        a prefill of `cols` columns (nothing is allocated: its keys and values are views of the batch's)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = [_reserved_class()(layer.kbuf[row:row + rows, :, width - cols:width],
                                          layer.vbuf[row:row + rows, :, width - cols:width], 0)
                        for layer in self._cache.layers]
        return cache

    def _prefill_group(self, seqs: list[_Seq], cache=None):
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

    def _keep(self, keep: list[_Seq]) -> None:
        """Shrink the batch to `keep` (a sub-list of the running sequences) and trim all-padding columns (layer by
        layer, as `_prefill` does)."""
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None  # set whenever a batch runs
        rows = torch.tensor([self._running.index(s) for s in keep], device=self.device)
        mask = self._mask[rows]
        first = int((mask.sum(dim=0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._mask, self._running = mask[:, first:], keep
        room = self._room()
        width = self._mask.shape[1]
        for i, layer in enumerate(self._cache.layers):
            self._cache.layers[i] = _gathered_layer([(layer.keys, layer.values, rows.tolist(), first)], len(keep),
                                                    width, room)
            layer.keys = layer.values = layer.kbuf = layer.vbuf = None
        if self.device.type == "cpu":
            _release_freed_memory()

    def _room(self) -> int:
        """Cache columns the running batch can still add: one per token its longest-to-go sequence may generate."""
        return max(s.req.params.max_tokens - len(s.tokens) for s in self._running) + 1

    def _decode(self) -> None:
        last = torch.tensor([[s.tokens[-1]] for s in self._running], device=self.device)  # (B, 1)
        assert self._mask is not None  # set whenever a batch runs
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._running), 1))], dim=1)
        _, logits, self._cache = self._forward(last, self._mask, self._cache)
        self._step_tokens(logits, self._running)

    def _step_tokens(self, logits: torch.Tensor, seqs: list[_Seq]) -> None:
        """One token for each of `seqs` (rows of `logits`, (B, V)): sample, advance each sequence, send what each
        request's chunking lets go, and drop the finished sequences from the batch."""
        infos = sample_step(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(seqs)
        by_request: dict[int, tuple[_Request, list[SeqDelta]]] = {}
        finished: set[int] = set()
        for seq, info in zip(seqs, infos):
            delta = seq.advance(info, self.eos_token_id, self.max_positions)
            if delta.finish_reason:
                finished.add(id(seq))
                seq.req.open_seqs -= 1
            if not seq.req.cancelled:
                by_request.setdefault(id(seq.req), (seq.req, []))[1].append(delta)
        self._send(by_request.values())
        if finished:
            self._keep([s for s in self._running if id(s) not in finished])

    def _send(self, step: Iterable[tuple[_Request, list[SeqDelta]]]) -> None:
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
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, message: str) -> None:
        reqs = {id(s.req): s.req for s in self._running} | {id(r): r for r in self._waiting}
        for req in reqs.values():
            if req.hold.pending and req.stream:  # tokens held for a streamed chunk go out before the error
                req.loop.call_soon_threadsafe(req.queue.put_nowait, RequestOutput(_merge_deltas(req.hold.pending)))
                req.hold.pending = []
            req.loop.call_soon_threadsafe(req.queue.put_nowait, RequestOutput([], finished=True, error=message))
        self._running, self._waiting, self._cache, self._mask = [], [], None, None
