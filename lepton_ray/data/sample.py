"""The examples' own datasets: seeded, templated product reviews with realistic dirt (the
quickstart's), and small instruction conversations (the causal-LM tests').

It is small enough to fine-tune on two CPU cores in a minute, and carries the problems the
cleaning stage exists for: duplicates, stray whitespace, odd unicode and empty rows.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

PRODUCTS = [
    "headphones",
    "blender",
    "backpack",
    "phone case",
    "desk lamp",
    "coffee maker",
    "keyboard",
    "running shoes",
    "water bottle",
    "tent",
    "monitor",
    "vacuum",
    "novel",
    "board game",
    "jacket",
    "toaster",
    "camera",
    "mattress",
    "chair",
    "speaker",
]
POSITIVE = [
    "works perfectly",
    "is excellent value",
    "exceeded my expectations",
    "is sturdy and well made",
    "arrived early and works great",
    "is the best purchase I made this year",
    "feels premium",
    "is comfortable and reliable",
    "does exactly what it promises",
    "is a delight to use",
]
NEGATIVE = [
    "broke after two days",
    "is a waste of money",
    "stopped working within a week",
    "feels cheap and flimsy",
    "arrived damaged",
    "is the worst purchase I made this year",
    "does not do what it promises",
    "is uncomfortable and unreliable",
    "was returned at once",
    "is noisy and slow",
]
OPENERS = ["", "Honestly, ", "Update: ", "After a month, ", "Five stars. ", "One star. "]
CLOSERS = ["", " Would buy again.", " Never again.", " Recommended.", " Avoid.", " 10/10."]
POS_CLOSERS = ["", " Would buy again.", " Recommended.", " 10/10."]
NEG_CLOSERS = ["", " Never again.", " Avoid.", " Do not buy."]


def make_reviews(n: int = 1200, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` clean (text, label) rows, then dirty rows appended (dupes, blanks, odd unicode)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        product = rng.choice(PRODUCTS)
        phrase = rng.choice(POSITIVE if positive else NEGATIVE)
        opener = rng.choice(OPENERS[:4])
        closer = rng.choice(POS_CLOSERS if positive else NEG_CLOSERS)
        if rng.random() < 0.15:  # negated praise reads negative, negated complaint positive
            phrase = "is not " + rng.choice(
                ["excellent value", "sturdy", "comfortable", "noisy", "cheap", "flimsy"]
            )
            positive = phrase.endswith(("noisy", "cheap", "flimsy"))
        article = "the" if opener else "The"
        label = "positive" if positive else "negative"
        if rng.random() < 0.05:  # annotators disagree sometimes; real data is noisy too
            label = "negative" if positive else "positive"
        rows.append((f"{opener}{article} {product} {phrase}.{closer}", label))
    dirty = []
    for text, label in rng.sample(rows, 40):
        dirty.append((text, label))  # exact duplicate
    for text, label in rng.sample(rows, 20):
        dirty.append((f"  {text.replace(' ', '   ', 2)}\t", label))  # duplicate after cleaning
    for text, label in rng.sample(rows, 10):
        dirty.append((text.replace(" ", "\u00a0").replace("The", "Ｔｈｅ"), label))  # unicode
    dirty += [("", "positive"), ("   ", "negative"), ("\u200b", "positive")]  # empty after cleaning
    rows += dirty
    rng.shuffle(rows)
    return rows


def write_reviews_csv(path: Path, n: int = 1200, seed: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        writer.writerows(make_reviews(n, seed))
    return path


WORDS = [
    "apple", "river", "stone", "cloud", "music", "table", "garden", "window", "silver",
    "orange", "forest", "candle", "bridge", "planet", "pencil", "rocket",
]  # fmt: skip


def make_chats(n: int = 300, seed: int = 7) -> list[dict]:
    """Small instruction conversations a tiny model can learn: sums, upper-casing and
    spelling (one or two assistant turns, some with a system message), deterministic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        word = rng.choice(WORDS)
        kind = i % 3
        if kind == 0:
            turns = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a + b}"},
            ]
        elif kind == 1:
            turns = [
                {"role": "system", "content": "Answer in upper case."},
                {"role": "user", "content": f"Say {word} {i}."},
                {"role": "assistant", "content": f"{word.upper()} {i}"},
            ]
        else:
            turns = [
                {"role": "user", "content": f"Spell {word}."},
                {"role": "assistant", "content": " ".join(word)},
                {"role": "user", "content": f"And backwards ({i})?"},
                {"role": "assistant", "content": " ".join(reversed(word))},
            ]
        rows.append({"messages": turns})
    return rows


def write_chats_jsonl(path: Path, n: int = 300, seed: int = 7) -> Path:
    """:func:`make_chats` as JSONL in the ``messages`` format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in make_chats(n, seed):
            handle.write(json.dumps(row) + "\n")
    return path
