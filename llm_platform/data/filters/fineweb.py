"""FineWeb's own rules (Penedo et al. 2024, "The FineWeb Datasets", section 3.3), as datatrove's
FineWebQualityFilter applies them: lines ending in punctuation, short lines, characters in repeated lines, and
newlines per word (list-like pages). Returns the failed rule's name or None."""

from __future__ import annotations

from llm_platform.config.data import FineWebConfig
from llm_platform.data.filters.gopher import duplicates
from llm_platform.data.filters.text import TERMINAL_TUPLE, Doc


def fineweb(doc: Doc, cfg: FineWebConfig) -> str | None:
    """The first FineWeb rule the document fails."""
    text = doc.text
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return "empty"
    if cfg.min_line_punct_ratio:
        ending = sum(1 for ln in lines if ln.endswith(TERMINAL_TUPLE))
        if ending / len(lines) < cfg.min_line_punct_ratio:
            return "line_punct_ratio"
    if cfg.max_short_line_ratio:
        short = sum(1 for ln in lines if len(ln) <= cfg.short_line_chars)
        if short / len(lines) > cfg.max_short_line_ratio:
            return "short_line_ratio"
    if cfg.max_char_dup_ratio:
        chars = duplicates(lines)[1]
        if chars / max(1, len(text) - text.count("\n")) > cfg.max_char_dup_ratio:
            return "char_dup_ratio"
    if cfg.max_newline_word_ratio and text.count("\n") / max(1, len(doc.words)) > cfg.max_newline_word_ratio:
        return "list_ratio"
    return None
