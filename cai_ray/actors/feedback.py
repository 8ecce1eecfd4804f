"""Feedback role: a vLLM engine that turns a multiple-choice prompt into p(A).

How p(A) is read, robustly across tokenizers: the prompt is tokenised with each option appended
(" (A)" and " (B)"), the longest common token prefix becomes the context, and the first tokens
where the two differ (tA, tB; e.g. "A" and "B" after a shared " (", or whole " (A" tokens in
tokenizers that merge them) are the choice. One request per judgement asks the engine for the
next token restricted to {tA, tB} (`allowed_token_ids`) with log-probs in "processed" mode, i.e.
renormalised over the two: p(A) = P(tA) / (P(tA) + P(tB)) from a single prefill at the last
position. No `prompt_logprobs` (a full-vocabulary softmax at every position, and it bypasses the
prefix cache), so both orders and every principle of a comparison share the cached prefix.
"""

from __future__ import annotations

import math
from typing import Any

from cai_ray.actors.group import ActorGroup, WorkerContext
from cai_ray.actors.rollout import RolloutWorker, vllm_env
from cai_ray.config import Config, EngineConfig, ModelSpec
from cai_ray.labelling import (
    COT_ANSWER_CUE,
    OPTION_A,
    OPTION_B,
    JudgeQuery,
    Labeller,
    conversation,
    plain_text,
)
from cai_ray.runtime import device_of, request_seed, role_group


class FeedbackWorker(RolloutWorker):
    def __init__(self, ctx: WorkerContext, model: ModelSpec, engine: EngineConfig,
                 device: str = "auto", seed: int = 0, chat_template: bool = True):
        self.chat_template = chat_template
        super().__init__(ctx, model, engine, device, seed)

    def extra_engine_args(self) -> dict[str, Any]:
        return {"logprobs_mode": "processed_logprobs"}

    def set_chat_template(self, on: bool) -> bool:
        """Switch between the chat form and the paper's plain text (to compare them on one
        engine); returns the previous setting."""
        previous, self.chat_template = self.chat_template, on
        return previous

    def context_text(self, q: JudgeQuery) -> str:
        if not self.chat_template:
            return plain_text(q)
        return str(self.tokenizer.apply_chat_template(conversation(q), tokenize=False,
                                                      continue_final_message=True))

    def choice_tokens(self, text: str) -> tuple[list[int], int, int]:
        """(context ids, token of option A, token of option B): see the module docstring."""
        enc = self.tokenizer.encode
        a = enc(text + OPTION_A, add_special_tokens=False)
        b = enc(text + OPTION_B, add_special_tokens=False)
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        if k == len(a) or k == len(b):
            raise ValueError(f"options {OPTION_A!r} and {OPTION_B!r} tokenise identically")
        return a[:k], a[k], b[k]

    def choice_probs(self, queries: list[JudgeQuery]) -> list[float]:
        """p(A) for each judgement, in order."""
        from vllm import SamplingParams, TokensPrompt

        if not queries:
            return []
        prompts, params, pairs = [], [], []
        for q in queries:
            ctx, ta, tb = self.choice_tokens(self.context_text(q))
            prompts.append(TokensPrompt(prompt_token_ids=ctx))
            params.append(SamplingParams(max_tokens=1, temperature=1.0, allowed_token_ids=[ta, tb],
                                         logprobs=2))
            pairs.append((ta, tb))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        probs = []
        for (ta, tb), out in zip(pairs, outs, strict=True):
            lp = out.outputs[0].logprobs[0]
            la = lp[ta].logprob if ta in lp else -math.inf
            lb = lp[tb].logprob if tb in lp else -math.inf
            m = max(la, lb)
            probs.append(math.exp(la - m) / (math.exp(la - m) + math.exp(lb - m)))
        return probs

    def reasoning(self, queries: list[JudgeQuery], max_tokens: int, temperature: float,
                  seeds: list[int]) -> list[str]:
        """CoT: sample the step-by-step reasoning that follows each query's cue."""
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=self.tokenizer.encode(
            self.context_text(q), add_special_tokens=False)) for q in queries]
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s,
                                 stop=[COT_ANSWER_CUE, "\n\n"]) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]


def feedback_group(cfg: Config) -> ActorGroup[FeedbackWorker]:
    device = device_of(cfg)
    return role_group(cfg, "feedback", FeedbackWorker,
                      (cfg.feedback.model or cfg.model, cfg.feedback.engine, device,
                       cfg.run.seed, cfg.feedback.chat_template),
                      vllm_env(cfg.feedback.engine, device, cfg.placement.feedback.threads))


def judge(group: ActorGroup[FeedbackWorker], lab: Labeller, queries: list[JudgeQuery]
          ) -> list[float]:
    """p(A) of every query; a feedback actor that dies is restarted (it holds no state but
    its model) and the call is made again, up to run.max_restarts."""
    f = lab.f
    budget = lab.cfg.run.max_restarts
    if f.method == "cot":
        seeds = [request_seed(lab.cfg.run.seed, q.query_id, "cot") for q in queries]
        reasons = group.with_restarts(lambda: group.shard_and_gather(
            FeedbackWorker.reasoning, queries, f.cot_max_tokens, f.cot_temperature, seeds),
            budget)
        queries = [JudgeQuery(q.query_id, q.question, q.shots, True, r or "...")
                   for q, r in zip(queries, reasons, strict=True)]
    return group.with_restarts(
        lambda: group.shard_and_gather(FeedbackWorker.choice_probs, queries), budget)
