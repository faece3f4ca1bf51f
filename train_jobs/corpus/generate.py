"""Deterministically generate the bundled instruction dataset (self-made, no third-party text).

Run from the repository root to regenerate `train_jobs/corpus/instructions.jsonl`:

    python -m train_jobs.corpus.generate

The pairs are simple, checkable facts (arithmetic, capitals, colours, word games) so a fine-tune
has a learnable signal on a tiny model and a held-out loss that moves within a few steps.
"""

import json
import random
from pathlib import Path

SEED = 7
OUT = Path(__file__).with_name("instructions.jsonl")

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Cuba": "Havana",
}
_MIXES = {
    ("red", "blue"): "purple",
    ("blue", "yellow"): "green",
    ("red", "yellow"): "orange",
    ("red", "white"): "pink",
    ("black", "white"): "grey",
}
_WORDS = [
    "solana",
    "ray",
    "token",
    "ledger",
    "model",
    "layer",
    "wallet",
    "shard",
    "reward",
    "client",
]


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    return {"instruction": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."}


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    return {
        "instruction": f"What is the capital of {country}?",
        "response": f"The capital of {country} is {_CAPITALS[country]}.",
    }


def _colour(rng: random.Random) -> dict[str, str]:
    (first, second), mix = rng.choice(sorted(_MIXES.items()))
    return {
        "instruction": f"What colour do you get by mixing {first} and {second}?",
        "response": f"Mixing {first} and {second} gives {mix}.",
    }


def _word_game(rng: random.Random) -> dict[str, str]:
    word = rng.choice(_WORDS)
    if rng.random() < 0.5:
        return {
            "instruction": f"Spell the word '{word}' backwards.",
            "response": f"'{word}' backwards is '{word[::-1]}'.",
        }
    return {
        "instruction": f"How many letters are in the word '{word}'?",
        "response": f"The word '{word}' has {len(word)} letters.",
    }


def generate(count: int = 400, seed: int = SEED) -> list[dict[str, str]]:
    """`count` instruction/response pairs, identical for the same seed."""
    rng = random.Random(seed)
    makers = [_arithmetic, _capital, _colour, _word_game]
    return [rng.choice(makers)(rng) for _ in range(count)]


def main() -> None:
    with OUT.open("w") as handle:
        for record in generate():
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
