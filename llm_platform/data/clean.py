"""Text cleaning, PII scrubbing, the basic quality filters, then the published rule sets and language ID
(`llm_platform/data/filters`, when the config turns them on). Plain Python, no Ray."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import TYPE_CHECKING

from llm_platform.config.data import FilterConfig

if TYPE_CHECKING:
    from llm_platform.data.filters import Chain

# Control characters other than newline and tab (C0, DEL, C1), and zero-width/bidi marks that break tokens.
# Lone surrogates too: valid in JSON ("\\ud83d" from text cut mid-emoji) but not text, and no UTF-8 encoder takes them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\ufeff\ud800-\udfff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# Phone numbers: optional country code, 3-4 digit groups separated by space, dot or dash (at least 9 digits).
PHONE = re.compile(r"(?<!\w)(?:\+?\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{3}[ .-]\d{3,4}(?:[ .-]\d{3,4})?(?!\w)")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b|\b(?:[0-9a-fA-F]{1,4}:){1,7}:(?:[0-9a-fA-F]{1,4})?\b")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode-normalize, drop control characters, collapse runs of spaces, trim lines and blank-line runs."""
    if form:
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]  # a config str; unicodedata refuses others
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace emails, IP addresses and phone numbers with placeholders; returns (text, replacements)."""
    total = 0
    for pattern, placeholder in ((EMAIL, "<EMAIL>"), (IPV4, "<IP>"), (IPV6, "<IP>"), (PHONE, "<PHONE>")):
        text, n = pattern.subn(placeholder, text)
        total += n
    return text, total


def quality_reason(text: str, f: FilterConfig) -> str:
    """The first quality filter the text fails (e.g. `too_short`), or "" when it passes them all."""
    if not text:
        return "empty"
    if f.min_chars and len(text) < f.min_chars:
        return "too_short"
    if f.max_chars and len(text) > f.max_chars:
        return "too_long"
    words = text.split()
    if f.min_words and len(words) < f.min_words:
        return "too_few_words"
    if not words:
        return "empty"
    if f.mean_word_length:
        mean = sum(map(len, words)) / len(words)
        if not f.min_mean_word_length <= mean <= f.max_mean_word_length:
            return "mean_word_length"
    if f.symbol_ratio:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / len(words) > f.max_symbol_to_word_ratio:
            return "symbol_ratio"
    if f.alpha_fraction:
        # Words with at least one letter: most are all letters, which str.isalpha answers in C.
        alpha = sum(1 for w in words if w.isalpha() or any(map(str.isalpha, w)))
        if alpha / len(words) < f.min_alpha_word_fraction:
            return "alpha_fraction"
    if f.repeated_lines:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) > 1:
            repeated = len(lines) - len(set(lines))
            if repeated / len(lines) > f.max_repeated_line_fraction:
                return "repeated_lines"
    return ""


def _clean_field(value: str, form: str, pii: bool) -> tuple[str, int]:
    value = normalize(value or "", form)
    return scrub_pii(value) if pii and value else (value, 0)


def judge(out: dict, filters: FilterConfig, rules: Chain | None, rewrite: bool) -> dict:
    """Set `drop_reason` (the basic filters, then the rule sets) and, when the rule sets ran, `language` and
    `language_score`; the rule sets may rewrite `text` when `rewrite` (a plain-text record)."""
    out["drop_reason"] = quality_reason(out["text"], filters)
    if rules is not None and not out["drop_reason"]:
        verdict = rules(out["text"], rewrite)
        out.update(text=verdict.text, drop_reason=verdict.reason, language=verdict.language,
                   language_score=verdict.language_score)
    return out


def _clean_pair(out: dict, pair: dict, form: str, pii: bool, filters: FilterConfig, rules: Chain | None) -> dict:
    """A preference pair's messages cleaned one by one, as a chat's are; an answer left empty drops the pair."""
    pii_count = 0
    for part in pair.values():
        for m in part:
            m["content"], n = _clean_field(m["content"], form, pii)
            pii_count += n
    out["messages"] = json.dumps(pair, ensure_ascii=False)
    out["text"] = "\n\n".join(m["content"] for part in pair.values() for m in part)
    if not all(part[-1]["content"] for part in (pair["chosen"], pair["rejected"])):
        out["drop_reason"] = "empty_response"
    elif pair["chosen"] == pair["rejected"]:  # cleaning can make two answers equal (PII, whitespace)
        out["drop_reason"] = "identical"
    else:
        judge(out, filters, rules, rewrite=False)
    return out | {"pii_replacements": pii_count}


def clean_record(record: dict, form: str, pii: bool, filters: FilterConfig, rules: Chain | None = None) -> dict:
    """Clean one record in place-style (returns a new dict): normalize fields, scrub PII, apply the filters and the
    rule sets (`rules`: `filters.build(...)`, None for the basic filters only).

    A chat record's turns (`messages`, JSON) are cleaned one by one, and its `text` (what filters and dedup see) is
    rebuilt from the cleaned turns: the conversation is what gets tokenized, so it is what must be scrubbed. The rule
    sets judge the text of every record but rewrite (C4's line removal) only a plain-text one: the text of the others
    is rebuilt from their fields."""
    out = dict(record)
    if out.get("drop_reason"):
        return out
    pii_count = 0
    if out.get("messages"):
        messages = json.loads(out["messages"])
        if isinstance(messages, dict):  # a preference pair: {prompt, chosen, rejected} messages (data/pairs.py)
            return _clean_pair(out, messages, form, pii, filters, rules)
        for m in messages:
            m["content"], n = _clean_field(m["content"], form, pii)
            pii_count += n
        out["messages"] = json.dumps(messages, ensure_ascii=False)
        out["text"] = "\n\n".join(m["content"] for m in messages)
        # As when reading (chat.parse_record): an assistant turn left with nothing to learn drops the conversation.
        if any(m["role"] == "assistant" and not m["content"] for m in messages):
            out["drop_reason"] = "empty_assistant"
        else:
            judge(out, filters, rules, rewrite=False)
        return out | {"pii_replacements": pii_count}
    for key in ("text", "prompt", "response"):
        out[key], n = _clean_field(out.get(key) or "", form, pii)
        pii_count += n
    fielded = bool(out.get("prompt") or out.get("response"))
    if fielded:
        out["text"] = out["prompt"] + "\n\n" + out["response"]
        if not out["prompt"] or not out["response"]:
            out["drop_reason"] = "empty"
            return out | {"pii_replacements": pii_count}
    judge(out, filters, rules, rewrite=not fielded)
    out["pii_replacements"] = pii_count
    return out
