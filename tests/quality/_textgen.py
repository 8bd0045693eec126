"""Synthetic good and bad documents for the quality-classifier tests, and a tiny trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUBJECTS = ["the river", "a historian", "the committee", "our village", "the old library", "the scientist",
            "the orchestra", "a young farmer", "the city council", "the museum", "the harbour", "her teacher"]
VERBS = ["described", "examined", "restored", "studied", "recorded", "explained", "published", "celebrated",
         "measured", "documented", "translated", "compared"]
OBJECTS = ["the history of the region", "a careful account of the flood", "the letters of its founder",
           "the migration of birds", "an exhibition on early printing", "the results of the survey",
           "a new edition of the poems", "the changes in the climate", "the traditions of the valley",
           "the design of the bridge", "the records of the parish", "the growth of the town"]
ENDINGS = ["in great detail.", "over many years.", "with remarkable patience.", "for the first time.",
           "before the war.", "after a long debate.", "in the spring of that year.", "with the help of volunteers."]
SPAM = ["click here", "buy now", "free shipping", "limited offer", "best price", "casino bonus", "sign up today",
        "cheap pills", "win big", "subscribe", "login", "cookie policy", "all rights reserved", "terms of use",
        "home | about | contact", "share on facebook", "100% free", "hot deals", "act now",
        "lowest price guaranteed"]


def prose(rng: np.random.Generator) -> str:
    """A paragraph of clean, varied sentences."""
    return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                    f"{rng.choice(ENDINGS)}" for _ in range(int(rng.integers(3, 7))))


def spam(rng: np.random.Generator) -> str:
    """Lines of boilerplate and advertising, one per line (so fastText's newline handling matters)."""
    return "\n".join(" ".join(rng.choice(SPAM, size=int(rng.integers(1, 4)))) + "!" * int(rng.integers(0, 3))
                     for _ in range(int(rng.integers(4, 12))))


def write_jsonl(path: Path, texts: list[str], prefix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n")
    return path


def write_classes(root: Path, n: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """``pos.jsonl`` (prose) and ``neg.jsonl`` (spam), `n` documents each."""
    rng = np.random.default_rng(seed)
    pos = write_jsonl(root / "pos.jsonl", [prose(rng) for _ in range(n)], "p")
    neg = write_jsonl(root / "neg.jsonl", [spam(rng) for _ in range(n)], "n")
    return pos, neg


TINY_FASTTEXT = {"dim": 16, "bucket": 20_000, "epoch": 5}
