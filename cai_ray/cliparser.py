"""The `cai-ray` argument parser: every subcommand, its arguments and their help (the commands
themselves are in `cli.py`)."""

from __future__ import annotations

import argparse


def _add_run_args(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--config", "-c", help="named YAML config (e.g. configs/cpu-smollm.yaml); "
                   "class defaults when omitted")
    if output:
        p.add_argument("--output", "-o", required=True, help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override any config key, e.g. ppo.steps=10 rollout.engine.dtype=float32")


def _add_comparisons_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comparisons", help="JSONL (prompt or messages, response_a, response_b, "
                   "p_a, aspect) or a saved dataset; default DIR/label/comparisons")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cai-ray", description="Constitutional AI (SL-CAI and "
                                 "RL from AI Feedback) on Ray, vLLM and DeepSpeed.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a config and print it resolved")
    _add_run_args(p, output=False)

    p = sub.add_parser("keys", help="list config keys with type, default and help")
    p.add_argument("section", nargs="?", help="only keys under this section (e.g. ppo)")

    p = sub.add_parser("constitution", help="validate or import principle sets")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    cv = csub.add_parser("validate", help="check a constitution YAML file")
    cv.add_argument("file")
    ci = csub.add_parser("import", help="convert a published format into this project's YAML")
    ci.add_argument("--format", "-f", required=True, choices=["anthropic", "hf"],
                    help="anthropic: the CAI paper repository's JSON (critique/revision mapping "
                    "and/or comparison list); hf: llm-swarm JSON")
    ci.add_argument("files", nargs="+", metavar="FILE")
    ci.add_argument("--output", "-o", required=True, help="YAML file to write")

    p = sub.add_parser("models", help="built-in models")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    mp = msub.add_parser("prepare", help="build a built-in model into the cache")
    mp.add_argument("name")
    mp.add_argument("--force", action="store_true", help="rebuild even if cached")
    msub.add_parser("list", help="list built-in models and whether they are prepared")

    p = sub.add_parser("sl", help="SL-CAI: critique→revision generation, then finetuning")
    _add_run_args(p)
    p.add_argument("--prompts", help="JSONL file with a 'prompt' field per line; replaces the "
                   "configured red-team source")
    p.add_argument("--step", choices=["generate", "train"], help="run one step only "
                   "(default: both; finished steps are skipped, interrupted ones resume)")

    p = sub.add_parser("label", help="RL-CAI: response pairs from the policy, soft labels "
                       "from the feedback model")
    _add_run_args(p)
    p.add_argument("--pairs", help="JSONL with prompt, response_a, response_b per line: label "
                   "these instead of sampling pairs from the policy")

    p = sub.add_parser("judge-check", help="measure the feedback model on labelled pairwise "
                       "sets (accuracy with 95%% interval, ECE, order disagreement per set), "
                       "labelling nothing; writes DIR/label/judge_check.json")
    _add_run_args(p)
    p.add_argument("--sets", help="comma-separated built-in sets (harmless, evasive, helpful, "
                   "hhh-dev) or JSONL files; default feedback.check_sets")
    p.add_argument("--limit", type=int, help="comparisons per set (default feedback.check_limit)")

    p = sub.add_parser("rm", help="RL-CAI: train the preference model on the comparisons")
    _add_run_args(p)
    _add_comparisons_arg(p)

    p = sub.add_parser("redteam", help="grow the red-team set: few-shot prompt the policy "
                       "model with data.red_team's prompts, keep new, de-duplicated ones")
    _add_run_args(p)
    p.add_argument("--num", type=int, required=True, help="prompts to generate (written to "
                   "DIR/redteam/prompts, which data.red_team.name accepts)")

    p = sub.add_parser("dpo", help="RL-CAI without a preference model: DPO of the policy on "
                       "the AI-labelled comparisons (soft labels, frozen reference, DeepSpeed)")
    _add_run_args(p)
    _add_comparisons_arg(p)

    p = sub.add_parser("online-dpo", help="RL-CAI: online DPO, the feedback model labelling "
                       "fresh policy samples in the loop (no PM, no critic; PPO's streaming "
                       "driver, weight sync, checkpoints)")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest "
                   "checkpoint under DIR/online_dpo/checkpoints")

    p = sub.add_parser("ppo", help="RL-CAI: PPO of the policy against the preference model "
                       "(vLLM rollouts, PM rewards, reference KL, DeepSpeed trainer)")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest "
                   "checkpoint under DIR/ppo/checkpoints (a fresh start when there is none)")

    p = sub.add_parser("eval", help="Elo proxies of harmlessness and helpfulness for policy "
                       "snapshots (AI judge and PM), evasiveness, over-refusal, harm")
    _add_run_args(p)
    p.add_argument("--snapshots", help="comma-separated: initial, sl, ppo, ppo@STEP or "
                   "NAME=DIR (default eval.snapshots, plus the saved ppo@STEP ones)")

    p = sub.add_parser("serve", help="HTTP services for other jobs: PM scores (/v1/score) and "
                       "AI-judge soft labels (/v1/judge); bearer token from serve.token_env")
    _add_run_args(p)
    p.add_argument("--what", default="pm,judge", help="comma-separated: pm, judge")
    p.add_argument("--pm", help="trained PM directory (default DIR/rm/model)")

    p = sub.add_parser("plan", help="print which role lands on which placement bundle and "
                       "the GPU memory each will hold; refuse an impossible layout")
    _add_run_args(p, output=False)
    p.add_argument("--gpus", type=int, help="GPUs in the cluster (default: the running "
                   "cluster's with run.ray_address, else this machine's)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU "
                   "(default 80)")

    p = sub.add_parser("report", help="write DIR/report.html with PNG plots of a run")
    p.add_argument("run_dir", metavar="DIR")

    p = sub.add_parser("pipeline", help="every stage in order (sl → label → rm → ppo → eval → "
                       "report; pipeline.rl=dpo: dpo for rm → ppo; online_dpo: online DPO "
                       "for label → rm → ppo), each skipped when its finished output exists "
                       "and resumed "
                       "when interrupted")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="let the PPO stage continue from its "
                   "newest checkpoint (the other stages always resume by shard)")

    p = sub.add_parser("sample", help="answer red-team prompts with the policy through the "
                       "rollout group (vLLM on Ray)")
    _add_run_args(p)
    p.add_argument("--num-prompts", type=int, default=8, help="prompts to answer (default 8)")
    return ap
