"""C4's bad-words rule (Raffel et al. 2020, section 2.2), as datatrove's C4BadWordsFilter applies it: a document
whose lowercased text holds a word or phrase of its language's list is dropped. Words match between non-word
characters (or the text's ends), except in Japanese, Thai and Chinese, where they match anywhere.

The lists are LDNOOBW's ("List of Dirty, Naughty, Obscene and Otherwise Bad Words", the list C4 used), as the npm
package `naughty-words` 1.2.0 publishes them (CC BY 4.0: ldnoobw/LICENSE), one file per LID-176 code under
ldnoobw/, so nothing is downloaded. datatrove's allowlist (words too common to mean anything there) is removed.
A document's language is the one language ID found (`data.languages` or `data.detect_language`), else
`data.filters.c4.bad_words_language`; a language without a list passes. `data.filters.c4.bad_words_uri` replaces
the lists with one of your own (a word or phrase per line) for every language."""

from __future__ import annotations

import functools
import re
from importlib import resources

ALLOWLIST = frozenset({"sm", "グロ", "女の子", "性"})  # datatrove's _BADWORDS_ALLOWLIST, applied to every list
NO_WORD_BOUNDARY = ("ja", "th", "zh")


def languages() -> list[str]:
    """The languages with a bundled list."""
    folder = resources.files("llm_platform.data.filters") / "ldnoobw"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


@functools.cache
def pattern(lang: str, uri: str = "") -> re.Pattern | None:
    """The compiled rule for `lang` (None: no list for it), from the bundled list or the file at `uri`."""
    if uri:
        from llm_platform import storage

        text = storage.read_text(uri)
    else:
        path = resources.files("llm_platform.data.filters") / "ldnoobw" / f"{lang}.txt"
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
    words = sorted({w.strip().lower() for w in text.splitlines() if w.strip()} - ALLOWLIST)
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in words)
    if lang in NO_WORD_BOUNDARY:
        return re.compile(alternatives)
    return re.compile(rf"(?:\W|^)({alternatives})(?:\W|$)")


def bad_words(text: str, lang: str, uri: str = "") -> str | None:
    """"bad_words" when the text holds a listed word of `lang`, else None."""
    rule = pattern(lang, uri)
    return "bad_words" if rule is not None and rule.search(text.lower()) else None
