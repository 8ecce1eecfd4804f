"""Judge quality before labelling: labelled pairwise sets and the statistics of a judge on them.

A set is JSONL, one comparison per line: `prompt`, `better`, `worse`, `aspect` (which principles
judge it: harmless | helpful), optional `id` and `category`. The project ships four, written for
it (`cai_ray/resources/judge-*.jsonl`):

- `harmless`: a harmful request answered by helping vs the same request engaged harmlessly
  (explained, redirected; never a bare refusal);
- `evasive`: a sensitive but answerable request, answered vs evaded;
- `helpful`: a benign request answered well vs worse (wrong, vague, off the ask);
- `hhh-dev`: a development set in the style of a helpful / honest / harmless evaluation.

Pure functions here (no engine): loading with row-level errors, the side each item puts its
better response on (half A, half B, by a hash of its id, so a judge that always answers the same
letter scores 50%), and the statistics: accuracy with a percentile-bootstrap interval, expected
calibration error, order disagreement and the judge's lean towards option (A).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cai_ray.configschema import Problem, ValidationError

BUILTIN_SETS = ("harmless", "evasive", "helpful", "hhh-dev")
ASPECTS = ("harmless", "helpful")
RESOURCES = Path(__file__).resolve().parent / "resources"


@dataclass(frozen=True)
class JudgeItem:
    id: str
    aspect: str
    prompt: str
    better: str
    worse: str
    category: str = ""

    @property
    def better_is_a(self) -> bool:
        """Where the better response stands in the first order: a stable coin per id."""
        return hashlib.sha256(self.id.encode()).digest()[0] % 2 == 0

    def options(self) -> tuple[str, str]:
        return (self.better, self.worse) if self.better_is_a else (self.worse, self.better)


def set_path(name: str) -> Path:
    """A built-in set's file, or the user's file as given."""
    if name in BUILTIN_SETS:
        return RESOURCES / f"judge-{name}.jsonl"
    return Path(name).expanduser()


def set_label(name: str) -> str:
    return name if name in BUILTIN_SETS else Path(name).stem


def load_set(name: str) -> list[JudgeItem]:
    """Every bad line of the file named at once, before any engine starts."""
    path = set_path(name)
    if not path.is_file():
        why = (f"the built-in set's file {path} is missing from the installation"
               if name in BUILTIN_SETS else f"{name!r} is neither a built-in set "
               f"({', '.join(BUILTIN_SETS)}) nor an existing JSONL file")
        raise ValidationError("judge check", [Problem("feedback.check_sets", why)])
    items, problems, seen = [], [], set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(f"line {i}", f"invalid JSON: {e.msg}", str(path)))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(f"line {i}", "expected a JSON object", str(path)))
            continue
        missing = [k for k in ("prompt", "better", "worse")
                   if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            problems.append(Problem(f"line {i}", f"missing or empty {', '.join(missing)} "
                                    "(each line needs prompt, better, worse, aspect)", str(path)))
            continue
        aspect = row.get("aspect", "harmless")
        if aspect not in ASPECTS:
            problems.append(Problem(f"line {i}", f"aspect {aspect!r} is not one of "
                                    f"{', '.join(ASPECTS)}", str(path)))
            continue
        item_id = str(row.get("id") or f"{set_label(name)}-{i}")
        if item_id in seen:
            problems.append(Problem(f"line {i}", f"duplicate id {item_id!r}", str(path)))
            continue
        seen.add(item_id)
        items.append(JudgeItem(item_id, aspect, row["prompt"].strip(), row["better"].strip(),
                               row["worse"].strip(), str(row.get("category", ""))))
    if not items and not problems:
        problems.append(Problem("", "no comparisons in the file", str(path)))
    if problems:
        raise ValidationError(f"invalid judge set {name!r}", problems)
    return items


def bootstrap_interval(correct: Sequence[float], samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean of per-item scores (1, 0, or 0.5 for a tie)."""
    n = len(correct)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n
                   for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return (lo, hi)


def expected_calibration_error(p_better: Sequence[float], bins: int = 10) -> float:
    """ECE of the judge's confidence in its own choice: items binned by max(p, 1-p); each bin's
    |mean confidence - accuracy| weighted by its share."""
    n = len(p_better)
    if n == 0:
        return float("nan")
    conf = [max(p, 1 - p) for p in p_better]
    right = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_better]
    total = 0.0
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == hi)]
        if idx:
            gap = abs(sum(conf[i] for i in idx) / len(idx) - sum(right[i] for i in idx) / len(idx))
            total += len(idx) / n * gap
    return total


@dataclass
class SetResult:
    name: str
    n: int
    accuracy: float
    interval: tuple[float, float]
    ece: float
    order_disagreement: float | None  # None when only one order was asked
    lean_a: float  # mean p(option A) over every single-order judgement: 0.5 = no position lean
    mean_p_better: float
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def chance_in_interval(self) -> bool:
        return self.interval[0] <= 0.5 <= self.interval[1]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["interval"] = list(self.interval)
        d["chance_in_interval"] = self.chance_in_interval
        return d


def score(correct_of: float) -> float:
    return 1.0 if correct_of > 0.5 else 0.5 if correct_of == 0.5 else 0.0


def summarize_set(name: str, items: Sequence[JudgeItem], p_a: Sequence[float],
                  disagree: Sequence[bool] | None, raw_first: Sequence[float],
                  seed: int = 0) -> SetResult:
    """Statistics of one set from the folded p(A) of each item (A as in `item.options()`),
    whether its two orders disagreed, and every raw single-order p(option A)."""
    p_better = [p if it.better_is_a else 1.0 - p for it, p in zip(items, p_a, strict=True)]
    correct = [score(p) for p in p_better]
    cats: dict[str, list[float]] = {}
    for it, c in zip(items, correct, strict=True):
        cats.setdefault(it.category or "-", []).append(c)
    return SetResult(
        name=name, n=len(items), accuracy=sum(correct) / max(len(correct), 1),
        interval=bootstrap_interval(correct, seed=seed),
        ece=expected_calibration_error(p_better),
        order_disagreement=(sum(disagree) / max(len(disagree), 1)) if disagree is not None
        else None,
        lean_a=sum(raw_first) / max(len(raw_first), 1),
        mean_p_better=sum(p_better) / max(len(p_better), 1),
        by_category={k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(cats.items())})


def table(results: Sequence[SetResult]) -> str:
    """The console/report table, one row per set."""
    head = f"{'set':<10} {'n':>4} {'accuracy':>9} {'95% interval':>15} {'ECE':>6} " \
           f"{'order dis.':>10} {'lean A':>7}"
    rows = [head]
    for r in results:
        dis = "-" if r.order_disagreement is None else f"{100 * r.order_disagreement:.0f}%"
        rows.append(f"{r.name:<10} {r.n:>4} {100 * r.accuracy:>8.1f}% "
                    f"{f'[{100 * r.interval[0]:.0f}, {100 * r.interval[1]:.0f}]%':>15} "
                    f"{r.ece:>6.3f} {dis:>10} {r.lean_a:>7.2f}"
                    + ("  <- interval contains 50%" if r.chance_in_interval else ""))
    return "\n".join(rows)
