"""The main job end to end, as users run it: `ray job submit` against a local head on loopback
with token authentication runs the tiny pipeline (sl → label → rm → ppo → eval → report); the
job SUCCEEDED, every stage's output is right, an unauthenticated client is turned away, no
secret is printed or saved; then a rerun skips every stage."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ["pipeline", "--output", "--config", "configs/cpu-tiny.yaml",
            "data.red_team.limit=4", "data.helpful.limit=2", "sl.rounds=1",
            "feedback.batch_size=4", "reward.eval_fraction=0.2", "reward.micro_batch_size=1",
            "ppo.eval_every=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pipeline_as_a_ray_job_then_a_rerun_skips_every_stage(tiny_model_dir,
                                                               tmp_path: Path) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    token = secrets.token_hex(16)
    hf_token = "hf_" + secrets.token_hex(16)  # forwarded to the job, never printed or saved
    # A short temp dir: Ray's socket paths live under it and Unix sockets allow ~107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="crj", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_TMPDIR": str(ray_tmp), "HF_TOKEN": hf_token}
    env.pop("RAY_ADDRESS", None)
    # Every port this head opens is a free one: another Ray on the machine (the other tests'
    # cluster) holds the defaults, and a job agent that cannot bind never becomes available.
    gcs, dash, agent, agent_grpc, env_agent, metrics = (_port() for _ in range(6))
    address = f"http://127.0.0.1:{dash}"
    # `--block` keeps the head in the foreground, in its own process group: stopping it
    # stops exactly this cluster (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=6",
                             f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={env_agent}",
                             f"--metrics-export-port={metrics}",
                             f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([ray, "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None, "the Ray head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
            time.sleep(2)
        out = tmp_path / "run"
        runtime_env = json.loads(subprocess.run(
            [sys.executable, "cluster/runtime_env.py"], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True).stdout)
        assert runtime_env["excludes"] and ".venv" in runtime_env["excludes"]
        assert runtime_env["env_vars"]["HF_TOKEN"] == hf_token
        submit = [ray, "job", "submit", "--address", address, "--submission-id",
                  "cai-ray-test", "--runtime-env-json", json.dumps(runtime_env), "--",
                  "python", "-m", "cai_ray.cli", *PIPELINE[:2], str(out), *PIPELINE[2:],
                  "run.ray_address=auto"]
        for _ in range(60):  # the job agent comes up a little after the head answers
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=1200)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
        status = subprocess.run([ray, "job", "status", "--address", address, "cai-ray-test"],
                                env=env, capture_output=True, text=True, timeout=60)
        text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert re.search(r"Job 'cai-ray-test' succeeded", text), text[-2000:]
        _check_outputs(out, job.stdout + job.stderr)
        # Without the token the job API refuses.
        bad = {**env, "RAY_AUTH_TOKEN": "wrong-" + token}
        denied = subprocess.run([ray, "job", "list", "--address", address], env=bad,
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0
        # The secrets are never printed (the job's own log is in `submit`'s output), nor
        # written anywhere in the run directory (config, metrics, logs, checkpoints).
        for secret in (token, hf_token):
            assert secret not in (job.stdout + job.stderr)
            leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in
                      p.read_bytes()]
            assert not leaked, leaked
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        time.sleep(2)
        try:  # anything of that cluster still alive
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # The same command again, on a local Ray this time: every stage sees its output complete.
    again = subprocess.run([sys.executable, "-m", "cai_ray.cli", *PIPELINE[:2], str(out),
                            *PIPELINE[2:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for what in ("SL data already complete", "SL model already trained",
                 "comparisons already complete", "preference model already trained",
                 "PPO policy already trained", "evaluation already complete"):
        assert what in again.stderr


def _check_outputs(out: Path, log: str) -> None:
    assert "done in" in log and "rm:" in log
    assert len(datasets.load_from_disk(str(out / "sl" / "data"))) == 4 + 2 * 2
    assert (out / "sl" / "model" / "config.json").exists()
    assert len(datasets.load_from_disk(str(out / "label" / "comparisons"))) == 6
    metrics = json.loads((out / "rm" / "metrics.json").read_text())
    assert metrics["train_comparisons"] + metrics["held_out"]["all"]["count"] <= 6
    assert (out / "rm" / "model" / "reward_head.safetensors").exists()
    assert (out / "ppo" / "model" / "config.json").exists()
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    assert ppo["steps"] == 2 and len(ppo["score_curve"]) == 2
    # Live PM Elo at every step (the SL and initial weights swapped in once for their answers)
    # and the ppo@1 snapshot rated by the eval stage with the others.
    live = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in live if "elo/harmlessness_sl" in r] == [1, 2]
    elo = json.loads((out / "eval" / "elo.json").read_text())
    assert elo["snapshots"] == ["initial", "sl", "ppo@1", "ppo"]
    assert (out / "report.html").exists() and "report: " in log
