"""Secrets from the environment never reach a log line, an error message, the saved config or
the config W&B receives."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray.redaction import MASK, RedactingFormatter, is_secret_name, redact, secret_values

ROOT = Path(__file__).resolve().parents[2]
HF = "hf_TestSecretValue0123456789"
WANDB = "0123456789abcdef0123456789abcdef01234567"


def test_which_variables_are_secrets() -> None:
    for name in ("WANDB_API_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN", "CAI_RAY_SERVE_TOKEN",
                 "MY_SERVICE_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "PATH", "HOME", "MAX_TOKENS_PER_STEP", "KEYBOARD"):
        assert not is_secret_name(name), name
    env = {"HF_TOKEN": HF, "DEBUG_TOKEN": "1", "PATH": "/usr/bin:/bin/and/more"}
    assert secret_values(env) == [HF]  # short values are not masked; PATH is no secret
    assert redact(f"token={HF}; path=/usr/bin:/bin/and/more", env) == \
        f"token={MASK}; path=/usr/bin:/bin/and/more"


def test_log_lines_and_tracebacks_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("cai_ray.test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("loading with token %s and key %s", HF, WANDB)
        try:
            raise RuntimeError(f"hub refused {HF}")
        except RuntimeError:
            logger.exception("download failed")
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert HF not in text and WANDB not in text
    assert text.count(MASK) == 3 and "RuntimeError: hub refused " + MASK in text


def test_setup_logging_installs_the_redacting_formatter() -> None:
    from cai_ray.runtime import setup_logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        assert root.handlers and all(isinstance(h.formatter, RedactingFormatter)
                                     for h in root.handlers)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_saved_config_and_wandb_config_hold_no_secret(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cai_ray.config import load_config, save_config

    monkeypatch.setenv("HF_TOKEN", HF)
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [f"run.name=exp-{HF}"],
                      check_env=False)
    assert cfg.run.name == f"exp-{HF}"  # the run itself sees what was given
    text = save_config(cfg, tmp_path).read_text()
    assert HF not in text and f"name: exp-{MASK}" in text
    assert cfg.to_dict()["run"]["name"] == f"exp-{MASK}"  # what W&B and `validate` get


def test_cli_output_and_errors_hold_no_secret() -> None:
    env = {**os.environ, "HF_TOKEN": HF}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cai_ray.cli", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=env)

    ok = cli("validate", "--config", "configs/cpu-smollm.yaml", f"run.name={HF}")
    assert ok.returncode == 0, ok.stderr
    assert HF not in ok.stdout + ok.stderr and MASK in ok.stdout
    bad = cli("validate", "--config", "configs/cpu-smollm.yaml", f"ppo.steps={HF}")
    assert bad.returncode == 2
    assert "ppo.steps: expected an integer" in bad.stderr
    assert HF not in bad.stdout + bad.stderr and MASK in bad.stderr
