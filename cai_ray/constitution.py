"""The constitution: principles in a YAML file, validated in full, sampled reproducibly.

A constitution holds critique/revision request pairs (SL-CAI), comparison principles with an
aspect (`harmless` | `helpful`) for the feedback model, and few-shot examples for critiques,
comparisons and chain-of-thought comparisons. `load_constitution` reports every problem (missing
field, duplicate id, empty text, unknown key) with the file and dotted path, before anything runs.

Sampling is keyed on (seed, item key, round) rather than drawn from one running generator, so a
resumed run draws the same principle for the same prompt and round whatever the batch order.

    c = load_constitution("constitutions/default.yaml")
    pair = c.sample_critique(seed=0, key="donotanswer:12", round=2)
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from cai_ray.config import read_yaml_mapping
from cai_ray.configschema import Problem, ValidationError, build, non_empty, option, to_dict

Aspect = Literal["harmless", "helpful"]
ASPECTS: tuple[str, ...] = ("harmless", "helpful")
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _valid_id(v: object) -> str | None:
    if v is None or (isinstance(v, str) and _ID.match(v)):
        return None
    return f"must be lowercase letters, digits, '-', '_' or '.', got {v!r}"


@dataclass(frozen=True)
class CritiqueRevision:
    id: str = option(help="unique id", check=_valid_id)
    critique: str = option(help="critique request put to the model", check=non_empty)
    revision: str = option(help="paired revision request", check=non_empty)


@dataclass(frozen=True)
class ComparisonPrinciple:
    id: str = option(help="unique id", check=_valid_id)
    aspect: Aspect = option(help="what the comparison judges")
    text: str = option(help="the question put to the feedback model", check=non_empty)


@dataclass(frozen=True)
class CritiqueExample:
    prompt: str = option(help="the human's request", check=non_empty)
    response: str = option(help="the first answer", check=non_empty)
    critique_request: str = option(help="critique request", check=non_empty)
    critique: str = option(help="the model's critique", check=non_empty)
    revision_request: str = option(help="revision request", check=non_empty)
    revision: str = option(help="the revised answer", check=non_empty)


@dataclass(frozen=True)
class ComparisonExample:
    prompt: str = option(help="the human's request", check=non_empty)
    response_a: str = option(help="option (A)", check=non_empty)
    response_b: str = option(help="option (B)", check=non_empty)
    aspect: Aspect = option(help="a principle of this aspect is sampled for the example")
    answer: Literal["A", "B"] = option(help="the better option")


@dataclass(frozen=True)
class CotComparisonExample:
    prompt: str = option(help="the human's request", check=non_empty)
    response_a: str = option(help="option (A)", check=non_empty)
    response_b: str = option(help="option (B)", check=non_empty)
    aspect: Aspect = option(help="a principle of this aspect is sampled for the example")
    reasoning: str = option(help="step-by-step reasoning, without the final letter",
                            check=non_empty)
    answer: Literal["A", "B"] = option(help="the better option")


@dataclass
class FewShot:
    critique_revision: list[CritiqueExample] = option(factory=list, help="critique examples")
    comparison: list[ComparisonExample] = option(factory=list, help="labelling examples")
    cot_comparison: list[CotComparisonExample] = option(factory=list, help="CoT examples")


@dataclass
class Constitution:
    name: str = option("unnamed", "name of the principle set", non_empty)
    description: str = option("", "what the set is for")
    critique_revision: list[CritiqueRevision] = option(factory=list, help="SL-CAI pairs")
    comparison: list[ComparisonPrinciple] = option(factory=list, help="feedback principles")
    few_shot: FewShot = option(factory=FewShot, help="few-shot examples")

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for key in ("critique_revision", "comparison"):
            first: dict[str, int] = {}
            for i, item in enumerate(getattr(self, key) or []):
                if item is None or item.id is None:
                    continue
                if item.id in first:
                    out.append((f"{key}[{i}].id", f"duplicate id {item.id!r} "
                                f"(first at {key}[{first[item.id]}])"))
                else:
                    first[item.id] = i
        if not (self.critique_revision or self.comparison):
            out.append(("", "no principles: add critique_revision pairs and/or comparison "
                        "principles"))
        return out

    # --- queries and sampling -----------------------------------------------------------------

    def principles(self, aspect: str) -> list[ComparisonPrinciple]:
        return [p for p in self.comparison if p.aspect == aspect]

    def sample_critique(self, seed: int, key: str, round: int) -> CritiqueRevision:
        """The pair used for `key` (a prompt id) at `round`: independent per round, with
        replacement, reproducible from (seed, key, round) alone."""
        if not self.critique_revision:
            raise ValueError(f"constitution {self.name!r} has no critique_revision pairs")
        rng = random.Random(f"critique|{seed}|{key}|{round}")
        return rng.choice(self.critique_revision)

    def sample_comparison(self, seed: int, key: str, aspect: str, k: int = 1,
                          weights: Mapping[str, float] | None = None
                          ) -> list[ComparisonPrinciple]:
        """`k` principles of `aspect` for comparison `key`, drawn with replacement; `weights`
        (by principle id, the rest 1) makes some likelier. Equal weights draw exactly as none."""
        pool = self.principles(aspect)
        if not pool:
            raise ValueError(f"constitution {self.name!r} has no {aspect!r} comparison "
                             "principles")
        rng = random.Random(f"compare|{seed}|{key}|{aspect}")
        w = [float((weights or {}).get(p.id, 1.0)) for p in pool]
        if len(set(w)) == 1:
            return [rng.choice(pool) for _ in range(k)]
        if not sum(w) > 0:
            raise ValueError(f"every {aspect!r} principle of {self.name!r} weighs 0")
        return rng.choices(pool, weights=w, k=k)

    def weight_problems(self, weights: Mapping[str, float]) -> list[str]:
        """What is wrong with principle weights for this constitution (unknown ids, an aspect
        left with no weight)."""
        ids = {p.id for p in self.comparison}
        out = [f"no comparison principle {k!r} in constitution {self.name!r} (it has: "
               f"{', '.join(sorted(ids))})" for k in weights if k not in ids]
        for aspect in sorted({p.aspect for p in self.comparison}):
            if not any(weights.get(p.id, 1.0) > 0 for p in self.principles(aspect)):
                out.append(f"every {aspect!r} principle weighs 0")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False, allow_unicode=True, width=100)


def parse_constitution(data: object, source: str) -> Constitution:
    """Validate an already-parsed mapping; raise ValidationError naming every problem."""
    problems: list[Problem] = []
    c: Constitution = build(Constitution, data, "", problems, lambda _p: source)
    if problems:
        raise ValidationError(f"invalid constitution {source}", problems)
    return c


def load_constitution(path: str | Path) -> Constitution:
    problems: list[Problem] = []
    data = read_yaml_mapping(Path(path), problems)
    if problems:
        raise ValidationError(f"invalid constitution {path}", problems)
    return parse_constitution(data, str(path))


def summary(c: Constitution) -> str:
    fs = c.few_shot
    return (f"{c.name}: {len(c.critique_revision)} critique/revision pairs, "
            f"{len(c.principles('harmless'))} harmless + {len(c.principles('helpful'))} helpful "
            f"comparison principles, few-shot {len(fs.critique_revision)} critique / "
            f"{len(fs.comparison)} comparison / {len(fs.cot_comparison)} CoT")


# --- rendering: SL-CAI conversations --------------------------------------------------------------

def _example_turns(ex: CritiqueExample, direct: bool) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]
    if not direct:
        turns += [{"role": "user", "content": ex.critique_request},
                  {"role": "assistant", "content": ex.critique}]
    return turns + [{"role": "user", "content": ex.revision_request},
                    {"role": "assistant", "content": ex.revision}]


def critique_conversation(c: Constitution, prompt: list[dict[str, str]], response: str,
                          pair: CritiqueRevision, few_shot: int) -> list[dict[str, str]]:
    """Few-shot examples, then the conversation and its latest answer, then the critique request.

    The examples come first as earlier turns of the same chat: small models otherwise confuse
    their point of view and write a revision when a critique is due."""
    turns: list[dict[str, str]] = []
    for ex in c.few_shot.critique_revision[:few_shot]:
        turns += _example_turns(ex, direct=False)
    return turns + list(prompt) + [{"role": "assistant", "content": response},
                                   {"role": "user", "content": pair.critique}]


def revision_conversation(c: Constitution, prompt: list[dict[str, str]], response: str,
                          pair: CritiqueRevision, critique: str | None, few_shot: int
                          ) -> list[dict[str, str]]:
    """The revision request after the critique, or directly after the answer when `critique`
    is None (the direct-revision ablation)."""
    direct = critique is None
    turns: list[dict[str, str]] = []
    for ex in c.few_shot.critique_revision[:few_shot]:
        turns += _example_turns(ex, direct=direct)
    turns += list(prompt) + [{"role": "assistant", "content": response}]
    if not direct:
        turns += [{"role": "user", "content": pair.critique},
                  {"role": "assistant", "content": critique or ""}]
    return turns + [{"role": "user", "content": pair.revision}]
