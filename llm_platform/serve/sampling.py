"""Per-request sampling, incremental detokenization and stop strings: plain torch and Python, no Ray.

The engine calls `sample_step` once per iteration for the whole batch (vectorised temperature, top-k and top-p; one
uniform draw per row from that row's own generator so that `seed` reproduces a request whatever shares its batch),
and keeps one `TextStream` per sequence to turn token ids into text deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks of the sampler (OpenAI's names)."""

    max_tokens: int = 16
    """Generated tokens at most."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass kept (0, 1]."""
    top_k: int = 0
    """Most likely tokens kept; 0 keeps all."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; not included in the output."""
    seed: int | None = None
    """Seed of this request's generator (reproducible regardless of batch neighbours)."""
    n: int = 1
    """Independent completions of the prompt."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many alternatives (None: none)."""
    echo: bool = False
    """Also return the prompt (and its log-probabilities when `logprobs` is set)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token (benchmarks)."""


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model, with the most likely alternatives."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def sample_step(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
                ) -> list[TokenLogprob]:
    """One token per row of `logits` ((B, V)) under each row's own settings and generator, with the chosen token's
    log-probability and the top alternatives for the rows whose request asks for them."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
    tokens = sample_rows(logits, temperature, top_k, top_p, uniforms).tolist()
    infos = [TokenLogprob(t, None) for t in tokens]
    want = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    if want is None:  # nobody in the batch asked: no (B, V) log-softmax
        return infos
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=device)[:, None]).squeeze(1).tolist()
    top_v, top_i = logp.topk(want, dim=-1) if want else (None, None)
    for row, (p, info) in enumerate(zip(params, infos)):
        if p.logprobs is not None:
            info.logprob = chosen[row]
            if p.logprobs:
                assert top_i is not None and top_v is not None  # want >= p.logprobs > 0
                info.top = list(zip(top_i[row, :p.logprobs].tolist(), top_v[row, :p.logprobs].tolist()))
    return infos


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row.

    Args:
        logits: (B, V) raw next-token logits.
        temperature: (B,) 0 means greedy for that row.
        top_k: (B,) int, 0 keeps all.
        top_p: (B,) in (0, 1].
        uniforms: (B,) one U[0, 1) draw per row from the row's generator.

    Returns:
        (B,) token ids.

    Each row takes the cheapest path its own settings allow, never its neighbours' (so a seed reproduces a request
    whatever shares its batch): greedy rows an argmax; rows with no top-k/top-p an inverse-CDF draw over the
    vocabulary in id order; only rows that filter sort the vocabulary (a (B, V) sort dominated a 32-row step on CPU).
    """
    out = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return out
    vocab = logits.shape[-1]
    filtered = sampled & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
    plain = sampled & ~filtered
    if bool(plain.any()):
        rows = plain.nonzero().squeeze(1)
        probs = (logits[rows].float() / temperature[rows, None]).softmax(dim=-1)
        out[rows] = _inverse_cdf(probs, uniforms[rows])
    if bool(filtered.any()):
        rows = filtered.nonzero().squeeze(1)
        scaled = logits[rows].float() / temperature[rows, None]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (b, V)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k[rows] > 0, top_k[rows], torch.full_like(top_k[rows], vocab))
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p[rows, None], 0.0)
        out[rows] = order.gather(1, _inverse_cdf(probs, uniforms[rows])[:, None]).squeeze(1)
    return out


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column drawn from each row of (b, V) non-negative `probs` with one U[0, 1) draw per row."""
    cdf = probs.cumsum(dim=-1)
    u = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


class TextStream:
    """Token ids -> text deltas that never end inside a multi-byte character.

    Byte-level BPE (and byte fallback) splits a character such as an emoji over several tokens; decoding a prefix of
    them gives U+FFFD, so such tokens are held back until their character completes. `tokenizers`' own
    `DecodeStream` does it in Rust, one call a token (about 5x faster than decoding a window twice in Python, which
    is what vLLM and TGI do and what a tokenizer without a Rust backend still gets here). Both start from the prompt's
    last tokens, so the first generated token decodes as it would after them (a SentencePiece leading space).
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.context: list[int] = list(prompt_ids or [])[-6:]
        """The tokens of the last text emitted (at first, the prompt's last): what `held` decodes after."""
        self.held: list[int] = []
        """Tokens since then: a character still incomplete."""
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decoder = (DecodeStream(ids=self.context, skip_special_tokens=True) if self._backend is not None
                         else None)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly complete text (may be empty)."""
        self.held.append(token_id)
        if self._decoder is None or self._backend is None:  # (a decoder exists only with a backend)
            return self._window(final=False)
        text = self._decoder.step(self._backend, token_id)
        if text is None:  # an incomplete character (or a skipped special token)
            return ""
        self.context, self.held = self.held, []
        return text

    def flush(self) -> str:
        """Whatever is held back (at the end of a sequence; an incomplete character comes out as U+FFFD)."""
        return self._window(final=True) if self.held else ""

    def _window(self, final: bool) -> str:
        """The text `held` adds after `context`, unless it ends inside a character (and this is not the end)."""
        prefix = self.tokenizer.decode(self.context, skip_special_tokens=True)
        full = self.tokenizer.decode(self.context + self.held, skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.context, self.held = self.held, []
            return full[len(prefix):]
        return ""


class StopMatcher:
    """Cuts the text at the first stop string and holds back a tail that could still become one."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add decoded text; return what is safe to send now. Sets `stopped` when a stop string appeared."""
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        safe = len(self.text)
        if not final:
            for s in self.stop:  # hold back the longest tail that is a prefix of a stop string
                for j in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if s.startswith(self.text[-j:]):
                        safe = min(safe, len(self.text) - j)
                        break
        safe = max(safe, self.emitted)
        out, self.emitted = self.text[self.emitted:safe], safe
        return out
