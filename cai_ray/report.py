"""`cai-ray report DIR`: one self-contained HTML page with PNG plots of a run, no W&B needed.

Reads what the stages wrote (`eval/elo.json`, `ppo/metrics.jsonl`, `dpo/metrics.jsonl`,
`rm/metrics.json`, `sl/train_metrics.json`) and draws, for whatever is there:

- Elo per snapshot with 95% intervals, harmlessness and helpfulness, for each judge (AI
  feedback model, PM);
- the harmlessness-vs-helpfulness Elo scatter, one point per snapshot (the paper's picture);
- PPO reward and KL curves; DPO loss and implicit-reward curves;
- the PM's reliability curve on held-out comparisons.

The page (`DIR/report.html`) refers to PNGs in `DIR/report/`; tables give the numbers.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend, when the axes have labelled lines (an empty one only warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "table" not in r]


def elo_plot(elo: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    tables = elo["elo"]
    names = elo["snapshots"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, aspect in zip(axes, ("harmless", "helpful"), strict=True):
        for off, judge in ((-0.12, "judge"), (0.12, "pm")):
            t = tables.get(f"{judge}/{aspect}")
            if not t:
                continue
            xs = [k + off for k in range(len(names))]
            ys = [t[n]["elo"] for n in names]
            err = [[t[n]["elo"] - t[n]["low"] for n in names],
                   [t[n]["high"] - t[n]["elo"] for n in names]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=4,
                        label="AI judge" if judge == "judge" else "PM")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_title(f"{aspect}ness Elo (95% bootstrap)")
        _legend(ax)
    fig.tight_layout()
    path = out / "elo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def steps_plot(elo: dict[str, Any], final_step: int, out: Path) -> Path | None:
    """Elo of the RL snapshots over PPO steps (with intervals); the initial and SL snapshots
    as horizontal references."""
    from cai_ray.rundir import snapshot_step

    rl = [(snapshot_step(n, final_step), n) for n in elo["snapshots"]]
    rl = sorted((s, n) for s, n in rl if s is not None)
    if len(rl) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, aspect in zip(axes, ("harmless", "helpful"), strict=True):
        for judge in ("judge", "pm"):
            t = elo["elo"].get(f"{judge}/{aspect}")
            if not t:
                continue
            xs = [s for s, _ in rl]
            ys = [t[n]["elo"] for _, n in rl]
            ax.plot(xs, ys, marker="o", label=f"RL ({'AI judge' if judge == 'judge' else 'PM'})")
            ax.fill_between(xs, [t[n]["low"] for _, n in rl], [t[n]["high"] for _, n in rl],
                            alpha=0.2)
            for ref in elo["snapshots"]:
                if snapshot_step(ref, final_step) is None and ref != elo["snapshots"][0]:
                    ax.axhline(t[ref]["elo"], ls="--", lw=0.8, label=f"{ref} ({judge})")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("PPO step")
        ax.set_title(f"{aspect}ness Elo over PPO steps")
        _legend(ax, fontsize=7)
    fig.tight_layout()
    path = out / "elo_steps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_plot(elo: dict[str, Any], out: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = False
    for judge, marker in (("judge", "o"), ("pm", "s")):
        h, p = elo["elo"].get(f"{judge}/harmless"), elo["elo"].get(f"{judge}/helpful")
        if not h or not p:
            continue
        xs = [h[n]["elo"] for n in elo["snapshots"]]
        ys = [p[n]["elo"] for n in elo["snapshots"]]
        ax.plot(xs, ys, marker=marker, label="AI judge" if judge == "judge" else "PM")
        for n, x, y in zip(elo["snapshots"], xs, ys, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("harmlessness Elo")
    ax.set_ylabel("helpfulness Elo")
    ax.set_title("harmlessness vs helpfulness")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    _legend(ax)
    fig.tight_layout()
    path = out / "scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ppo_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(steps, [r["reward/score_mean"] for r in rows], marker=".", label="PM score")
    axes[0].plot(steps, [r["reward/total_mean"] for r in rows], marker=".",
                 label="score − β·KL")
    axes[0].set_title("PPO reward")
    axes[0].set_xlabel("step")
    _legend(axes[0])
    axes[1].plot(steps, [r["kl/mean"] for r in rows], marker=".", color="tab:red")
    axes[1].set_title("KL(policy ‖ initial) per response")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    path = out / "ppo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dpo_plot(rows: list[dict[str, Any]], out: Path, stage: str = "dpo") -> Path:
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(steps, [r["dpo/loss"] for r in rows], marker=".")
    axes[0].set_title("DPO loss")
    axes[0].set_xlabel("step")
    axes[1].plot(steps, [r["dpo/reward_chosen"] for r in rows], marker=".", label="chosen")
    axes[1].plot(steps, [r["dpo/reward_rejected"] for r in rows], marker=".", label="rejected")
    axes[1].set_title("implicit reward β·(log π − log π_ref)")
    axes[1].set_xlabel("step")
    _legend(axes[1])
    fig.tight_layout()
    path = out / f"{stage}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_plot(rm: dict[str, Any], out: Path) -> Path | None:
    held = rm.get("held_out", {}).get("all")
    if not held or not held.get("reliability"):
        return None
    plt = _plt()
    bins = held["reliability"]
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0.5, 1], [0.5, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    xs = [b["confidence"] for b in bins]
    ys = [b["agreement"] for b in bins]
    ax.plot(xs, ys, marker="o", label=f"PM (ECE {held.get('ece', float('nan')):.3f})")
    ax.set_xlabel("PM confidence in its preferred side")
    ax.set_ylabel("label mass on that side")
    ax.set_title(f"PM reliability ({held.get('count', '?')} held-out)")
    _legend(ax)
    fig.tight_layout()
    path = out / "reliability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def scope_notes(run: Path) -> list[str]:
    """Plain statements of what a run of this size can and cannot show, read off its outputs:
    how many held-out prompts the Elo rests on, whether any interval excludes no difference,
    whether the judge is the policy itself, how many responses ran out of tokens."""
    import yaml

    notes: list[str] = []
    cfg: dict[str, Any] = {}
    if (run / "config.yaml").exists():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    policy = (cfg.get("model") or {}).get("path")
    judge = ((cfg.get("feedback") or {}).get("model") or {}).get("path") or policy
    if policy and judge == policy:
        notes.append(f"The feedback model is the policy model itself ({policy}). A small model "
                     "judges near chance (SmolLM2-135M: 51% on the paper's HHH comparisons), so "
                     "its labels, the PM trained on them and the PPO that follows the PM carry "
                     "little harmlessness signal: this run shows that every stage works on real "
                     "engines, not that the method makes this model more harmless. A stronger "
                     "feedback model (feedback.model) is what that needs.")
    check_path = run / "label" / "judge_check.json"
    if check_path.exists():
        sets = json.loads(check_path.read_text()).get("sets", {})
        chance = [n for n, r in sets.items() if r.get("chance_in_interval")]
        if chance:
            notes.append(f"On {', '.join(chance)} the feedback model's accuracy interval "
                         "contains 50% (label/judge_check.json): its labels of that kind of "
                         "comparison are not distinguishable from chance.")
    elo_path = run / "eval" / "elo.json"
    if elo_path.exists():
        elo = json.loads(elo_path.read_text())
        flat = [(k, n, t[n]) for k, t in elo.get("elo", {}).items() for n in elo["snapshots"]]
        counts = sorted({int(r.get("comparisons", 0)) for _, _, r in flat})
        open_ = [f"{k}/{n}" for k, n, r in flat if r["low"] <= 0 <= r["high"] and
                 n != elo["snapshots"][0]]
        span = (f"{counts[0]}" if len(counts) == 1 else
                f"{counts[0]}–{counts[-1]}" if counts else "0")
        shared = elo.get("not_held_out") or []
        notes.append(f"Elo rests on {span} comparisons per snapshot, "
                     + ("on held-out prompts the run never trained on. " if not shared else
                        "NOT all on held-out prompts: " + "; ".join(shared) + ". ")
                     + (f"{len(open_)} of the ratings' 95% intervals contain 0 ({', '.join(open_[:6])}"
                        f"{' …' if len(open_) > 6 else ''}): at this size those differences are "
                        "not distinguishable from no difference." if open_ else
                        "Every non-reference interval excludes 0."))
    ppo = [r for r in _jsonl(run / "ppo" / "metrics.jsonl") if "reward/score_mean" in r]
    if ppo:
        trunc = [r["response/truncated_fraction"] for r in ppo
                 if "response/truncated_fraction" in r]
        notes.append(f"PPO ran {len(ppo)} steps: a rising PM score over so few steps shows the "
                     "loop optimises the PM, not that the policy generalises."
                     + (f" {100 * sum(trunc) / len(trunc):.0f}% of its responses ran out of "
                        "tokens (scored without an EOS, minus ppo.truncated_penalty)."
                        if trunc else ""))
    return notes


def verdict_check_line(question: str, c: dict[str, Any]) -> str:
    """One sentence on how far the eval's per-answer verdicts of a question can be trusted."""
    text = (f"<p>{question.capitalize()} judge on the labelled set ({c['labelled']} replies): "
            f"accuracy {c['accuracy']:.2f}")
    if "interval" in c:
        lo, hi = c["interval"]
        text += (f" [{lo:.2f}, {hi:.2f}] (cross-validated) at p(yes) &gt; {c['cut']:.2f}, "
                 f"AUC {c['auc']:.2f}; at 0.5 it says yes to {c['yes_share_at_half']:.0%} "
                 f"of them (accuracy {c['accuracy_at_half']:.2f})")
        if lo <= 0.5:
            text += (". <b>The interval reaches down to 50% or below: these rates are not "
                     "reliable.</b>")
    return text + ".</p>"


def before_after(run: Path, elo: dict[str, Any], count: int = 10) -> str:
    """The first `count` held-out red-team prompts of the eval (its order, not picked), each
    with the first snapshot's answer and the last one's, and the judge's verdicts on them."""
    names = elo.get("snapshots", [])
    path = run / "eval" / "responses.jsonl"
    if len(names) < 2 or not path.exists():
        return ""
    first, last = names[0], names[-1]
    answers: dict[str, dict[str, dict[str, Any]]] = {first: {}, last: {}}
    order: list[str] = []
    for r in _jsonl(path):
        if r.get("set") == "harmless" and r.get("snapshot") in answers:
            answers[r["snapshot"]][r["prompt_id"]] = r
            if r["snapshot"] == first:
                order.append(r["prompt_id"])
    ids = [i for i in order if i in answers[last]][:count]
    if not ids:
        return ""
    verdicts = elo.get("verdicts", {})

    def verdict(snap: str, pid: str) -> str:
        said = [rate for rate in ("harmful", "evasive")
                if verdicts.get(snap, {}).get(rate, {}).get(pid) == 1.0]
        judged = any(pid in verdicts.get(snap, {}).get(rate, {}) for rate in ("harmful", "evasive"))
        return ("judged " + (" and ".join(said) if said else "neither harmful nor evasive")
                if judged else "")

    def answer(snap: str, pid: str) -> str:
        v = verdict(snap, pid)
        return (f"<td><pre>{html.escape(answers[snap][pid]['response'])}</pre>"
                + (f"<br><i>{html.escape(v)}</i>" if v else "") + "</td>")

    rows = "".join(f"<tr><td><pre>{html.escape(answers[first][pid]['prompt'])}</pre></td>"
                   f"{answer(first, pid)}{answer(last, pid)}</tr>" for pid in ids)
    return (f"<h2>Before and after: {len(ids)} held-out red-team prompts</h2>"
            f"<p>The eval's first {len(ids)} red-team prompts in its own order, answered by "
            f"{html.escape(first)} and by {html.escape(last)}.</p>"
            "<table class='samples'><tr><th>prompt</th>"
            f"<th>{html.escape(first)}</th><th>{html.escape(last)}</th></tr>{rows}</table>")


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    elo_path = run / "eval" / "elo.json"
    if elo_path.exists():
        elo = json.loads(elo_path.read_text())
        rows = []
        for key, t in elo["elo"].items():
            for n in elo["snapshots"]:
                r = t[n]
                rows.append([key, n, r["elo"], r["low"], r["high"], r["comparisons"]])
        per = elo.get("per_snapshot", {})
        extra_keys = sorted({k for v in per.values() for k in v})
        img = [f'<img src="report/{elo_plot(elo, out).name}" alt="Elo per snapshot">']
        sc = scatter_plot(elo, out)
        if sc:
            img.append(f'<img src="report/{sc.name}" alt="harmlessness vs helpfulness">')
        final = max([r["step"] for r in _jsonl(run / "ppo" / "metrics.jsonl")] or [0])
        st = steps_plot(elo, final, out)
        if st:
            img.append(f'<img src="report/{st.name}" alt="Elo over PPO steps">')
        checks = elo.get("verdict_checks") or (
            {"evasive": elo["evasiveness_judge"]} if elo.get("evasiveness_judge") else {})
        jtxt = "".join(verdict_check_line(q, c) for q, c in checks.items())
        sections.append(
            "<h2>Elo proxies</h2>" + "".join(img) +
            _table(["judge/aspect", "snapshot", "Elo", "low", "high", "comparisons"], rows) +
            "<h3>Evasiveness, over-refusal, harm</h3>" + jtxt +
            _table(["snapshot"] + extra_keys,
                   [[n] + [per[n].get(k, "") for k in extra_keys] for n in elo["snapshots"]]))
        samples = before_after(run, elo)
        if samples:
            sections.append(samples)
    ppo_rows = [r for r in _jsonl(run / "ppo" / "metrics.jsonl") if "reward/score_mean" in r]
    if ppo_rows:
        sections.append(f'<h2>PPO</h2><img src="report/{ppo_plot(ppo_rows, out).name}" '
                        'alt="PPO reward and KL">' + _table(
                            ["step", "PM score", "KL", "clip fraction", "s/step"],
                            [[r["step"], r["reward/score_mean"], r["kl/mean"],
                              r.get("policy/clip_fraction", ""), r.get("time/step", "")]
                             for r in ppo_rows]))
    for stage, title in (("dpo", "DPO"), ("online_dpo", "Online DPO")):
        dpo_rows = [r for r in _jsonl(run / stage / "metrics.jsonl") if "dpo/loss" in r]
        if not dpo_rows:
            continue
        dpo_path = run / stage / "metrics.json"
        held = json.loads(dpo_path.read_text()).get("held_out", {}) if dpo_path.exists() \
            else {}
        sections.append(f'<h2>{title}</h2><img src="report/{dpo_plot(dpo_rows, out, stage).name}" '
                        'alt="DPO loss and implicit rewards">' + (_table(
                            ["aspect", "held-out", "accuracy", "ECE", "margin"],
                            [[a, v.get("count"), v.get("accuracy"), v.get("ece"),
                              v.get("margin")] for a, v in held.items()]) if held else ""))
    check_path = run / "label" / "judge_check.json"
    if check_path.exists():
        jc = json.loads(check_path.read_text())
        rows = [[name, r["n"], r["accuracy"], r["interval"][0], r["interval"][1], r["ece"],
                 "" if r["order_disagreement"] is None else r["order_disagreement"],
                 r["lean_a"], "yes" if r["chance_in_interval"] else "no"]
                for name, r in jc["sets"].items()]
        sections.append(
            f"<h2>Feedback model on labelled sets</h2><p>{html.escape(str(jc['labeller']))}, "
            f"{html.escape(str(jc['method']))}, both orders: {jc['both_orders']}, principles: "
            f"{jc['num_principles']}, few-shot: {jc['few_shot']}, checked before labelling."
            "</p>" + _table(["set", "n", "accuracy", "low", "high", "ECE", "order disagreement",
                             "lean (A)", "interval contains 50%"], rows))
    rm_path = run / "rm" / "metrics.json"
    if rm_path.exists():
        rm = json.loads(rm_path.read_text())
        rel = reliability_plot(rm, out)
        held = rm.get("held_out", {})
        sections.append("<h2>Preference model</h2>" +
                        (f'<img src="report/{rel.name}" alt="PM reliability">' if rel else "") +
                        _table(["aspect", "held-out", "accuracy", "ECE"],
                               [[a, v.get("count"), v.get("accuracy"), v.get("ece")]
                                for a, v in held.items()]))
    sl_path = run / "sl" / "train_metrics.json"
    if sl_path.exists():
        sl = json.loads(sl_path.read_text())
        sections.append("<h2>SL-CAI</h2>" + _table(
            ["samples", "steps", "loss before", "loss after"],
            [[sl.get("samples"), sl.get("steps"), sl.get("loss_before"),
              sl.get("loss_after")]]))
    if not sections:
        raise FileNotFoundError(f"{run} has no stage output to report (eval/elo.json, "
                                "ppo/metrics.jsonl, dpo/metrics.jsonl, rm/metrics.json)")
    notes = scope_notes(run)
    if notes:
        sections.insert(0, "<h2>What this run can and cannot show</h2><ul>" +
                        "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cai-ray report</title>"
            "<style>body{font-family:sans-serif;max-width:1150px;margin:2em auto}"
            "img{max-width:100%;margin:0.5em 0}table{border-collapse:collapse;margin:0.5em 0}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            ".samples td{text-align:left;vertical-align:top;width:33%}"
            "pre{white-space:pre-wrap;margin:0;font-family:inherit}</style></head>"
            f"<body><h1>cai-ray report: {html.escape(run.name)}</h1>"
            + "".join(sections) + "</body></html>")
    path = run / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
