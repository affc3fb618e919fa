"""Gopher's quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
from Training Gopher", appendix A, table A1), as datatrove's GopherQualityFilter and GopherRepetitionFilter apply
them: the same splits, ratios and comparisons (a rule drops a document when its value is strictly past the
threshold), so the same thresholds keep the same documents. Each function returns the failed rule's name or None."""

from __future__ import annotations

import operator
import re
from itertools import compress

import numpy as np

from llm_platform.config.data import GopherQualityConfig, GopherRepetitionConfig
from llm_platform.data.filters.text import PUNCTUATION_SET, Doc

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_BULLETS = ("\u2022", "-")
_ELLIPSES = ("...", "\u2026")


def quality(doc: Doc, cfg: GopherQualityConfig) -> str | None:
    """The first Gopher quality rule the document fails: word count, mean word length, `#` and ellipsis ratios,
    bullet and ellipsis lines, alphabetic words, stop words."""
    text, words = doc.text, doc.words
    # Punctuation tokens are words for the ratios but not for the counts and lengths. (map/compress keep the loops
    # over words in C: this rule set runs on every document.)
    symbols = list(compress(words, map(PUNCTUATION_SET.issuperset, words)))
    counted = len(words) - len(symbols)
    if cfg.min_words and counted < cfg.min_words:
        return "min_words"
    if cfg.max_words and counted > cfg.max_words:
        return "max_words"
    if not words:
        return "min_words"
    # None: only punctuation, no length to judge
    mean = (sum(map(len, words)) - sum(map(len, symbols))) / counted if counted else None
    if cfg.min_mean_word_length and mean is not None and mean < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if cfg.max_mean_word_length and mean is not None and mean > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if cfg.max_symbol_word_ratio:
        if text.count("#") / len(words) > cfg.max_symbol_word_ratio:
            return "hash_ratio"
        if (text.count("...") + text.count("\u2026")) / len(words) > cfg.max_symbol_word_ratio:
            return "ellipsis_ratio"
    lines = text.splitlines() or [""]
    if cfg.max_bullet_lines_ratio:
        bullets = sum(1 for ln in lines if ln.lstrip().startswith(_BULLETS))
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return "bullet_lines"
    if cfg.max_ellipsis_lines_ratio:
        ending = sum(1 for ln in lines if ln.rstrip().endswith(_ELLIPSES))
        if ending / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "ellipsis_lines"
    if cfg.min_alpha_words_ratio:
        # Most words are all letters, which str.isalpha answers in C; the rest are scanned for a letter.
        others = compress(words, map(operator.not_, map(str.isalpha, words)))
        alpha = len(words) - sum(1 for w in others if not any(map(str.isalpha, w)))
        if alpha / len(words) < cfg.min_alpha_words_ratio:
            return "alpha_words"
    if cfg.min_stop_words and len(set(cfg.stop_words).intersection(words)) < cfg.min_stop_words:
        return "stop_words"
    return None


def duplicates(parts: list[str]) -> tuple[int, int]:
    """(parts that repeat an earlier part, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for p in parts:
        if p in seen:
            count += 1
            chars += len(p)
        else:
            seen.add(p)
    return count, chars


class NGrams:
    """A document's word n-grams as 64-bit keys, for the repetition rules: each word gets an id, and the key of the
    n-gram at i is a polynomial hash of its ids (built from the (n-1)-gram keys, modulo 2^64), so counting and
    finding repeats is numpy's sort instead of a set of tuples (about twice as fast on a page of text). Two
    n-grams (n <= 10) share a key only by a 64-bit hash collision."""

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]) -> None:
        index: dict[str, int] = {}
        self.ids = np.fromiter((index.setdefault(w, len(index)) + 1 for w in words), np.uint64, len(words))
        # chars[i:j] of the words = cum[j] - cum[i]
        self.cum = np.concatenate([[0], np.cumsum(np.fromiter(map(len, words), np.int64, len(words)))])
        self._keys = {1: self.ids}
        self._unique_from = len(words) + 1  # the smallest n known to have no repeated n-gram

    def repeats(self, n: int) -> bool:
        """Whether some n-gram appears twice. None does for every n above one that has none (a repeated n-gram
        starts with a repeated shorter one), which spares most pages the larger n."""
        if n >= self._unique_from:
            return False
        keys = self.keys(n)
        if np.unique(keys).shape[0] == keys.shape[0]:
            self._unique_from = n
            return False
        return True

    def keys(self, n: int) -> np.ndarray:
        """The key of the n-gram starting at each word: (len(words) - n + 1,) uint64."""
        if n not in self._keys:
            with np.errstate(over="ignore"):  # wrapping is the modulus
                self._keys[n] = self.keys(n - 1)[:-1] * self._BASE + self.ids[n - 1:]
        return self._keys[n]

    def chars(self, i: int, n: int) -> int:
        """Characters of the n words from i."""
        return int(self.cum[i + n] - self.cum[i])


def top_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters of the most frequent n-gram (joined with spaces) times its count; among equally frequent ones the
    first to appear, as `Counter.most_common` picks it. 0 with fewer than n words."""
    keys = grams.keys(n) if grams.ids.shape[0] >= n else np.empty(0, np.uint64)
    if not keys.shape[0]:
        return 0
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = counts.max()
    i = int(first[counts == top].min())
    return (grams.chars(i, n) + n - 1) * int(top)


def dup_ngram_chars(grams: NGrams, n: int) -> int:
    """Characters (words joined without spaces) of the n-grams that repeat an earlier one, scanning left to right
    and jumping past each repeat, so repeats never overlap."""
    if grams.ids.shape[0] < n or not grams.repeats(n):  # the usual case: nothing repeats, no scan
        return 0
    seen: set[int] = set()
    chars, i = 0, 0
    listed = grams.keys(n).tolist()
    while i < len(listed):
        if listed[i] in seen:
            chars += grams.chars(i, n)
            i += n
        else:
            seen.add(listed[i])
            i += 1
    return chars


def repetition(doc: Doc, cfg: GopherRepetitionConfig) -> str | None:
    """The first Gopher repetition rule the document fails: repeated paragraphs and lines (by count and by
    characters), the most frequent 2-4-grams, repeated 5-10-grams; fractions of characters are of the whole text."""
    text = doc.text
    size = max(1, len(text))
    paragraphs = _PARAGRAPHS.split(text.strip())
    count, chars = duplicates(paragraphs)
    if cfg.max_dup_para_frac and count / len(paragraphs) > cfg.max_dup_para_frac:
        return "dup_para_frac"
    if cfg.max_dup_para_char_frac and chars / size > cfg.max_dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINES.split(text)
    count, chars = duplicates(lines)
    if cfg.max_dup_line_frac and count / len(lines) > cfg.max_dup_line_frac:
        return "dup_line_frac"
    if cfg.max_dup_line_char_frac and chars / size > cfg.max_dup_line_char_frac:
        return "dup_line_char_frac"
    grams = NGrams(doc.words)
    for n in (2, 3, 4):
        limit = getattr(cfg, f"max_top_{n}gram_char_frac")
        if limit and top_ngram_chars(grams, n) / size > limit:
            return f"top_{n}gram"
    for n in range(5, 11):
        limit = getattr(cfg, f"max_dup_{n}gram_char_frac")
        if limit and dup_ngram_chars(grams, n) / size > limit:
            return f"dup_{n}gram"
    return None
