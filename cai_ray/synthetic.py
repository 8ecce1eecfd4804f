"""A planted preference task with a known answer, for learning tests and benchmarks.

Pairs of the same random letters, one of them with half its letters replaced by digits: a PM
trained on them prefers digits, so a policy that learns from that PM must come to write digits.
Token ids are the tiny model's (`tiny-llama`), where they decode to single characters.
"""

from __future__ import annotations

import random
from typing import Any

DIGITS = list(range(18, 28))  # tiny-llama ids of "0".."9": the marker the PM learns to like
LETTERS = list(range(65, 91))  # ids of "a".."z"


def marker_pairs(tok: Any, n: int = 300, seed: int = 0, mixed: bool = True
                 ) -> list[dict[str, Any]]:
    """`n` comparison rows (prompt, response_a, response_b, p_a, finished_a/b); the side with
    digits wins. `mixed`: half the pairs are marked cut off (no EOS), else all of them are, as
    every sample of a policy that never stops is: the PM then learns to read the marker the way
    PPO will score it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = [rng.choice(LETTERS) for _ in range(rng.randint(6, 16))]
        good = list(base)
        for j in rng.sample(range(len(base)), k=len(base) // 2):
            good[j] = rng.choice(DIGITS)
        a_good = rng.random() < 0.5
        g, b = tok.decode(good), tok.decode(base)
        finished = i % 2 == 0 if mixed else False
        rows.append({"prompt": f"Question {i}", "response_a": g if a_good else b,
                     "response_b": b if a_good else g, "p_a": 1.0 if a_good else 0.0,
                     "finished_a": finished, "finished_b": finished})
    return rows
