"""Chat and instruction records: validate them, render them with the model's chat template, mask the loss to the
assistant turns. Plain Python over a transformers tokenizer, no Ray.

Accepted records (one JSON object per line), detected per record:
    messages      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (OpenAI format)
    Alpaca        {"instruction": str, "input": str (optional), "output": str}  -> user, assistant
    prompt/resp.  {"prompt": str, "response": str}                               -> user, assistant

Rendering uses the tokenizer's own `chat_template`, so training sees exactly what serving's `/v1/chat/completions`
renders. A tokenizer without one gets `DEFAULT_CHAT_TEMPLATE`, the one serving falls back to (`role: content` lines),
and an EOS after the last assistant turn so the model learns to stop; a model's own template ends its turns itself.

Which tokens carry the loss: with a template that marks assistant text with `{% generation %}`, transformers'
`return_assistant_tokens_mask`; otherwise (most released templates, Llama 3's included) the assistant spans are
found as axolotl does, by rendering each prefix: the text of `messages[:i]` plus the generation prompt ends where
assistant turn i starts, the text of `messages[:i+1]` ends where it stops (its end-of-turn tokens included). Each
token whose first character falls in a span is an assistant token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_platform.data.pack import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class TemplateError(ValueError):
    """The chat template renders a conversation in a way the assistant spans cannot be found in."""


def parse_record(fields: dict[str, Any], names: dict[str, str]) -> tuple[list[dict[str, str]] | None, str | None]:
    """The record's conversation as messages, or an error `reason: detail` naming what is wrong.

    Args:
        fields: the JSON object of one record.
        names: field names `messages`, `instruction`, `input`, `output`, `prompt`, `response` (from the data config).
    """
    # A null field is an absent one: a parquet file that mixes record shapes has every column in every row, and
    # Alpaca sets write "input": null as often as "input": "".
    fields = {k: v for k, v in fields.items() if v is not None}
    if names["messages"] in fields:
        return _check_messages(fields[names["messages"]], names["messages"])
    if names["instruction"] in fields:
        parts = []
        for key in ("instruction", "input", "output"):
            value = fields.get(names[key], "" if key == "input" else None)
            if value is None:
                return None, f"missing_field:{names[key]}"
            if not isinstance(value, str):
                return None, f"wrong_type:{names[key]} is {type(value).__name__}"
            parts.append(value)
        instruction, extra, output = parts
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return _check_messages([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                               names["output"])
    if names["prompt"] in fields or names["response"] in fields:
        for key in ("prompt", "response"):
            value = fields.get(names[key])
            if value is None:
                return None, f"missing_field:{names[key]}"
            if not isinstance(value, str):
                return None, f"wrong_type:{names[key]} is {type(value).__name__}"
        return _check_messages([{"role": "user", "content": fields[names["prompt"]]},
                                {"role": "assistant", "content": fields[names["response"]]}], names["response"])
    return None, (f"missing_field:{names['messages']} (or {names['instruction']}/{names['output']}, or "
                  f"{names['prompt']}/{names['response']})")


def _check_messages(messages: Any, field: str) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(messages, list) or not messages:
        return None, f"malformed_messages:{field} is not a non-empty list"
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"malformed_messages:message {i} is {type(message).__name__}, not an object"
        role = message.get("role")
        if role not in ROLES:
            return None, f"unknown_role:message {i} has role {role!r} (allowed: {', '.join(ROLES)})"
        content = message.get("content")
        if content is None:
            return None, f"missing_field:message {i} has no content"
        if not isinstance(content, str):
            return None, f"wrong_type:message {i} content is {type(content).__name__}, not a string"
        if role == "assistant" and not content.strip():
            return None, f"empty_assistant:message {i} is an empty assistant turn"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return None, "missing_assistant:no assistant turn to learn from"
    return out, None


def template_of(tokenizer) -> tuple[str, bool]:
    """(the template to render with, whether it is the platform default)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own or own == DEFAULT_CHAT_TEMPLATE:
        return DEFAULT_CHAT_TEMPLATE, True
    return own, False


def render(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant tokens (those that carry the loss)."""
    template, default = template_of(tokenizer)
    if _GENERATION.search(template):
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _render_by_prefixes(tokenizer, messages, template)
    if default and messages[-1]["role"] == "assistant" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # the default template has no end-of-turn token: EOS says "stop"
        mask.append(1)
    return ids, mask


def _render_by_prefixes(tokenizer, messages: list[dict[str, str]], template: str) -> tuple[list[int], list[int]]:
    def text_of(msgs: list[dict[str, str]], prompt: bool) -> str:
        if not msgs and not prompt:
            return ""
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    full = text_of(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, stop = len(text_of(messages[:i], True)), len(text_of(messages[:i + 1], False))
        if not (full.startswith(text_of(messages[:i + 1], False)) and start <= stop):
            raise TemplateError(f"the chat template does not render message {i} as a continuation of the ones "
                                f"before it, so its tokens cannot be found")
        spans.append((start, stop))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) if e > s else 0 for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def record(ids: list[int], mask: list[int], seq_len: int, pad_id: int, overflow: str) -> dict[str, np.ndarray] | str:
    """One training row (the sft layout), or the reason it is skipped.

    Longer conversations are cut to `seq_len` (`overflow=truncate`; skipped when no assistant token is left) or
    skipped (`overflow=skip`). Skip reasons: `too_long`, `no_assistant_tokens`.
    """
    if not any(mask):
        return "no_assistant_tokens"
    if len(ids) > seq_len:
        if overflow == "skip" or not any(mask[:seq_len]):
            return "too_long"
        ids, mask = ids[:seq_len], mask[:seq_len]
    pad = seq_len - len(ids)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {
        "input_ids": np.asarray(ids + [pad_id] * pad, dtype=np.int32),
        "labels": np.asarray(labels + [IGNORE_INDEX] * pad, dtype=np.int32),
        "attention_mask": np.asarray([1] * len(ids) + [0] * pad, dtype=np.int8),
    }


@dataclass
class Rendered:
    """A batch of conversations (or preference pairs) rendered into padded rows."""

    columns: dict[str, list] = field(default_factory=dict)
    """The kept records' columns, a row each."""
    lengths: list[int] = field(default_factory=list)
    """Every rendered record's length (both sides of a pair), kept or not."""
    counts: dict[str, int] = field(default_factory=dict)
    """Truncated and skipped records by reason."""
    kept: list[int] = field(default_factory=list)
    """The index in the batch of each kept record (a row of the columns)."""


def pack_chats(tokenizer, messages_json: list[str], *, seq_len: int, pad_id: int, overflow: str) -> Rendered:
    """Render and mask a batch of conversations (JSON strings as the read phase stored them); counts `truncated`,
    `skipped_too_long`, `skipped_no_assistant_tokens`, `skipped_template_error`."""
    out = Rendered(counts={"truncated": 0, "skipped_too_long": 0, "skipped_no_assistant_tokens": 0,
                           "skipped_template_error": 0})
    columns, lengths, counts = out.columns, out.lengths, out.counts
    for index, raw in enumerate(messages_json):
        try:
            ids, mask = render(tokenizer, json.loads(raw))
        except Exception:  # noqa: BLE001 - a template that raises on one conversation (jinja, TemplateError)
            counts["skipped_template_error"] += 1  # is counted in the manifest, not fatal to the whole shard
            continue
        lengths.append(len(ids))
        row = record(ids, mask, seq_len, pad_id, overflow)
        if isinstance(row, str):
            counts[f"skipped_{row}"] += 1
            continue
        counts["truncated"] += len(ids) > seq_len
        out.kept.append(index)
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    return out
