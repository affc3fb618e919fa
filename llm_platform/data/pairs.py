"""Preference pairs for DPO: validate them, render prompt and both responses with the model's chat template, and
lay them out as two rows that share the prompt. Plain Python over a transformers tokenizer, no Ray.

Accepted records (one JSON object per line; field names from `data.prompt_field`, `data.chosen_field`,
`data.rejected_field`), in the shapes trl and the public preference sets use:
    plain         {"prompt": str, "chosen": str, "rejected": str}
    conversation  {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [assistant message(s)]}
    implicit      {"chosen": [whole conversation], "rejected": [whole conversation]}  (the shared prefix is the
                  prompt, as in Anthropic HH converted to messages)

Every pair is rendered through the tokenizer's chat template (chat.py's rendering, the one serving applies), plain
strings as one user turn and one assistant turn, so the policy learns on exactly what it will be asked. The response
tokens are the final assistant turn's (its end-of-turn tokens included); only they carry a label.

Bad pairs are skipped and counted by reason: `missing_field`, `wrong_type`, `malformed_messages`, `no_prompt`,
`identical` (chosen equals rejected), `empty_response`, `too_long` (not one response token fits in `seq_len`),
`template_error`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from llm_platform.data import chat
from llm_platform.data.pack import IGNORE_INDEX

SIDES = ("chosen", "rejected")
COLUMNS = tuple(f"{side}_{name}" for side in SIDES for name in ("input_ids", "labels", "attention_mask"))


def parse_pair(fields: dict[str, Any], names: dict[str, str]
               ) -> tuple[tuple[list[dict], list[dict], list[dict]] | None, str | None]:
    """(prompt messages, chosen messages, rejected messages), or `reason:detail` naming what is wrong.

    Args:
        fields: one record's JSON object.
        names: the field names `prompt`, `chosen`, `rejected`.
    """
    fields = {k: v for k, v in fields.items() if v is not None}
    for key in SIDES:
        if names[key] not in fields:
            return None, f"missing_field:{names[key]}"
    chosen, rejected = fields[names["chosen"]], fields[names["rejected"]]
    prompt = fields.get(names["prompt"])
    if prompt is None:  # implicit prompt: the conversations' shared prefix
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return None, (f"missing_field:{names['prompt']} (needed unless {names['chosen']} and "
                          f"{names['rejected']} are whole conversations)")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            return None, "no_prompt:the two conversations share no first message"
    prompt_msgs, reason = _messages(prompt, "user", names["prompt"])
    if reason or prompt_msgs is None:
        return None, reason
    sides: list[list[dict]] = []
    for key, value in ((names["chosen"], chosen), (names["rejected"], rejected)):
        msgs, reason = _messages(value, "assistant", key)
        if reason or msgs is None:
            return None, reason
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            return None, f"empty_response:{key} ends without an assistant answer"
        sides.append(msgs)
    if sides[0] == sides[1]:
        return None, "identical:chosen and rejected are the same"
    return (prompt_msgs, sides[0], sides[1]), None


def _messages(value: Any, role: str, field: str) -> tuple[list[dict] | None, str | None]:
    """A string as one `role` turn, or a validated list of messages."""
    if isinstance(value, str):
        if role == "assistant" and not value.strip():
            return None, f"empty_response:{field} is empty"
        return [{"role": role, "content": value}], None
    if not isinstance(value, list) or not value:
        return None, f"wrong_type:{field} is {type(value).__name__}, not a string or a list of messages"
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and message.get("role") in chat.ROLES
                and isinstance(message.get("content"), str)):
            return None, f"malformed_messages:{field} message {i} is not {{role: system|user|assistant, content: str}}"
        out.append({"role": message["role"], "content": message["content"]})
    return out, None


def render_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]
                ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """Each side's (token ids, 0/1 mask of its final assistant turn) for the prompt followed by that side."""
    return _render_side(tokenizer, prompt + chosen), _render_side(tokenizer, prompt + rejected)


def _render_side(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, mask = chat.render(tokenizer, messages)
    # Earlier assistant turns of a multi-turn prompt are context: only the last run of assistant tokens is scored.
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return ids, [int(start <= i < end) for i in range(len(ids))]


def pair_record(sides: tuple[tuple[list[int], list[int]], ...], seq_len: int, pad_id: int
                ) -> dict[str, np.ndarray] | str:
    """The pair as one row of `COLUMNS` (each side right-padded to `seq_len`, cut at it), or a skip reason."""
    row: dict[str, np.ndarray] = {}
    for side, (ids, mask) in zip(SIDES, sides):
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not any(mask):
            return "too_long"
        pad = seq_len - len(ids)
        row[f"{side}_input_ids"] = np.asarray(ids + [pad_id] * pad, dtype=np.int32)
        row[f"{side}_labels"] = np.asarray([t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
                                           + [IGNORE_INDEX] * pad, dtype=np.int32)
        row[f"{side}_attention_mask"] = np.asarray([1] * len(ids) + [0] * pad, dtype=np.int8)
    return row


def pack_pairs(tokenizer, pairs_json: list[str], *, seq_len: int, pad_id: int) -> chat.Rendered:
    """Render a batch of parsed pairs (JSON `{prompt, chosen, rejected}` messages, as the read phase stored them);
    the lengths are both sides', and the counts `truncated`, `skipped_too_long`, `skipped_template_error`."""
    out = chat.Rendered(counts={"truncated": 0, "skipped_too_long": 0, "skipped_template_error": 0})
    columns, lengths, counts = out.columns, out.lengths, out.counts
    for index, raw in enumerate(pairs_json):
        pair = json.loads(raw)
        prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        try:
            sides = render_pair(tokenizer, prompt, chosen, rejected)
        except Exception:  # noqa: BLE001 - a template that raises on one pair is counted, not fatal to the shard
            counts["skipped_template_error"] += 1
            continue
        lengths.extend(len(ids) for ids, _ in sides)
        row = pair_record(sides, seq_len, pad_id)
        if isinstance(row, str):
            counts[f"skipped_{row}"] += 1
            continue
        counts["truncated"] += any(len(ids) > seq_len for ids, _ in sides)
        out.kept.append(index)
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    return out
