"""AI-labelled comparisons (`DIR/label/comparisons`, or a JSONL file): reading them with every
bad row named, and the seeded mix and held-out split the preference model and DPO share."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import datasets

from cai_ray.configschema import Problem, ValidationError
from cai_ray.messages import Comparison


def read_comparisons(path: Path, origin: str) -> list[Comparison]:
    """Comparisons from a saved dataset or a JSONL file; every bad row is named at once."""
    if path.is_dir():
        rows = datasets.load_from_disk(str(path)).to_list()
        where = "row"
    else:
        rows, where = [], "line"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            try:
                rows.append(json.loads(line) if line.strip() else None)
            except json.JSONDecodeError as e:
                raise ValidationError("invalid comparisons", [Problem(
                    f"line {i + 1}", f"invalid JSON: {e.msg}", origin)]) from None
    problems, out = [], []
    for i, r in enumerate(rows):
        if r is None:
            continue
        at = f"{where} {i + 1 if where == 'line' else i}"
        msgs = r.get("messages") or ([{"role": "user", "content": r["prompt"]}]
                                     if isinstance(r.get("prompt"), str) else None)
        bad = [k for k in ("response_a", "response_b") if not isinstance(r.get(k), str)]
        if msgs is None:
            bad.insert(0, "prompt (or messages)")
        if bad:
            problems.append(Problem(at, f"missing {', '.join(bad)}", origin))
            continue
        p = r.get("p_a")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            problems.append(Problem(at, f"p_a must be a number in [0, 1], got {p!r}", origin))
            continue
        aspect = r.get("aspect", "harmless")
        if aspect not in ("harmless", "helpful"):
            problems.append(Problem(at, f"aspect must be 'harmless' or 'helpful', got "
                                    f"{aspect!r}", origin))
            continue
        fin = [r.get(k, True) for k in ("finished_a", "finished_b")]
        if not all(isinstance(x, bool) for x in fin):
            problems.append(Problem(at, f"finished_a/finished_b must be true or false, got "
                                    f"{fin}", origin))
            continue
        out.append(Comparison(msgs, r["response_a"], r["response_b"], float(p), aspect,
                              fin[0], fin[1]))
    if not out and not problems:
        problems.append(Problem("", "no comparisons", origin))
    if problems:
        raise ValidationError("invalid comparisons", problems[:20])
    return out


def mix_and_split(comps: list[Comparison], helpful_fraction: float | None,
                  eval_fraction: float, seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """Subsample the larger aspect so helpfulness makes up `helpful_fraction` (as far as the
    data allows), shuffle with `seed`, and hold out `eval_fraction` of each aspect."""
    rng = random.Random(seed)
    harm = [c for c in comps if c.aspect == "harmless"]
    help_ = [c for c in comps if c.aspect == "helpful"]
    rng.shuffle(harm)
    rng.shuffle(help_)
    if helpful_fraction is None:
        pass
    elif harm and help_ and 0 < helpful_fraction < 1:
        want_help = round(len(harm) * helpful_fraction / (1 - helpful_fraction))
        if want_help <= len(help_):
            help_ = help_[:want_help]
        else:
            harm = harm[:round(len(help_) * (1 - helpful_fraction) / helpful_fraction)]
    elif helpful_fraction == 0:
        help_ = []
    elif helpful_fraction == 1:
        harm = []
    train, held = [], []
    for part in (harm, help_):
        k = math.ceil(len(part) * eval_fraction) if eval_fraction > 0 else 0
        held += part[:k]
        train += part[k:]
    rng.shuffle(train)
    return train, held


def load_comparisons(out_dir: Path, comparisons: str | None) -> list[Comparison]:
    """The comparisons a training stage reads: `comparisons` (a JSONL file or a saved
    dataset), else the label stage's `DIR/label/comparisons`."""
    src = Path(comparisons) if comparisons else out_dir / "label" / "comparisons"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: run `cai-ray label` first, or pass "
                                "--comparisons")
    return read_comparisons(src, str(src))


def agreement_report(p_model: list[float], comps: list[Comparison]) -> dict[str, Any]:
    """Accuracy, ECE and the reliability bins of a model's p(A) against the labels, overall
    and per aspect (the PM's held-out report, and DPO's implicit reward's)."""
    from cai_ray.algorithms.preference import accuracy, reliability

    out: dict[str, Any] = {}
    for aspect in ("all", "harmless", "helpful"):
        sel = [(m, c) for m, c in zip(p_model, comps, strict=True)
               if aspect == "all" or c.aspect == aspect]
        if not sel:
            continue
        pm = [m for m, _ in sel]
        labels = [c.p_a for _, c in sel]
        ece, bins = reliability(pm, labels)
        out[aspect] = {"count": len(sel), "accuracy": accuracy(pm, labels), "ece": ece,
                       "reliability": bins}
    return out
