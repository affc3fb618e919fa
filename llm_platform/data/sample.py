"""The built-in sample corpus: short children's stories generated deterministically (no download).

The grammar is small enough that a tiny model learns it within a few hundred steps (so a trained model's text is
visibly better than an untrained one's), and the corpus is salted with what the data stage must handle: exact and
near duplicates, junk documents the quality filters drop, and PII the scrubber can remove.
"""

from __future__ import annotations

import json
import random

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Zoe", "Leo", "Emma", "Jack", "Lucy"]
ANIMALS = ["dog", "cat", "bird", "fish", "rabbit", "duck", "frog", "horse", "bear", "mouse"]
THINGS = ["ball", "kite", "box", "book", "hat", "boat", "cake", "drum", "car", "flower"]
COLORS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "old", "new"]
PLACES = ["park", "garden", "forest", "beach", "house", "school", "river", "farm", "hill", "shop"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "hungry", "surprised"]
VERBS = ["play", "run", "jump", "read", "sing", "dance", "swim", "draw", "walk", "laugh"]

OPENINGS = [
    "Once upon a time, there was a {adj} {animal} named {name}.",
    "One day, {name} went to the {place}.",
    "{name} had a {adj} {thing}.",
    "There was a little {animal} who lived near the {place}.",
]
MIDDLES = [
    "{name} liked to {verb} with the {thing} every day.",
    "At the {place}, {name} saw a {adj} {animal}.",
    "The {animal} was {feeling} because it lost its {thing}.",
    "{name} and the {animal} wanted to {verb} together.",
    "{name} found a {adj} {thing} under a tree.",
    "The sun was warm and the sky was blue.",
    "{name} said, \"Let us {verb} by the {place}!\"",
    "The {animal} did not want to {verb}, so {name} helped.",
]
ENDINGS = [
    "In the end, {name} was very {feeling}.",
    "They went home and had a good sleep.",
    "{name} and the {animal} were best friends.",
    "From that day on, {name} always shared the {thing}.",
]


def _fill(rng: random.Random, template: str, hero: str, animal: str, thing: str) -> str:
    return template.format(name=hero, animal=animal, thing=thing, adj=rng.choice(COLORS), place=rng.choice(PLACES),
                           feeling=rng.choice(FEELINGS), verb=rng.choice(VERBS))


def story(rng: random.Random) -> str:
    """One story: an opening, three to six middle sentences and an ending, about one hero."""
    hero, animal, thing = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS)
    sentences = [_fill(rng, rng.choice(OPENINGS), hero, animal, thing)]
    sentences += [_fill(rng, rng.choice(MIDDLES), hero, animal, thing) for _ in range(rng.randint(3, 6))]
    sentences.append(_fill(rng, rng.choice(ENDINGS), hero, animal, thing))
    return " ".join(sentences)


def generate(num_documents: int, seed: int = 0) -> list[dict]:
    """The sample documents as `{"text": ...}` records (about 3% exact and 3% near duplicates, 2% junk, PII)."""
    rng = random.Random(seed)
    docs: list[dict] = []
    for i in range(num_documents):
        roll = rng.random()
        if docs and roll < 0.03:
            docs.append(dict(rng.choice(docs)))  # exact duplicate
        elif docs and roll < 0.06:
            words = rng.choice(docs)["text"].split(" ")
            words[rng.randrange(len(words))] = rng.choice(NAMES)  # near duplicate: one word changed
            docs.append({"text": " ".join(words)})
        elif roll < 0.08:
            docs.append({"text": rng.choice(["### ### ### ...", "$$ 123 456 789 !!", "ok", "#" * 40])})  # junk
        elif roll < 0.09:
            text = story(rng)  # before the contact's choice: the order of draws is what makes the corpus
            contact = f" Write to {rng.choice(NAMES).lower()}@example.com or call 555-010-{i % 10000:04d}."
            docs.append({"text": text + contact})
        else:
            docs.append({"text": story(rng)})
    return docs


def to_jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
