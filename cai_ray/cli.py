"""`cai-ray` command line.

    cai-ray validate --config configs/cpu-smollm.yaml ppo.steps=10
    cai-ray keys [SECTION]                       # every config key with type, default and help
    cai-ray constitution validate constitutions/default.yaml
    cai-ray constitution import --format anthropic|hf FILE [FILE ...] -o OUT.yaml
    cai-ray models prepare smollm2
    cai-ray sample --config configs/cpu-smollm.yaml --output runs/demo [key=value ...]
    cai-ray sl --config configs/cpu-smollm.yaml --output runs/demo [--prompts F.jsonl]
    cai-ray label --config configs/cpu-smollm.yaml --output runs/demo [--pairs F.jsonl]
    cai-ray rm --config configs/cpu-smollm.yaml --output runs/demo [--comparisons F.jsonl]
    cai-ray pipeline --config configs/cpu-smollm.yaml --output runs/demo

Exit codes: 0 success, 2 invalid input (every problem listed, no traceback), 1 a failure while
running (one clear line; `--debug` shows the traceback), 130 interrupted.

Ctrl-C: the first SIGINT stops the running stage within seconds, also in the middle of a long
remote call: its actors are shut down, finished work stays on disk, and one line says how to
resume (the same command; `--resume` for ppo and pipeline). Should the clean-up hang, the process
exits anyway INTERRUPT_EXIT_S after the signal. A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_ray.cliparser import build_parser
from cai_ray.configschema import ValidationError
from cai_ray.interrupts import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # re-exported
from cai_ray.interrupts import INTERRUPT_EXIT_S as INTERRUPT_EXIT_S
from cai_ray.interrupts import InterruptHandler as InterruptHandler
from cai_ray.interrupts import interrupted_message as interrupted_message
from cai_ray.interrupts import resume_command as resume_command
from cai_ray.redaction import redact

log = logging.getLogger("cai_ray")

EXIT_INVALID = 2


def _not_held_out(cfg: Any) -> list[str]:
    """What keeps the eval's prompts from being held out from training, one line each, said
    on stderr before anything trains."""
    from cai_ray.stages.evaluate import not_held_out

    lines = [f"eval: {x}; its numbers will not be on held-out prompts" for x in not_held_out(cfg)]
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)
    return lines


def _cmd_validate(args: argparse.Namespace) -> int:
    from cai_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    print(f"# {args.config or 'defaults'}: valid", file=sys.stderr)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from cai_ray.config import Config
    from cai_ray.configschema import describe_fields

    rows = [r for r in describe_fields(Config)
            if not args.section or r[0].startswith(args.section + ".")]
    if not rows:
        print(f"no keys under {args.section!r}", file=sys.stderr)
        return EXIT_INVALID
    for key, tp, default, help_ in rows:
        print(f"{key} = {default}\n    {tp}. {help_}")
    return 0


def _cmd_constitution(args: argparse.Namespace) -> int:
    from cai_ray.constitution import load_constitution, summary

    if args.action == "validate":
        print(f"{args.file}: valid: {summary(load_constitution(args.file))}")
        return 0
    from cai_ray.constitution_import import import_constitution

    c = import_constitution(args.format, args.files)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(c.to_yaml(), encoding="utf-8")
    print(f"wrote {out}: {summary(c)}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cai_ray import models

    if args.action == "list":
        for name, (desc, _) in models.BUILTIN_MODELS.items():
            state = "prepared" if models.is_prepared(name) else "not prepared"
            print(f"{name:12s} {state:13s} {models.builtin_dir(name)}\n    {desc}")
        return 0
    if args.name not in models.BUILTIN_MODELS:
        print(f"unknown built-in model {args.name!r}; choose from "
              f"{', '.join(models.BUILTIN_MODELS)}", file=sys.stderr)
        return EXIT_INVALID
    print(models.prepare(args.name, force=args.force))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from cai_ray.config import load_config
    from cai_ray.hardware import resolve_dtypes
    from cai_ray.runtime import prepare_run_dir, setup_logging
    from cai_ray.stages.sample import run_sample

    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.run.log_level)
    resolve_dtypes(cfg)
    out = prepare_run_dir(cfg, args.output)
    stats = run_sample(cfg, out, args.num_prompts)
    print(f"{int(stats['prompts'])} responses ({stats['tokens_per_s']:.1f} tokens/s) in "
          f"{out / 'sample' / 'samples.jsonl'}")
    return 0


Stage = tuple[str, Callable[[], object]]


def _run_stages(args: argparse.Namespace, build: Callable[[Any, Path], list[Stage]],
                precheck: Callable[[], object] | None = None, evaluates: bool = False) -> int:
    """Load and check everything, then run the stages in one Ray session, timing each and
    reporting the peak RSS of the whole process tree (driver + Ray workers)."""
    from cai_ray.config import load_config
    from cai_ray.hardware import resolve_dtypes
    from cai_ray.resources import PeakRSS
    from cai_ray.runtime import check_shared_output, prepare_run_dir, ray_session, setup_logging

    cfg = load_config(args.config, args.overrides)
    if precheck is not None:
        precheck()  # bad input files are reported before anything starts
    setup_logging(cfg.run.log_level)
    resolve_dtypes(cfg)  # every `auto` dtype, once, before any actor starts; saved resolved
    out = prepare_run_dir(cfg, args.output)
    if evaluates:
        _not_held_out(cfg)  # now, not after hours of training
    times = {}
    with PeakRSS() as mem, ray_session(cfg):
        check_shared_output(out)  # a multi-node run on unshared storage stops here
        for name, fn in build(cfg, out):
            t0 = time.monotonic()
            log.info("=== stage %s ===", name)
            result = fn()
            times[name] = time.monotonic() - t0
            print(f"{name}: {result} ({times[name]:.0f} s)")
    print(f"done in {sum(times.values()):.0f} s, peak RSS {mem.peak_gib:.2f} GiB; outputs "
          f"under {out}")
    return 0


def _cmd_sl(args: argparse.Namespace) -> int:
    from cai_ray.stages.sl import check_prompt_file, run_generate
    from cai_ray.stages.sl_train import run_train

    def build(cfg: Any, out: Path) -> list[Stage]:
        stages: list[Stage] = []
        if args.step in (None, "generate"):
            stages.append(("sl/generate", lambda: run_generate(cfg, out, args.prompts)))
        if args.step in (None, "train"):
            stages.append(("sl/train", lambda: run_train(cfg, out)))
        return stages

    return _run_stages(args, build,
                       (lambda: check_prompt_file(args.prompts)) if args.prompts else None)


def _cmd_label(args: argparse.Namespace) -> int:
    from cai_ray.stages.label import read_pairs_file, run_label

    return _run_stages(args, lambda cfg, out: [("label", lambda: run_label(cfg, out,
                                                                          args.pairs))],
                       (lambda: read_pairs_file(args.pairs)) if args.pairs else None)


def _cmd_judge_check(args: argparse.Namespace) -> int:
    from cai_ray.judgecheck import load_set
    from cai_ray.stages.label import run_judge_check

    sets = [x.strip() for x in args.sets.split(",") if x.strip()] if args.sets else None

    def precheck() -> None:
        for name in sets or []:
            load_set(name)

    return _run_stages(args, lambda cfg, out: [("judge-check", lambda: run_judge_check(
        cfg, out, sets, args.limit))], precheck)


def _cmd_rm(args: argparse.Namespace) -> int:
    from cai_ray.comparisons import read_comparisons
    from cai_ray.stages.rm import run_rm

    src = args.comparisons
    return _run_stages(args, lambda cfg, out: [("rm", lambda: run_rm(cfg, out, src))],
                       (lambda: read_comparisons(Path(src), src)) if src else None)


def _cmd_redteam(args: argparse.Namespace) -> int:
    from cai_ray.configschema import Problem
    from cai_ray.stages.redteam import run_redteam

    def precheck() -> None:
        if args.num < 1:
            raise ValidationError("cai-ray redteam", [Problem(
                "--num", f"must be a positive number of prompts, got {args.num}",
                "command line")])

    return _run_stages(args, lambda cfg, out: [("redteam", lambda: run_redteam(
        cfg, out, args.num))], precheck)


def _cmd_dpo(args: argparse.Namespace) -> int:
    from cai_ray.comparisons import read_comparisons
    from cai_ray.stages.dpo import run_dpo

    src = args.comparisons
    return _run_stages(args, lambda cfg, out: [("dpo", lambda: run_dpo(cfg, out, src))],
                       (lambda: read_comparisons(Path(src), src)) if src else None)


def _cmd_online_dpo(args: argparse.Namespace) -> int:
    from cai_ray.stages.online_dpo import run_online_dpo

    return _run_stages(args, lambda cfg, out: [("online_dpo", lambda: run_online_dpo(
        cfg, out, args.resume))])


def _cmd_ppo(args: argparse.Namespace) -> int:
    from cai_ray.stages.ppo import run_ppo

    return _run_stages(args, lambda cfg, out: [("ppo", lambda: run_ppo(cfg, out, args.resume))])


def _cmd_eval(args: argparse.Namespace) -> int:
    from cai_ray.stages.evaluate import run_eval

    snaps = [s.strip() for s in args.snapshots.split(",") if s.strip()] \
        if args.snapshots else None
    return _run_stages(args, lambda cfg, out: [("eval", lambda: run_eval(cfg, out, snaps))])


def _cmd_serve(args: argparse.Namespace) -> int:
    from cai_ray.config import ModelSpec, load_config
    from cai_ray.configschema import Problem
    from cai_ray.hardware import resolve_dtypes
    from cai_ray.runtime import ray_session, setup_logging
    from cai_ray.serve import Service, judge_handler, pm_handler, token_from_env

    cfg = load_config(args.config, args.overrides)
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    if not what or what - {"pm", "judge"}:
        raise ValidationError("cai-ray serve", [Problem(
            "--what", f"choose from pm, judge; got {args.what!r}", "command line")])
    token = token_from_env(cfg.serve)
    if not token:
        raise ValidationError("cai-ray serve", [Problem(
            "serve.token_env", f"set {cfg.serve.token_env} to the bearer token clients must "
            "send", "environment")])
    pm = Path(args.pm) if args.pm else Path(args.output) / "rm" / "model"
    if "pm" in what and not (pm / "config.json").exists():
        raise ValidationError("cai-ray serve", [Problem(
            "--pm", f"no trained preference model at {pm}", "command line")])
    setup_logging(cfg.run.log_level)
    resolve_dtypes(cfg)
    with ray_session(cfg):
        handlers, groups = {}, []
        try:
            if "pm" in what:
                from cai_ray.actors.reward import reward_group

                g = reward_group(cfg, ModelSpec(path=str(pm), dtype=cfg.trainer.dtype), None)
                groups.append(g)
                handlers["/v1/score"] = pm_handler(g, cfg.run.max_restarts)
            if "judge" in what:
                from cai_ray.actors.feedback import feedback_group
                from cai_ray.constitution import load_constitution
                from cai_ray.labelling import Labeller
                from cai_ray.preflight import resolve_path

                fb = feedback_group(cfg)
                groups.append(fb)
                lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))
                handlers["/v1/judge"] = judge_handler(fb, lab)
            service = Service(cfg.serve, token, handlers)
            host, port = service.address
            print(f"serving {', '.join(sorted(handlers))} on http://{host}:{port} "
                  f"(bearer token from ${cfg.serve.token_env}); Ctrl-C stops", flush=True)
            try:
                service.server.serve_forever()
            finally:
                service.close()
        finally:
            for g in groups:
                g.shutdown()
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from cai_ray.config import load_config
    from cai_ray.configschema import Problem
    from cai_ray.plan import plan, render

    cfg = load_config(args.config, args.overrides, check_env=False)
    gpus = args.gpus
    if gpus is None:
        if cfg.run.ray_address:
            import ray

            ray.init(address=cfg.run.ray_address, logging_level=logging.WARNING)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            ray.shutdown()
        else:
            try:
                import torch

                gpus = torch.cuda.device_count()
            except ImportError:
                gpus = 0
    bundles, problems = plan(cfg, gpus, args.gpu_memory_gib)
    print(render(cfg, bundles, gpus, args.gpu_memory_gib))
    if problems:
        raise ValidationError(f"placement of {args.config or 'the defaults'} is impossible",
                              [Problem("placement", p, args.config) for p in problems])
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cai_ray.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def _judge_check_once(cfg: Any, out: Path) -> Path:
    from cai_ray.stages.label import run_judge_check

    done = out / "label" / "judge_check.json"
    if done.exists():
        log.info("judge already checked in %s; skipping", done)
        return done
    return run_judge_check(cfg, out, echo=False)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from cai_ray.report import write_report
    from cai_ray.stages.dpo import run_dpo
    from cai_ray.stages.evaluate import run_eval
    from cai_ray.stages.label import run_label
    from cai_ray.stages.online_dpo import run_online_dpo
    from cai_ray.stages.ppo import run_ppo
    from cai_ray.stages.rm import run_rm
    from cai_ray.stages.sl import run_generate
    from cai_ray.stages.sl_train import run_train

    def build(cfg: Any, out: Path) -> list[Stage]:
        from cai_ray.config import rl_sampling_problems
        from cai_ray.configschema import ValidationError
        from cai_ray.stages.online_dpo import check_online_dpo

        problems = rl_sampling_problems(cfg)  # the RL stage's refusal, before SL runs an hour
        if problems:
            raise ValidationError("RL-CAI sampling", problems)
        rl: list[Stage] = [("rm", lambda: run_rm(cfg, out)),
                           ("ppo", lambda: run_ppo(cfg, out, args.resume))]
        label: list[Stage] = [("label", lambda: run_label(cfg, out))]
        if cfg.pipeline.rl == "dpo":
            rl = [("dpo", lambda: run_dpo(cfg, out))]
        elif cfg.pipeline.rl == "online_dpo":
            check_online_dpo(cfg)  # before SL runs an hour, not after
            # it labels its own samples, so no label stage; the judge is still checked on the
            # labelled sets before it labels anything (once: a resumed run keeps the result)
            label = [("judge-check", lambda: _judge_check_once(cfg, out))]
            rl = [("online_dpo", lambda: run_online_dpo(cfg, out, args.resume))]
        return [("sl/generate", lambda: run_generate(cfg, out)),
                ("sl/train", lambda: run_train(cfg, out)), *label, *rl,
                ("eval", lambda: run_eval(cfg, out)), ("report", lambda: write_report(out))]

    return _run_stages(args, build, evaluates=True)


COMMANDS = {"validate": _cmd_validate, "keys": _cmd_keys, "constitution": _cmd_constitution,
            "models": _cmd_models, "sample": _cmd_sample, "sl": _cmd_sl, "label": _cmd_label,
            "judge-check": _cmd_judge_check, "rm": _cmd_rm, "dpo": _cmd_dpo,
            "redteam": _cmd_redteam, "online-dpo": _cmd_online_dpo, "ppo": _cmd_ppo,
            "eval": _cmd_eval, "report": _cmd_report, "serve": _cmd_serve, "plan": _cmd_plan,
            "pipeline": _cmd_pipeline}


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    if not logging.getLogger().handlers:
        from cai_ray.runtime import setup_logging

        setup_logging("INFO")
    interrupts = InterruptHandler(interrupted_message(args.command, words))
    previous = signal.getsignal(signal.SIGINT)
    installed = interrupts.install()
    try:
        return COMMANDS[args.command](args)
    except ValidationError as e:
        print(redact(str(e)), file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.flush()
        interrupts.say()
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if interrupts.count:  # a clean-up step failed after Ctrl-C: still an interrupt
            log.debug("after the interrupt: %s: %s", type(e).__name__, e)
            sys.stderr.flush()
            interrupts.say()
            return EXIT_INTERRUPTED
        if args.debug:
            raise
        print(redact(f"error: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1
    finally:
        if installed and not interrupts.count:  # an interrupted run keeps it to the end
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
