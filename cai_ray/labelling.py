"""AI-feedback prompts and soft labels: pure functions, no engine.

The feedback model sees the paper's multiple-choice prompt (conversation, principle, options,
"The answer is:") and the label is p(A) = P(A) / (P(A) + P(B)) from its next-token
probabilities. Few-shot examples come first, each under its own sampled principle.
`principle_position="after"` puts the principle after the options, so that with several
principles per comparison the conversation *and* both responses are a shared prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cai_ray.config import Config
from cai_ray.constitution import (
    ComparisonExample,
    ComparisonPrinciple,
    Constitution,
    CotComparisonExample,
)
from cai_ray.messages import ChatMessage

OPTION_A, OPTION_B = " (A)", " (B)"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step-by-step:"
COT_ANSWER_CUE = "So the answer is:"


def transcript(conversation: Sequence[ChatMessage]) -> str:
    """Human/Assistant transcript of a chat (system turns folded into the first human turn)."""
    lines, system = [], ""
    for m in conversation:
        if m["role"] == "system":
            system = m["content"] + "\n"
            continue
        who = "Human" if m["role"] == "user" else "Assistant"
        lines.append(f"{who}: {system}{m['content']}")
        system = ""
    return "\n\n".join(lines)


def question(conversation: Sequence[ChatMessage], principle: str, response_a: str,
             response_b: str, position: str = "before") -> str:
    """The multiple-choice block without its answer cue."""
    head = ("Consider the following conversation between a human and an assistant:\n"
            f"{transcript(conversation)}\n")
    options = f"Options:\n(A) {response_a}\n(B) {response_b}\n"
    return head + (f"{principle}\n{options}" if position == "before"
                   else f"{options}{principle}\n")


@dataclass(frozen=True)
class Shot:
    """A rendered few-shot example: its question, optional reasoning and the answer letter."""

    question: str
    answer: str  # "A" | "B"
    reasoning: str | None = None


def render_shots(examples: Sequence[ComparisonExample | CotComparisonExample],
                 principles: Sequence[str], position: str) -> list[Shot]:
    """One principle per example (sampled by the caller), in the same layout as the query."""
    out = []
    for ex, principle in zip(examples, principles, strict=True):
        q = question([{"role": "user", "content": ex.prompt}], principle, ex.response_a,
                     ex.response_b, position)
        out.append(Shot(q, ex.answer, getattr(ex, "reasoning", None)))
    return out


def prompt_text(shots: Sequence[Shot], query: str, cot_reasoning: str | None = None,
                cot: bool = False) -> str:
    """Plain-text prompt ending in the answer cue (the paper's format for a pretrained LM).

    cot=True with no reasoning yet ends in the step-by-step cue, for sampling the reasoning;
    with `cot_reasoning` it ends in "So the answer is:" for reading the option probabilities."""
    parts = []
    for s in shots:
        if s.reasoning is not None:
            parts.append(f"{s.question}{COT_CUE} {s.reasoning}\n{COT_ANSWER_CUE} ({s.answer})")
        else:
            parts.append(f"{s.question}{ANSWER_CUE} ({s.answer})")
    if not cot:
        tail = f"{query}{ANSWER_CUE}"
    elif cot_reasoning is None:
        tail = f"{query}{COT_CUE}"
    else:
        tail = f"{query}{COT_CUE} {cot_reasoning.strip()}\n{COT_ANSWER_CUE}"
    return "\n\n".join(parts + [tail])


def combine_orders(p_a_first: float, p_a_second: float) -> float:
    """p(A) from both orders: the second order showed A as option (B), so its p(A-option)
    is the probability of B; averaging cancels a constant position bias."""
    return 0.5 * (p_a_first + (1.0 - p_a_second))


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def combine_orders_logit(p_a_first: float, p_a_second: float, eps: float = 1e-6) -> float:
    """p(A) from both orders, in log-odds: sigmoid((logit p1 - logit p2') / 2) with p2' the
    second order's p(A-option). A position prior b adds to both logits and cancels exactly, so
    this is content-free calibration (divide out the judge's p(A) on empty options) with no
    extra request: the prior's logit drops out of the difference."""
    return sigmoid(0.5 * (logit(p_a_first, eps) - logit(p_a_second, eps)))


def clamp(p: float, lo: float, hi: float) -> float:
    """CoT probabilities sit near 0 or 1; the paper clamps them (to [0.4, 0.6])."""
    return min(max(p, lo), hi)


@dataclass(frozen=True)
class JudgeQuery:
    """One multiple-choice judgement to put to the feedback model."""

    query_id: str
    question: str  # from `question(...)`: conversation, principle and options, no cue
    shots: tuple[Shot, ...] = ()
    cot: bool = False
    reasoning: str | None = None  # CoT: the sampled reasoning, once there is one


def _answer_turn(s: Shot) -> str:
    if s.reasoning is not None:
        return f"{COT_CUE} {s.reasoning}\n{COT_ANSWER_CUE} ({s.answer})"
    return f"{ANSWER_CUE} ({s.answer})"


def _cue(q: JudgeQuery) -> str:
    if not q.cot:
        return ANSWER_CUE
    if q.reasoning is None:
        return COT_CUE
    return f"{COT_CUE} {q.reasoning.strip()}\n{COT_ANSWER_CUE}"


def conversation(q: JudgeQuery) -> list[ChatMessage]:
    """Chat form for instruct judges: each shot a user turn and its answer; the query's
    assistant turn is left open on the cue (rendered with continue_final_message)."""
    turns: list[ChatMessage] = []
    for s in q.shots:
        turns += [{"role": "user", "content": s.question.rstrip()},
                  {"role": "assistant", "content": _answer_turn(s)}]
    return turns + [{"role": "user", "content": q.question.rstrip()},
                    {"role": "assistant", "content": _cue(q)}]


def plain_text(q: JudgeQuery) -> str:
    """The paper's plain-text form, for pretrained (non-chat) judges."""
    return prompt_text(q.shots, q.question, q.reasoning, q.cot)


# the per-answer questions of `feedback.harmless_labels: pointwise`, in the order each
# response is asked them (wordings in `cai_ray.verdicts.LABEL_QUESTIONS`)
POINTWISE_QUESTIONS = ("harmful", "evasive")


class Labeller:
    """Builds the judgements of a pair and folds their probabilities into one comparison.

    Pairwise (the paper): the conversation, both responses as options and a sampled principle,
    in both orders. Pointwise (`feedback.harmless_labels: pointwise`, harmlessness only): each
    response on its own, asked whether it helps with something harmful and whether it evades
    (both orders of yes/no); its badness is logit p(harm) + w * logit p(evades), and
    p(A) = sigmoid(badness(B) - badness(A)). With one order (`both_orders: false`) a position
    prior shifts both responses' logits alike and drops out of the difference."""

    def __init__(self, cfg: Config, constitution: Constitution):
        self.cfg, self.c, self.f = cfg, constitution, cfg.feedback

    def pointwise(self, aspect: str) -> bool:
        return self.f.harmless_labels == "pointwise" and aspect == "harmless"

    def principles(self, key: str, aspect: str) -> list[ComparisonPrinciple]:
        """The `feedback.num_principles` principles comparison `key` is judged under."""
        return self.c.sample_comparison(self.cfg.run.seed, key, aspect, self.f.num_principles,
                                        self.f.principle_weights)

    def queries(self, key: str, convo: list[dict[str, str]], a: str, b: str, aspect: str
                ) -> list[JudgeQuery]:
        if self.pointwise(aspect):
            return self._pointwise_queries(key, convo, a, b)
        f, seed = self.f, self.cfg.run.seed
        pool = [ex for ex in (self.c.few_shot.cot_comparison if f.method == "cot"
                              else self.c.few_shot.comparison) if ex.aspect == aspect]
        pool = pool[:f.few_shot]
        shot_principles = [self.c.sample_comparison(seed, f"{key}|shot{j}", aspect,
                                                   weights=f.principle_weights)[0].text
                           for j in range(len(pool))]
        shots = tuple(render_shots(pool, shot_principles, f.principle_position))
        out = []
        for k, pr in enumerate(self.principles(key, aspect)):
            orders = [(a, b), (b, a)] if f.both_orders else [(a, b)]
            for o, (x, y) in enumerate(orders):
                out.append(JudgeQuery(f"{key}|{k}|{o}", question(convo, pr.text, x, y,
                                                                  f.principle_position),
                                      shots, cot=f.method == "cot"))
        return out

    def _pointwise_queries(self, key: str, convo: list[dict[str, str]], a: str, b: str
                           ) -> list[JudgeQuery]:
        return (self._response_queries(f"{key}|a", convo, a)
                + self._response_queries(f"{key}|b", convo, b))

    def _response_queries(self, key: str, convo: list[dict[str, str]], response: str
                          ) -> list[JudgeQuery]:
        """The pointwise questions about one response, each in both orders (or the first)."""
        from cai_ray.verdicts import LABEL_QUESTIONS, single_queries

        out = []
        for name in POINTWISE_QUESTIONS:
            qs = single_queries(f"{key}|{name}", convo, response, LABEL_QUESTIONS[name])
            out += qs if self.f.both_orders else qs[:1]
        return out

    def badness(self, p_harm: float, p_evades: float) -> float:
        return logit(p_harm) + self.f.pointwise_evasive_weight * logit(p_evades)

    def _orders(self, probs: list[float]) -> tuple[list[float], bool]:
        """Per judgement, p(first option) with both orders folded (`feedback.order_combine`),
        and whether any pair of orders disagreed; with one order, the probabilities as they are."""
        if not self.f.both_orders:
            return list(probs), False
        firsts, seconds = probs[0::2], probs[1::2]
        both = combine_orders if self.f.order_combine == "mean" else combine_orders_logit
        per = [both(x, y) for x, y in zip(firsts, seconds, strict=True)]
        disagree = any((x > 0.5) != (y < 0.5) for x, y in zip(firsts, seconds, strict=True))
        return per, disagree

    def _fold_pointwise(self, probs: list[float]) -> tuple[float, bool]:
        want = 2 * len(POINTWISE_QUESTIONS) * (2 if self.f.both_orders else 1)
        if len(probs) != want:
            raise ValueError(f"a pointwise comparison has {want} judgements, got {len(probs)}")
        (bad_a, bad_b), dis = self._badnesses(probs, 2)
        return sigmoid(bad_b - bad_a), any(dis)

    def _badnesses(self, probs: list[float], n: int) -> tuple[list[float], list[bool]]:
        """Per response of n, its badness and whether its orders disagreed, from its pointwise
        judgements in query order (p(yes): each question asks yes as (A) first)."""
        per = len(probs) // n
        bad, dis = [], []
        for i in range(n):
            yes, d = self._orders(probs[i * per:(i + 1) * per])
            bad.append(self.badness(*yes))
            dis.append(d)
        return bad, dis

    def group_queries(self, key: str, convo: list[dict[str, str]], responses: Sequence[str],
                      aspect: str) -> list[JudgeQuery]:
        """The judgements of one prompt's N responses (N even), folded by `group_pairs`.

        Pointwise: every response's own questions (the cost grows with N, not with the pairs).
        Pairwise: the disjoint pairs (0, 1), (2, 3), ..., each under its own principles."""
        n = len(responses)
        if n < 2 or n % 2:
            raise ValueError(f"a group needs an even number >= 2 of responses, got {n}")
        if self.pointwise(aspect):
            return [q for i, r in enumerate(responses)
                    for q in self._response_queries(f"{key}|{_side(i)}", convo, r)]
        return [q for k in range(n // 2)
                for q in self.queries(key if k == 0 else f"{key}|pair{k}", convo,
                                      responses[2 * k], responses[2 * k + 1], aspect)]

    def group_pairs(self, probs: list[float], aspect: str, n: int
                    ) -> list[tuple[int, int, float, bool]]:
        """(i, j, p(i better than j), order disagreement) for the n/2 pairs of one group.

        Pointwise: the responses ranked by badness and paired outside-in, best against worst,
        then second best against second worst, ...: of N samples the first pair is the one
        most likely to differ in harm, where two samples of the same prompt mostly do not.
        Pairwise: the disjoint pairs as asked."""
        if self.pointwise(aspect):
            per = len(POINTWISE_QUESTIONS) * (2 if self.f.both_orders else 1)
            if len(probs) != per * n:
                raise ValueError(f"a pointwise group of {n} has {per * n} judgements, "
                                 f"got {len(probs)}")
            bad, dis = self._badnesses(probs, n)
            rank = sorted(range(n), key=lambda i: (bad[i], i))
            return [(rank[m], rank[n - 1 - m], sigmoid(bad[rank[n - 1 - m]] - bad[rank[m]]),
                     dis[rank[m]] or dis[rank[n - 1 - m]]) for m in range(n // 2)]
        if len(probs) % (n // 2):
            raise ValueError(f"a pairwise group of {n} has a multiple of {n // 2} judgements, "
                             f"got {len(probs)}")
        per = len(probs) // (n // 2)
        out = []
        for m in range(n // 2):
            p, d = self.fold(probs[m * per:(m + 1) * per], aspect)
            out.append((2 * m, 2 * m + 1, p, d))
        return out

    def fold(self, probs: list[float], aspect: str) -> tuple[float, bool]:
        """(p_a, order disagreement) from the probabilities of one pair's queries, in order."""
        if self.pointwise(aspect):
            return self._fold_pointwise(probs)
        if self.f.method == "cot":
            lo, hi = self.f.cot_clamp
            probs = [clamp(p, lo, hi) for p in probs]
        per, disagree = self._orders(probs)
        return sum(per) / len(per), disagree


def _side(i: int) -> str:
    """A group's i-th response in query ids: a, b, c, ... (a and b as in a pair's)."""
    return chr(ord("a") + i) if i < 26 else f"r{i}"
