"""Cleaning, PII scrubbing and each quality filter."""

import pytest

from llm_platform.config.data import FilterConfig
from llm_platform.data import clean

GOOD = "The little dog ran to the park and played with a red ball all afternoon."


def test_normalize_unicode_controls_and_whitespace():
    raw = "Cafe\u0301\x00  au\tlait\u200b \r\n\r\n\r\n\r\n  end  "
    assert clean.normalize(raw, "NFC") == "Caf\u00e9 au lait\n\nend"
    assert clean.normalize("\ufb01ne", "NFKC") == "fine"


@pytest.mark.parametrize("text,expected", [
    ("mail me at jane.doe@example.org today", "mail me at <EMAIL> today"),
    ("server 192.168.10.254 is down", "server <IP> is down"),
    ("call 555-010-1234 now", "call <PHONE> now"),
    ("call +1 (555) 010-1234 now", "call <PHONE> now"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 ok", "v6 <IP> ok"),
])
def test_scrub_pii(text, expected):
    assert clean.scrub_pii(text)[0] == expected


def test_scrub_pii_keeps_ordinary_numbers():
    assert clean.scrub_pii("In 2024 we sold 12 boats and 3.5 tons.") == ("In 2024 we sold 12 boats and 3.5 tons.", 0)


@pytest.mark.parametrize("text,reason,overrides", [
    ("", "empty", {}),
    ("short", "too_short", {}),
    (GOOD * 10, "too_long", {"max_chars": 100}),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbbb", "too_few_words", {}),
    ("supercalifragilistic extraordinarilyverbose incomprehensibilities", "mean_word_length", {"min_words": 0}),
    ("# # # # hello there friend, what a day " + "# " * 5, "symbol_ratio", {}),
    ("123 456 789 000 111 222 333 444 dog cat", "alpha_fraction", {}),
    ("same line here\nsame line here\nsame line here\nother line", "repeated_lines", {}),
])
def test_each_filter_names_its_reason(text, reason, overrides):
    assert clean.quality_reason(text, FilterConfig(**overrides)) == reason


def test_filters_can_be_switched_off():
    text = "123 456 789 000 111 222 333 444 dog cat"
    assert clean.quality_reason(text, FilterConfig(alpha_fraction=False)) == ""
    assert clean.quality_reason(GOOD, FilterConfig()) == ""


def test_clean_record_keeps_earlier_drop_and_scrubs():
    dropped = {"text": "", "drop_reason": "malformed_json"}
    assert clean.clean_record(dropped, "NFC", True, FilterConfig())["drop_reason"] == "malformed_json"
    rec = clean.clean_record({"text": GOOD + " Mail a@b.co", "drop_reason": ""}, "NFC", True, FilterConfig())
    assert rec["drop_reason"] == "" and "<EMAIL>" in rec["text"] and rec["pii_replacements"] == 1


def test_supervised_record_needs_both_sides():
    rec = clean.clean_record({"prompt": "Hi?", "response": "  ", "text": "", "drop_reason": ""}, "NFC", False,
                             FilterConfig(min_chars=0, min_words=0))
    assert rec["drop_reason"] == "empty"


def test_the_sample_corpus_is_the_same_corpus_release_after_release():
    """The built-in corpus is generated, not stored: its bytes depend on the order of the generator's random draws.
    A refactor that reorders them (a line wrap that hoisted a draw did, once) silently changes every smoke
    dataset's contents and counts; this pins them."""
    import hashlib

    from llm_platform.data import sample

    body = sample.to_jsonl(sample.generate(1000, seed=0))
    body = body if isinstance(body, bytes) else body.encode()
    assert hashlib.sha256(body).hexdigest()[:16] == "5a82df680d0735b2"


def test_chat_turns_are_normalized_and_scrubbed_and_text_follows_them():
    """Chat tokens come from `messages`: cleaning only `text` left e-mail addresses and control characters in what
    the model was trained on."""
    import json

    messages = [{"role": "user", "content": "Mail me at  jane.doe@example.org\x00 please"},
                {"role": "assistant", "content": "Sure, I will write to\u200b you at 10.0.0.1 today."}]
    record = {"messages": json.dumps(messages), "text": "\n\n".join(m["content"] for m in messages),
              "drop_reason": ""}
    out = clean.clean_record(record, "NFC", True, FilterConfig())
    turns = json.loads(out["messages"])
    assert [t["content"] for t in turns] == ["Mail me at <EMAIL> please", "Sure, I will write to you at <IP> today."]
    assert out["text"] == "Mail me at <EMAIL> please\n\nSure, I will write to you at <IP> today."
    assert out["pii_replacements"] == 2 and out["drop_reason"] == ""
    emptied = {"messages": json.dumps([{"role": "user", "content": "Say nothing at all please."},
                                       {"role": "assistant", "content": "\u200b\x00"}]), "text": "x", "drop_reason": ""}
    assert clean.clean_record(emptied, "NFC", False, FilterConfig())["drop_reason"] == "empty_assistant"


def test_rule_sets_judge_every_record_but_rewrite_plain_text_only():
    """C4 removes failing lines from a plain document; a supervised or chat record's text is rebuilt from its fields,
    so there the rules only decide, and the fields stay as cleaned."""
    import json

    from llm_platform.config.data import C4Config
    from llm_platform.data import filters

    c4_on = FilterConfig(c4=C4Config(enabled=True, min_sentences=1))
    rules = filters.build(c4_on)
    plain = clean.clean_record({"text": "A first full line here.\nmenu home login", "drop_reason": ""}, "NFC", False,
                               c4_on, rules)
    assert (plain["text"], plain["drop_reason"]) == ("A first full line here.", "")
    sft = clean.clean_record({"prompt": "Say it in words?", "response": "Yes, in three words.\nok", "text": "",
                              "drop_reason": ""}, "NFC", False, c4_on, rules)
    assert sft["drop_reason"] == "" and sft["text"] == "Say it in words?\n\nYes, in three words.\nok"
    messages = [{"role": "user", "content": "Show me code please."},
                {"role": "assistant", "content": "Here is the code that you asked for {a}."}]
    chat = clean.clean_record({"messages": json.dumps(messages), "text": "", "drop_reason": ""}, "NFC", False, c4_on,
                              rules)
    assert chat["drop_reason"] == "c4.curly_bracket"
    # Without rule sets nothing changes: no language, the basic filters only.
    assert "language" not in clean.clean_record({"text": GOOD, "drop_reason": ""}, "NFC", False, FilterConfig())
