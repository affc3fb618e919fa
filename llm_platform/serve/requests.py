"""What the engine keeps per request and sequence, and what it sends back: plain records, no model.

A request (`Request`) has one sequence (`Seq`) per choice (`n`); each decode step turns a sequence's new token
into a `SeqDelta` (its text, cut at stop strings, and why it ended: outputs.py), and `ChunkHold` decides when a
streamed request's deltas go out as one `RequestOutput`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from llm_platform.serve.sampling import SamplingParams, StopMatcher, TextStream, TokenLogprob
from llm_platform.serve.scheduler import Candidate


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
        out = merge_deltas(self.pending + deltas) if self.pending else deltas
        self.pending, self.first_sent = [], True
        return out


@dataclass
class Request:
    """One request as the engine holds it: its prompt and parameters, where its events go (`queue` in the caller's
    event `loop`), how they are chunked, and how many of its sequences are still open."""

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

    @property
    def candidate(self) -> Candidate:
        """What admission counts of it (scheduler.py)."""
        return Candidate(len(self.prompt_ids), self.params.max_tokens, self.params.n)


class Seq:
    """One sequence (choice `index`) of a request: its tokens, text stream, stop matcher and generator."""

    def __init__(self, req: Request, index: int, tokenizer, seed: int):
        self.req, self.index = req, index
        self.tokens: list[int] = []
        self.stream = TextStream(tokenizer, req.prompt_ids)
        self.stop = StopMatcher(req.params.stop)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def prompt_tokens(self) -> int:
        """Its prompt's length (the scheduler counts cache columns from it)."""
        return len(self.req.prompt_ids)

    @property
    def max_tokens(self) -> int:
        """Tokens it may generate at most."""
        return self.req.params.max_tokens

    @property
    def generated(self) -> int:
        """Tokens it has generated so far."""
        return len(self.tokens)


def merge_deltas(deltas: list[SeqDelta]) -> list[SeqDelta]:
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


def coalesce(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive events of one request as one: each sequence's text and tokens joined, the later finish."""
    return RequestOutput(merge_deltas(first.deltas + then.deltas), first.prompt_logprobs or then.prompt_logprobs,
                         then.finished)


def deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """Runs in the callers' event loop: hand each request its event."""
    for q, out in items:
        q.put_nowait(out)
