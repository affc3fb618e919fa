"""What one replica's routes need for a request: the engine, the tokenizer, the served model id, the serve config,
API keys, and the checks and shapes that turn an OpenAI request into engine parameters and engine output back into
OpenAI's log-prob shapes. No Ray, no FastAPI app (routes.py builds that around a `Service`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llm_platform.config.serve import ServeConfig
from llm_platform.serve import auth
from llm_platform.serve.api import APIError
from llm_platform.serve.engine import Engine, EngineOverloaded, EngineStopped, RequestOutput, RequestTooLarge
from llm_platform.serve.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from llm_platform.serve.vllm_engine import VLLMEngine


class Service:
    """Everything a request needs: engine, tokenizer, served model id, limits, keys and an optional monitor."""

    def __init__(self, engine: Engine | VLLMEngine, tokenizer, model_id: str, cfg: ServeConfig, monitor=None,
                 metrics=None):
        self.engine, self.tokenizer, self.model_id, self.cfg = engine, tokenizer, model_id, cfg
        self.monitor, self.metrics = monitor, metrics
        self.api_keys = auth.load_api_keys(cfg.auth)
        self.created = int(time.time())
        self.token_text = lru_cache(maxsize=65536)(lambda i: tokenizer.decode([i]))

    def check_key(self, authorization: str | None) -> None:
        """Raise 401 unless no key is configured (a loopback endpoint, or `serve.auth.allow_unauthenticated`) or the
        Bearer token equals one of them (constant-time compare)."""
        if self.api_keys and not auth.authorized(self.api_keys, authorization):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @property
    def model_ids(self) -> list[str]:
        """The served model and, with the vllm backend, its LoRA adapters (`serve.engine.vllm.lora_adapters`)."""
        return [self.model_id, *sorted(getattr(self.engine, "adapters", {}))]

    def check_model(self, model: str) -> str | None:
        """404 unless `model` is served here; returns the LoRA adapter it names (None: the base model)."""
        if model not in self.model_ids:
            available = ", ".join(repr(m) for m in self.model_ids)
            raise APIError(404, f"model {model!r} is not served here; available: {available}",
                           type="invalid_request_error", param="model", code="model_not_found")
        return None if model == self.model_id else model

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            if not ids:  # an empty prompt still needs a first token to condition on
                ids = [self.tokenizer.eos_token_id]
            return ids
        vocab = len(self.tokenizer)
        if any(i < 0 or i >= vocab for i in prompt):
            raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param=param, code="invalid_value")
        return list(prompt)

    def sampling(self, req, prompt_len: int, max_tokens: int | None, default: int | None, logprobs: int | None,
                 echo: bool) -> SamplingParams:
        """Validate limits and build the engine's parameters (400 naming the field on any violation)."""
        context, cap = self.engine.max_positions, self.cfg.limits.max_tokens_cap
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's cap of {cap}", param="max_tokens",
                           code="invalid_value")
        if req.n > self.engine.max_batch_size:
            raise APIError(400, f"n={req.n} exceeds this server's batch size of {self.engine.max_batch_size}",
                           param="n", code="invalid_value")
        if prompt_len >= context:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context length is {context}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default or context, context - prompt_len, cap)
        if prompt_len + max_tokens > context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                           f"context length of {context}", param="max_tokens", code="context_length_exceeded")
        # What the engine would allocate for it alone (max_tokens 0 runs as 1: see `run`).
        if not self.engine.scheduler.fits_alone(prompt_len, max(max_tokens, 1), req.n):
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) x n ({req.n}) needs more "
                           f"KV cache than this server holds ({self.engine.max_batch_tokens} tokens)",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), stop=req.stop or [], seed=req.seed, n=req.n,
                              logprobs=logprobs, echo=echo, ignore_eos=req.ignore_eos)

    async def run(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True,
                  lora: str | None = None) -> AsyncIterator[RequestOutput]:
        """Engine events, with overload and shutdown mapped to 429/503 and metrics recorded. `stream=False` (a
        non-streamed response): the first token's event, then the rest in one event at the end."""
        # max_tokens=0 (score the prompt only, as eval harnesses do with echo): generate one token and drop it.
        engine_params = params if params.max_tokens else SamplingParams(**{**params.__dict__, "max_tokens": 1})
        start, first = time.perf_counter(), None
        generated = 0
        chunking, retry = self.cfg.engine, {"Retry-After": str(self.cfg.deployment.retry_after_s)}
        try:
            adapter = {"lora": lora} if lora else {}  # only the vllm backend serves adapters
            async for out in self.engine.generate(prompt_ids, engine_params, stream, chunking.stream_interval_tokens,
                                                  chunking.stream_max_delay_ms / 1000, **adapter):
                if out.error:  # generic, with the error id the replica's log has the details under
                    raise APIError(503, out.error, type="server_error", code="engine_error", headers=retry)
                if first is None:
                    first = time.perf_counter()
                    if self.monitor is not None:  # every prompt's tokens; the log-probs of those scored
                        self.monitor.observe_prompt(prompt_ids, [t.logprob for t in (out.prompt_logprobs or [])[1:]])
                if not params.max_tokens:
                    for d in out.deltas:
                        d.text, d.tokens, d.finish_reason = "", [], "length"
                generated += sum(len(d.tokens) for d in out.deltas)
                yield out
        except EngineOverloaded as e:
            raise APIError(429, f"server overloaded: {e}; retry later", type="rate_limit_error",
                           code="overloaded", headers=retry) from None
        except RequestTooLarge as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except EngineStopped as e:
            raise APIError(503, f"server unavailable: {e}", type="server_error", code="unavailable",
                           headers=retry) from None
        if self.metrics is not None:
            end = time.perf_counter()
            self.metrics.observe_generation(end - start, (first or end) - start, generated)

    # ------------------------------------------------------------------ logprob shapes
    def completion_logprobs(self, tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets, pos = [], offset
        for text in texts:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {self.token_text(i): lp for i, lp in t.top}
                                 for t in tokens],
                "text_offset": offsets}

    def chat_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}
