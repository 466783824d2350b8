"""Regenerate smolora_mlflow/data/reviews.jsonl, the bundled offline demo dataset.

Deterministic: the same file comes out on every machine. Run: python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

DISHES = ["pasta", "pizza", "soup", "salad", "steak", "burger", "curry", "ramen", "taco", "risotto",
          "fish", "dessert", "bread", "coffee", "noodle soup", "dumpling plate", "pie", "sandwich"]
GOOD = ["delicious", "fresh", "perfectly cooked", "full of flavor", "warm and comforting", "excellent"]
BAD = ["cold", "bland", "overcooked", "too salty", "dry", "disappointing"]
STAFF_GOOD = ["friendly", "attentive", "quick", "helpful", "kind"]
STAFF_BAD = ["slow", "rude", "distracted", "forgetful", "unfriendly"]
PLACES = ["The room was cozy.", "The music was too loud.", "The terrace was lovely.", "It was very busy.",
          "The tables were clean.", "Parking was easy.", "The view was great.", "It was quiet inside."]
ENDINGS_GOOD = ["I would come back.", "Highly recommended.", "We will return soon.", "Five stars."]
ENDINGS_BAD = ["I would not come back.", "Not worth the price.", "We left hungry.", "Two stars at most."]


def review(rng: random.Random) -> dict:
    positive = rng.random() < 0.6
    dish = rng.choice(DISHES)
    food = rng.choice(GOOD if positive else BAD)
    staff = rng.choice(STAFF_GOOD if positive else STAFF_BAD)
    parts = [
        f"The {dish} was {food}.",
        f"Our waiter was {staff}.",
        rng.choice(PLACES),
        rng.choice(ENDINGS_GOOD if positive else ENDINGS_BAD),
    ]
    if rng.random() < 0.5:
        parts.pop(2)
    return {"text": " ".join(parts), "label": "positive" if positive else "negative"}


def main() -> None:
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < 400:
        row = review(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    out = Path(__file__).resolve().parents[1] / "smolora_mlflow" / "data" / "reviews.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} reviews to {out}")


if __name__ == "__main__":
    main()
