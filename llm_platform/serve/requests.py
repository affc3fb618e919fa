"""What the engine keeps per request and sequence, and what it sends back: plain records, no model.

A request (`Request`) has one sequence (`Seq`) per choice (`n`); each decode step turns a sequence's new token
into a `SeqDelta` (its text, cut at stop strings, and why it ended), and `ChunkHold` decides when a streamed
request's deltas go out as one `RequestOutput`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from llm_platform.serve.sampling import SamplingParams, StopMatcher, TextStream, TokenLogprob


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


class Seq:
    """One sequence (choice `index`) of a request: its tokens, text stream, stop matcher and generator."""

    def __init__(self, req: Request, index: int, tokenizer, seed: int):
        self.req, self.index = req, index
        self.tokens: list[int] = []
        self.stream = TextStream(tokenizer, req.prompt_ids)
        self.stop = StopMatcher(req.params.stop)
        self.generator = torch.Generator().manual_seed(seed)

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
