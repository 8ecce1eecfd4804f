"""Ctrl-C: one SIGINT stops a stage within seconds, also while the driver waits on a remote call
that would not end for minutes; the actors are stopped, the finished shards stay, one line says
how to resume, the exit code is 130, and the same command then finishes with every prompt once.
A second SIGINT, or a clean-up that hangs, ends the process at once / after a bound."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest

from cai_ray.cli import interrupted_message, resume_command
from tests.conftest import actor_pids

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


def test_resume_hint_names_the_command_and_how_it_resumes() -> None:
    words = ["ppo", "--config", "my config.yaml", "--output", "runs/x", "ppo.steps=3"]
    assert resume_command("ppo", words) == \
        "cai-ray ppo --config 'my config.yaml' --output runs/x ppo.steps=3 --resume"
    assert resume_command("pipeline", ["pipeline", "-o", "r", "--resume"]) == \
        "cai-ray pipeline -o r --resume"  # not twice
    assert resume_command("sl", ["sl", "-o", "r"]) == "cai-ray sl -o r"  # shards resume alone
    assert resume_command("validate", ["validate"]) is None
    assert interrupted_message("serve", ["serve"]) == "interrupted"
    msg = interrupted_message("label", ["label", "-o", "r"])
    assert "to resume run: cai-ray label -o r (finished shards are skipped)" in msg


_HANGING = textwrap.dedent("""
    import sys, time
    from cai_ray.cli import InterruptHandler
    h = InterruptHandler("interrupted: resume with X", exit_after_s=float(sys.argv[1]))
    h.install()
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        while True:  # a clean-up that never ends
            time.sleep(0.05)
""")


@pytest.mark.parametrize("second", [True, False])
def test_second_sigint_or_a_hanging_clean_up_exits_130(second: bool) -> None:
    p = subprocess.Popen([sys.executable, "-c", _HANGING, "30" if second else "1.5"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        if second:
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.count("interrupted: resume with X") == 1 and "Traceback" not in err
    if second:
        assert took < 2.0 and "second Ctrl-C" in err
    else:
        assert 1.4 <= took < 5.0 and "clean-up took over 1.5 s" in err


def _actor_pids(actor_class: str) -> list[int]:
    return actor_pids(actor_class)


def _shards(shards: Path) -> dict[str, int]:
    """Finished shards (written aside, then renamed: a name without a leading dot is whole)."""
    if not shards.exists():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_sigint_during_a_hung_remote_call_stops_and_resumes(tiny_model_dir, tmp_path: Path
                                                           ) -> None:
    """SL generation on Ray: once a shard is written the rollout actor is frozen (SIGSTOP:
    its generate call never returns, like an SFT call that lasts minutes, and longer than
    run.call_timeout_s=300), then the driver gets one SIGINT."""
    words = ["sl", "--config", str(TINY), "--output", str(tmp_path / "run"), "--step",
             "generate", "data.red_team.limit=8", "data.helpful.limit=2", "sl.shard_size=1",
             "sl.rounds=3", "sl.max_new_tokens=12", "run.seed=7",
             "sl.drop_truncated=false"]  # the random tiny model never ends a response itself
    args = [sys.executable, "-m", "cai_ray.cli", *words]
    shards = tmp_path / "run" / "sl" / "shards"
    log = tmp_path / "stderr.log"
    frozen: list[int] = []
    actor: int | None = None
    with log.open("w") as err_file:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not frozen:
            if actor is None:
                actor = next(iter(_actor_pids("RolloutWorker")), None)
            elif _shards(shards):  # shards are written one after the other: most are to come
                os.kill(actor, signal.SIGSTOP)
                frozen.append(actor)
            time.sleep(0.01)
        assert frozen and proc.poll() is None, "generation ended before the actor was frozen: " \
            + log.read_text()[-3000:]
        time.sleep(1.5)  # the driver is now waiting on a call that will never return
        before = _shards(shards)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        for pid in frozen:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = log.read_text()
    print(f"SIGINT -> exit in {took:.1f} s")
    assert proc.returncode == 130, err[-3000:]
    assert took < 15, f"exit took {took:.1f} s"
    assert "Traceback" not in err, err[-3000:]
    assert "rollout group: interrupted; stopping rank(s) 0 in the middle of a call" in err
    hint = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert hint == [f"interrupted: actors stopped, finished work kept; to resume run: "
                    f"{shlex.join(['cai-ray', *words])} (finished shards and steps are "
                    "skipped)"], err[-3000:]
    assert 1 <= len(before) < 10 and not (tmp_path / "run" / "sl" / "data").exists()

    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"10 shards planned, {len(before)} already complete" in done.stderr
    after = _shards(shards)
    assert all(after[name] == mtime for name, mtime in before.items())  # kept, not redone
    data = datasets.load_from_disk(str(tmp_path / "run" / "sl" / "data"))
    red = [r["prompt_id"] for r in data if r["rounds"]]
    assert len(red) == len(set(red)) == 8  # every red-team prompt exactly once
    assert len(data) == len(set(data["id"])) == 8 + 2 * 2
