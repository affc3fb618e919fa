"""Preference pairs to DPO-tune the checkpoints of checkpoint_fixtures.py on: the right color is chosen, an evasive
answer rejected (a preference a tiny model learns in a few steps and that holds on pairs it has not seen), in the three
record shapes data/pairs.py accepts, plus one bad record per skip reason."""

from __future__ import annotations

import json
import random
from pathlib import Path

from checkpoint_fixtures import COLORS, THINGS


def pair(rng: random.Random, shape: str) -> dict:
    thing = rng.choice(THINGS)
    right = COLORS[THINGS.index(thing) % len(COLORS)]
    evasive = rng.choice(["I would rather not say.", "No idea, sorry.", "Ask someone else."])
    question, good, bad = f"What color is the {thing}?", f"The {thing} is {right}.", evasive
    if shape == "plain":
        return {"prompt": question, "chosen": good, "rejected": bad}
    if shape == "conversation":
        return {"prompt": [{"role": "system", "content": "You answer with colors."},
                           {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}]}
    user = {"role": "user", "content": question}  # implicit prompt: whole conversations sharing their start
    return {"chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}]}


BAD = {
    "missing_field": {"prompt": "What color is the sky?", "chosen": "The sky is blue."},
    "identical": {"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is blue."},
    "empty_response": {"prompt": "What color is the sky?", "chosen": " ", "rejected": "The sky is red."},
    "wrong_type": {"prompt": "What color is the sky?", "chosen": 3, "rejected": "The sky is red."},
}


def write_pairs(path: Path, n: int = 96, seed: int = 0, bad: bool = True) -> dict[str, int]:
    """A pairs.jsonl of `n` good pairs (shapes in turn) plus, with `bad`, one bad record per reason; returns
    {reason: line} of the bad ones."""
    rng = random.Random(seed)
    lines = [pair(rng, ("plain", "conversation", "implicit")[i % 3]) for i in range(n)]
    where = {}
    if bad:
        for k, (reason, record) in enumerate(BAD.items()):
            at = min(5 + 9 * k, len(lines))
            lines.insert(at, record)
            where[reason] = at + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return where
