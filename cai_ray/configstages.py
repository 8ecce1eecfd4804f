"""The run configuration's stage sections: SL-CAI, PPO, DPO, what the pipeline runs, and red-team
prompt generation. Part of the schema in `cai_ray.config`, which imports them (import them from
there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cai_ray.configschema import in_range, non_negative, option, positive


@dataclass
class SLConfig:
    rounds: int = option(4, "critique→revision rounds per prompt (paper: 4)", positive)
    direct_revision: bool = option(False, "ask for the revision without a critique (ablation)")
    reviser: Literal["policy", "feedback"] = option(
        "policy", "who writes the critiques and revisions: the policy itself (the paper), or the "
        "feedback model on its own engine (a deviation from the paper, for a policy too weak to "
        "critique itself); the initial answers are always the policy's")
    reviser_system: str | None = option(
        None, "with reviser=feedback: a system turn put before the reviser's critique and "
        "revision requests (e.g. to write only the new reply, and to decline harmful requests "
        "with a reason and a safe alternative rather than a bare refusal); null = none")
    few_shot: int = option(5, "few-shot critique/revision examples prepended (at most those "
                           "available)", non_negative)
    train_rounds: int | None = option(None, "SL-CAI-n: train on revisions up to round n; "
                                      "null = all rounds", positive)
    helpful_samples: int = option(2, "samples per helpfulness prompt (paper: 2)", non_negative)
    temperature: float | None = option(None, "null = rollout.sampling.temperature",
                                       non_negative)
    top_p: float | None = option(None, "nucleus mass for SL generation; null = "
                                 "rollout.sampling.top_p", in_range(0.0, 1.0, lo_open=True))
    top_k: int | None = option(None, "top-k for SL generation (0 = off); null = "
                               "rollout.sampling.top_k. On CPU vLLM sorts the whole vocabulary "
                               "for top_p but not for top_k alone (benchmarks/sampler_cost.py)",
                               non_negative)
    repetition_penalty: float | None = option(None, "repetition penalty for SL generation; "
                                              "null = rollout.sampling.repetition_penalty",
                                              positive)
    drop_truncated: bool = option(True, "leave out of finetuning the revisions (and helpful "
                                  "samples) cut off at max_new_tokens: trained with an EOS they "
                                  "would teach the model to stop mid-sentence")
    clean_revisions: bool = option(True, "strip a revision's preamble (\"Here is the revised "
                                   "reply:\"), echoed question and quotes before finetuning, and "
                                   "leave out revisions that speak about the revision instead "
                                   "of replying; the SL data keeps the raw text")
    drop_bare_refusals: bool = option(False, "leave out of finetuning the revisions that only "
                                      "decline (at most two sentences and 20 words with a "
                                      "first-person refusal): trained on, they make the policy "
                                      "evasive; the paper keeps them")
    drop_unrevised: bool = option(False, "leave out of finetuning the revisions that repeat the "
                                  "initial answer (difflib similarity >= 0.8): on a red-team "
                                  "prompt, the harmful answer taught as revised; the paper "
                                  "keeps them")
    max_new_tokens: int = option(256, "tokens per response, critique or revision", positive)
    shard_size: int = option(64, "prompts per resumable output shard", positive)
    epochs: int = option(1, "SFT passes over the revisions (paper: 1)", positive)

    def problems(self) -> list[tuple[str, str]]:
        if self.train_rounds is not None and self.train_rounds > self.rounds:
            return [("train_rounds", f"must be <= rounds ({self.rounds}), got {self.train_rounds}")]
        return []


@dataclass
class PPOConfig:
    steps: int = option(100, "PPO steps (one rollout batch each)", positive)
    rollout_batch_size: int = option(64, "prompts per step", positive)
    mini_batch_size: int = option(16, "sequences per optimizer step", positive)
    ppo_epochs: int = option(1, "passes over each batch (paper: 1)", positive)
    advantage: Literal["gae", "rloo", "grpo"] = option("gae", "GAE with a value head, or a "
                                                       "critic-free estimator")
    samples_per_prompt: int = option(1, "responses per prompt (rloo/grpo need >= 2)", positive)
    kl_coef: float = option(0.001, "β of the KL penalty to the initial policy (HH: 0.001)",
                            non_negative)
    kl_estimator: Literal["k1", "k3"] = option("k1", "per-token KL estimator of the reward's "
                                               "penalty (kl_penalty=loss always uses k3)")
    kl_penalty: Literal["reward", "loss"] = option(
        "reward", "where β·KL goes: subtracted from the reward (the paper's PPO), or added to "
        "the policy loss per token with the k3 estimator (GRPO's form, TRL's `beta`)")
    adaptive_kl: bool = option(False, "adapt β towards target_kl")
    target_kl: float = option(6.0, "target KL for the adaptive controller", positive)
    gamma: float = option(1.0, "discount (paper: 1)", in_range(0.0, 1.0))
    lam: float = option(0.95, "GAE λ", in_range(0.0, 1.0))
    clip_eps: float = option(0.2, "policy ratio clip ε (paper: 0.2)", in_range(0.0, 1.0, True))
    value_clip: float = option(0.2, "value clip range", positive)
    value_coef: float = option(0.5, "value-loss weight", non_negative)
    entropy_coef: float = option(0.0, "entropy bonus (paper: none)", non_negative)
    whiten_advantages: bool = option(True, "normalise advantages per batch")
    max_staleness: int = option(1, "weight versions a training batch may lag (0 = synchronous)",
                                non_negative)
    checkpoint_every: int = option(10, "steps between checkpoints", positive)
    keep_checkpoints: int = option(2, "checkpoints kept on disk", positive)
    eval_every: int = option(0, "steps between live PM-Elo evaluations and the policy "
                             "snapshots `cai-ray eval` rates (ppo@STEP); 0 = off", non_negative)
    critic_lr: float | None = option(None, "value model learning rate; null = trainer.lr",
                                     positive)
    reward_model: str | None = option(None, "trained preference model directory; null = "
                                      "DIR/rm/model of this run")
    weight_sync: Literal["auto", "object_store", "collective"] = option(
        "auto", "trainer→rollout weight transport: object_store (Ray's, in buckets) or "
        "collective (a broadcast group of trainer rank 0 and the engines: NCCL on GPU, gloo on "
        "CPU); auto: collective on GPU where no two of its ranks share a GPU, else object_store")
    sync_bucket_mb: float = option(64.0, "object-store weight-sync bucket size (MiB)", positive)
    sync_tolerance: float | None = option(
        None, "largest allowed |vLLM − trainer| log-prob on the probe after a sync; null = "
        "1e-3 when both run float32, else 4× the noise floor measured before the first update "
        "(the engine's weight audit checks every module exactly in any dtype besides)",
        positive)
    staleness_correction: Literal["truncated_is", "none"] = option(
        "truncated_is", "a batch sampled by older weights (max_staleness > 0) is reweighted "
        "per token by min(p_trainer / p_sampler, is_cap), from the engine's own log-probs")
    is_cap: float = option(2.0, "truncation of the staleness importance weights", positive)
    truncated_penalty: float = option(
        1.0, "subtracted from the PM score of a response cut off at max_new_tokens (scored "
        "as it is, without an EOS it never produced); 0 = no penalty", non_negative)

    @property
    def single_update(self) -> bool:
        """One optimizer step per batch with no critic and the KL in the loss: the "old"
        log-probs are the weights being trained, so the separate forward pass that would
        compute them is skipped (ρ = 1 exactly, the gradient unchanged)."""
        return (self.ppo_epochs == 1 and self.advantage != "gae" and self.kl_penalty == "loss"
                and self.mini_batch_size == self.rollout_batch_size * self.samples_per_prompt)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mini_batch_size > self.rollout_batch_size * self.samples_per_prompt:
            out.append(("mini_batch_size", "must be <= rollout_batch_size × samples_per_prompt "
                        f"({self.rollout_batch_size * self.samples_per_prompt})"))
        if self.kl_penalty == "loss" and self.advantage == "gae":
            out.append(("kl_penalty", "kl_penalty=loss is for the critic-free estimators (rloo, "
                        "grpo); GAE takes the KL as a per-token reward"))
        if self.advantage in ("rloo", "grpo") and self.samples_per_prompt < 2:
            out.append(("samples_per_prompt", f"advantage={self.advantage} needs >= 2 samples "
                        f"per prompt, got {self.samples_per_prompt}"))
        return out


@dataclass
class DPOConfig:
    beta: float = option(0.1, "β: the implicit reward is β·(log π − log π_ref) (DPO paper: 0.1)",
                         positive)
    loss: Literal["soft", "hard", "ipo"] = option(
        "soft", "soft: cross-entropy with the AI label's p(A) (conservative DPO with the "
        "label's own confidence); hard: the label rounded to its side, smoothed by "
        "label_smoothing (cDPO); ipo: IPO's squared loss with a soft target margin")
    label_smoothing: float = option(0.0, "ε of loss=hard: target 1 − ε on the preferred side",
                                    in_range(0.0, 0.5, hi_open=True))
    epochs: int = option(1, "passes over the comparisons", positive)
    micro_batch_size: int = option(2, "comparisons per micro-batch per rank (2 sequences each)",
                                   positive)
    eval_fraction: float = option(0.1, "held-out share for the implicit reward's accuracy",
                                  in_range(0.0, 1.0, hi_open=True))
    lr: float | None = option(None, "learning rate; null = trainer.lr", positive)


@dataclass
class PipelineConfig:
    rl: Literal["ppo", "dpo", "online_dpo"] = option(
        "ppo", "the RL-CAI stage of `cai-ray pipeline`: ppo (label → rm → ppo), dpo (label → "
        "dpo on the comparisons, no preference model) or online_dpo (the judge labels fresh "
        "policy samples in the loop: no label stage, no PM)")


@dataclass
class RedteamConfig:
    few_shot: int = option(5, "seed red-team prompts shown in each generation request (a "
                           "fresh random draw per request, for diversity)", positive)
    temperature: float = option(1.0, "sampling temperature of the generator", positive)
    top_p: float = option(0.95, "nucleus mass of the generator",
                          in_range(0.0, 1.0, lo_open=True))
    max_new_tokens: int = option(64, "tokens per generated prompt", positive)
    batch_size: int = option(32, "generation requests per round", positive)
    max_rounds: int = option(50, "rounds before giving up short of --num", positive)
    min_words: int = option(4, "shortest prompt kept, in words", positive)
    max_words: int = option(60, "longest prompt kept, in words", positive)
    min_latin_share: float = option(
        0.9, "share of the letters that must be Latin-script (a script check, not a language "
        "identifier: it drops prompts in other scripts and mixed-script noise)",
        in_range(0.0, 1.0))
    near_duplicate: float = option(
        0.5, "a prompt whose word-trigram Jaccard similarity with a seed or a kept prompt "
        "reaches this is a near-duplicate and dropped", in_range(0.0, 1.0, lo_open=True))

    def problems(self) -> list[tuple[str, str]]:
        if self.min_words > self.max_words:
            return [("min_words", f"must be <= max_words ({self.max_words})")]
        return []
