"""The published quality rule sets and language identification, applied to each cleaned document after the basic
filters (`clean.quality_reason`).

A rule set is a `RuleSet` record: its name, whether the config turns it on, and a check that returns the failed
rule's name (or None), and optionally rewrites the text (C4 removes lines). `build` keeps the sets the config turns
on, in datatrove's FineWeb order (language -> Gopher repetition -> Gopher quality -> C4 -> FineWeb), and a drop is
named `<set>.<rule>` (`gopher_quality.stop_words`): the manifest counts each, per file too, with the first dropped
documents as examples. Another rule set (a URL list) is one more record in `RULE_SETS` with a config node under
`data.filters`, and a `make` that loads what it needs once per task. Decontamination (decontam.py) is a phase of its
own after the rule sets: it names each document's file, line and span, and may keep the document."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from llm_platform.config.data import FilterConfig
from llm_platform.data.filters import badwords, c4, decontam, fineweb, gopher, language
from llm_platform.data.filters.language import LanguageSpec
from llm_platform.data.filters.text import Doc

__all__ = ["RULE_SETS", "Chain", "LanguageSpec", "RuleSet", "Verdict", "build", "validate"]


class Verdict(NamedTuple):
    """What the rule sets made of a document."""

    text: str
    """The text, with the lines a rule set removes removed (C4) when the record allows rewriting."""
    reason: str
    """`<set>.<rule>` of the first failed rule, or "" when it passes them all."""
    language: str
    """The detected language ("" when not detected)."""
    language_score: float
    """Its confidence."""


# check(doc, text may be rewritten) -> (text, failed rule or None, language, score)
Check = Callable[[Doc, bool], tuple[str, str | None, str, float]]


@dataclass(frozen=True)
class RuleSet:
    """One rule set: its name (the drop reasons' prefix), its switch, and the check made from the configs."""

    name: str
    enabled: Callable[[FilterConfig, LanguageSpec], bool]
    make: Callable[[FilterConfig, LanguageSpec], Check]


def _language(f: FilterConfig, spec: LanguageSpec) -> Check:
    def check(doc: Doc, rewrite: bool) -> tuple[str, str | None, str, float]:
        lang, score, reason = language.identify(doc.text, spec)
        return doc.text, reason, lang, score
    return check


def _plain(rule: Callable[[Doc, Any], str | None], cfg: Any) -> Check:
    """A rule set that only judges (no rewriting, no language)."""
    def check(doc: Doc, rewrite: bool) -> tuple[str, str | None, str, float]:
        return doc.text, rule(doc, cfg), "", 0.0
    return check


def _c4(f: FilterConfig, spec: LanguageSpec) -> Check:
    def check(doc: Doc, rewrite: bool) -> tuple[str, str | None, str, float]:
        text, reason = c4.c4(doc.text, f.c4)
        if reason is None and f.c4.bad_words:  # on what the line rules kept, in the language ID found
            lang = doc.language or f.c4.bad_words_language
            reason = badwords.bad_words(text, lang, f.c4.bad_words_uri)
        return (text if rewrite else doc.text), reason, "", 0.0
    return check


RULE_SETS: tuple[RuleSet, ...] = (
    RuleSet("language", lambda f, spec: spec.active, _language),
    RuleSet("gopher_repetition", lambda f, spec: f.gopher_repetition.enabled,
            lambda f, spec: _plain(gopher.repetition, f.gopher_repetition)),
    RuleSet("gopher_quality", lambda f, spec: f.gopher_quality.enabled,
            lambda f, spec: _plain(gopher.quality, f.gopher_quality)),
    RuleSet("c4", lambda f, spec: f.c4.enabled, _c4),
    RuleSet("fineweb", lambda f, spec: f.fineweb.enabled, lambda f, spec: _plain(fineweb.fineweb, f.fineweb)),
)


class Chain:
    """The enabled rule sets, in order; call it on a cleaned text."""

    def __init__(self, sets: list[tuple[str, Check]]) -> None:
        self.sets = sets

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.sets]

    def __call__(self, text: str, rewrite: bool = True) -> Verdict:
        """Run the rule sets in order until one fails. `rewrite=False` (records whose text is built from other
        fields: prompt/response, chat turns) keeps the text as it is; the rules still judge it."""
        doc = Doc(text)
        lang, score = "", 0.0
        for name, check in self.sets:
            new_text, reason, found, found_score = check(doc, rewrite)
            if found:
                lang, score = found, found_score
            if reason:
                return Verdict(doc.text, f"{name}.{reason}", lang, score)
            if new_text != doc.text:  # the next sets judge what is kept
                doc = Doc(new_text)
            doc.language = lang  # what language ID found, for the rules that depend on it (C4's bad words)
        return Verdict(doc.text, "", lang, score)


def build(filters: FilterConfig, spec: LanguageSpec | None = None) -> Chain | None:
    """The chain of the rule sets the config turns on (None when none is: the stage then runs only the basic
    filters, as before the rule sets existed)."""
    spec = spec or LanguageSpec()
    sets = [(s.name, s.make(filters, spec)) for s in RULE_SETS if s.enabled(filters, spec)]
    return Chain(sets) if sets else None


def validate(data_cfg: Any) -> None:
    """Refuse, naming the key, an unknown language, a threshold outside [0, 1), or a negative rule threshold."""
    from llm_platform.errors import ConfigError

    language.check(LanguageSpec.from_config(data_cfg))
    decontam.check(data_cfg.filters.decontamination)  # n-gram, sources, lm-eval installed for harness: sources
    c4_cfg = data_cfg.filters.c4
    if c4_cfg.bad_words and not c4_cfg.bad_words_uri and c4_cfg.bad_words_language not in badwords.languages():
        raise ConfigError(f"data.filters.c4.bad_words_language={c4_cfg.bad_words_language!r} has no bundled list; "
                          f"choose one of {', '.join(badwords.languages())} or set data.filters.c4.bad_words_uri")
    for name in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
        node = getattr(data_cfg.filters, name)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"data.filters.{name}.{f.name}={value} must be at least 0 (0 turns the rule off)")
