"""Robustness: seeded perturbations of prompts and the generation-metric change they cause.

Each perturbation takes a `random.Random` seeded from (seed, kind, prompt index), so the same seed gives the same
perturbed prompts on every machine and the kinds do not shift each other's random streams.
    typos        swap two adjacent letters, drop or double one letter inside `rate` of the words
    casing       flip the case of `rate` of the words (upper, lower or title)
    whitespace   double spaces at `rate` of the gaps, plus a leading or trailing space
    punctuation  drop existing punctuation and insert commas or periods after `rate` of the words
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable

from llm_platform.errors import ConfigError

PUNCT = ".,;:!?"


def _words(text: str) -> list[str]:
    return text.split(" ")


def typos(text: str, rng: random.Random, rate: float) -> str:
    words = _words(text)
    for i, w in enumerate(words):
        letters = [j for j, c in enumerate(w) if c.isalpha()]
        if len(letters) < 2 or rng.random() >= rate:
            continue
        j = rng.choice(letters[:-1])
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap":
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "drop":
            w = w[:j] + w[j + 1:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def casing(text: str, rng: random.Random, rate: float) -> str:
    words = _words(text)
    for i, w in enumerate(words):
        if w and rng.random() < rate:
            words[i] = rng.choice((str.upper, str.lower, str.title))(w)
    return " ".join(words)


def whitespace(text: str, rng: random.Random, rate: float) -> str:
    words = _words(text)
    out = words[0]
    for w in words[1:]:
        out += ("  " if rng.random() < rate else " ") + w
    return (" " + out) if rng.random() < 0.5 else (out + " ")


def punctuation(text: str, rng: random.Random, rate: float) -> str:
    words = [w.strip(PUNCT) if rng.random() < 0.5 else w for w in _words(text)]
    words = [w + rng.choice(",.") if w and rng.random() < rate else w for w in words]
    return re.sub(r" +", " ", " ".join(words)).strip() or text


PERTURBATIONS: dict[str, Callable[[str, random.Random, float], str]] = {
    "typos": typos, "casing": casing, "whitespace": whitespace, "punctuation": punctuation,
}


def perturb(prompts: list[str], kind: str, seed: int, rate: float) -> list[str]:
    """The prompts perturbed by `kind`; the same (prompts, kind, seed, rate) always gives the same result."""
    if kind not in PERTURBATIONS:
        raise ConfigError(f"eval.robustness.perturbations: unknown kind {kind!r}; "
                          f"choose from {', '.join(PERTURBATIONS)}")
    fn = PERTURBATIONS[kind]
    # zlib.crc32, not hash(): str hashes are salted per process, and the stream must not depend on the process.
    return [fn(p, random.Random(zlib.crc32(f"{seed}:{kind}:{i}".encode())), rate) for i, p in enumerate(prompts)]


def perturb_all(prompts: list[str], kinds: list[str], seed: int, rate: float) -> dict[str, list[str]]:
    """Each kind's perturbed copy of `prompts`, in `kinds` order (generate them as `flatten` lists them)."""
    return {kind: perturb(prompts, kind, seed, rate) for kind in kinds}


def flatten(perturbed: dict[str, list[str]]) -> list[str]:
    """Every perturbed prompt in one list, kind after kind: one generation job for all (the model loads once)."""
    return [p for prompts in perturbed.values() for p in prompts]


def score_robustness(perturbed: dict[str, list[str]], outputs: list[str], references: list[list[str]],
                     clean_metrics: dict[str, float],
                     score: Callable[[list[str], list[list[str]]], dict[str, float]]) -> tuple[dict, dict]:
    """Score the outputs for `flatten(perturbed)` against the clean metrics; returns (metrics, details): flat
    `robust/<kind>/<metric>_delta` entries, and per kind the metrics plus examples."""
    metrics: dict[str, float] = {}
    details: dict[str, dict] = {}
    for k, (kind, prompts) in enumerate(perturbed.items()):
        outs = outputs[k * len(prompts):(k + 1) * len(prompts)]
        scored = score(outs, references)
        deltas = {name.split("/", 1)[1]: value - clean_metrics[name] for name, value in scored.items()
                  if name in clean_metrics}
        metrics.update({f"robust/{kind}/{m}_delta": d for m, d in deltas.items()})
        details[kind] = {"metrics": scored, "deltas": deltas,
                         "examples": [{"prompt": p, "output": o} for p, o in list(zip(prompts, outs))[:3]]}
    return metrics, details
