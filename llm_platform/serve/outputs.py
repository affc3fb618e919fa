"""Output processing: a step's sampled tokens become what each request's reader gets. Plain Python, no model.

For each sequence of a step (vLLM's OutputProcessor and the stop checks of its Scheduler together): append the token,
detokenize it (`TextStream`: never half a character), cut the text at a stop string (`StopMatcher`), decide whether
the sequence ends (EOS, a stop string, max_tokens, the context), record the gap since its previous token for the
metrics, and hand each request its `RequestOutput` when its chunking (`ChunkHold`) lets it go. The events cross from
the generation thread to the callers' event loops through `call_soon_threadsafe`, once per loop per step.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import Iterable

from llm_platform.serve.requests import Request, RequestOutput, Seq, SeqDelta, deliver, merge_deltas
from llm_platform.serve.sampling import TokenLogprob

TOKEN_GAPS_KEPT = 65536  # inter-token gaps held for the metrics sampler (monitor.py) between two of its reads


def advance(seq: Seq, info: TokenLogprob, eos_token_id: int | None, max_positions: int) -> SeqDelta:
    """Append the sampled token to `seq`; its new text (detokenized, cut at a stop string) and why it ends, if it
    does: "stop" (EOS unless ignored, or a stop string) or "length" (max_tokens, or the model's context)."""
    token, p = info.token_id, seq.req.params
    seq.tokens.append(token)
    if token == eos_token_id and not p.ignore_eos:
        return SeqDelta(seq.index, seq.stop.feed(seq.stream.flush(), final=True), [info], "stop")
    at_limit = len(seq.tokens) >= p.max_tokens or len(seq.req.prompt_ids) + len(seq.tokens) >= max_positions
    text = seq.stop.feed(seq.stream.push(token), final=at_limit)
    if seq.stop.stopped:
        return SeqDelta(seq.index, text, [info], "stop")
    if at_limit:
        return SeqDelta(seq.index, text + seq.stop.feed(seq.stream.flush(), final=True), [info], "length")
    return SeqDelta(seq.index, text, [info])


class OutputProcessor:
    """Turns each step's sampled tokens into the requests' events, and ends requests whose step failed.

    Args:
        eos_token_id: the tokenizer's end-of-sequence token (None: none).
        max_positions: the model's context; a sequence that reaches it ends ("length").
    """

    def __init__(self, eos_token_id: int | None, max_positions: int):
        self.eos_token_id, self.max_positions = eos_token_id, max_positions
        # For the metrics (monitor.py reads them from the event loop's side): each sequence's gaps between
        # consecutive tokens (its inter-token latency, prefills of others included), oldest dropped past
        # TOKEN_GAPS_KEPT.
        self.token_gaps: collections.deque[float] = collections.deque(maxlen=TOKEN_GAPS_KEPT)
        self._last_token_s: weakref.WeakKeyDictionary[Seq, float] = weakref.WeakKeyDictionary()

    def process(self, seqs: list[Seq], infos: list[TokenLogprob]) -> set[int]:
        """One token for each of `seqs` (`infos[i]` is `seqs[i]`'s): advance each sequence, send what each
        request's chunking lets go; returns the ids of the sequences that finished (they leave the batch)."""
        by_request: dict[int, tuple[Request, list[SeqDelta]]] = {}
        finished: set[int] = set()
        now = time.monotonic()
        for seq, info in zip(seqs, infos):
            last = self._last_token_s.get(seq)  # None for a first token (that is time to first token)
            if last is not None:
                self.token_gaps.append(now - last)
            self._last_token_s[seq] = now
            delta = advance(seq, info, self.eos_token_id, self.max_positions)
            if delta.finish_reason:
                finished.add(id(seq))
                seq.req.open_seqs -= 1
            if not seq.req.cancelled:
                by_request.setdefault(id(seq.req), (seq.req, []))[1].append(delta)
        self.send(by_request.values())
        return finished

    def send(self, step: Iterable[tuple[Request, list[SeqDelta]]]) -> None:
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

    @staticmethod
    def fail(reqs: Iterable[Request], message: str) -> None:
        """End each of `reqs` (once each) with `message`; tokens held for a streamed chunk go out before it."""
        for req in {id(r): r for r in reqs}.values():
            try:
                if req.hold.pending and req.stream:
                    req.loop.call_soon_threadsafe(req.queue.put_nowait,
                                                  RequestOutput(merge_deltas(req.hold.pending)))
                    req.hold.pending = []
                req.loop.call_soon_threadsafe(req.queue.put_nowait, RequestOutput([], finished=True, error=message))
            except RuntimeError:  # its event loop is closed: nobody is waiting for it
                pass
