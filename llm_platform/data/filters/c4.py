"""C4's rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2), as datatrove's
C4QualityFilter applies them (the paper's list plus the reference code's long-word and policy lines): lines that
fail a line rule are removed, a document with "lorem ipsum" or a curly bracket is dropped whole, and one left with
fewer than `min_sentences` sentences is dropped. The bad-words rule (`bad_words`, on the text the line rules keep)
is in badwords.py."""

from __future__ import annotations

import re

from llm_platform.config.data import C4Config

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")
# A sentence ends at terminal punctuation (and any closing quotes or brackets) followed by a space or the line's end:
# the count a sentence splitter gives on the ordinary prose lines that reach it (datatrove uses spaCy's or NLTK's).
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)")


def sentences(line: str) -> int:
    """Sentences in a line: its sentence ends, at least one for a non-empty line."""
    return max(1, len(_SENTENCE_END.findall(line))) if line else 0


def c4(text: str, cfg: C4Config) -> tuple[str, str | None]:
    """(the text with the failing lines removed, the document rule it fails or None)."""
    kept: list[str] = []
    count = 0
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if cfg.max_word_length and any(len(w) > cfg.max_word_length for w in words):
            continue
        if cfg.remove_citations:
            line = CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lower = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
            return text, "lorem_ipsum"
        if cfg.filter_javascript and "javascript" in lower:
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return text, "curly_bracket"
        if cfg.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
            continue
        if cfg.min_sentences:
            count += sentences(line)
        kept.append(line)
    if count < cfg.min_sentences:
        return text, "min_sentences"
    return "\n".join(kept).strip(), None
