"""Shared fixtures. Tiers: tests/unit (pure, no Ray), tests/integration (local Ray, tiny model),
tests/gpu (skipped cleanly without CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# Engines started by tests: small KV cache, in-process engine, no hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# configs/cpu-tiny.yaml says `dtype: auto`: tests run float32 on every CPU kind (exact trainer/vLLM
# agreement, no 75x-slow emulated bf16 on AVX2 machines) unless they test bf16 itself. Inherited
# by the CLI subprocesses and the local Ray the tests start.
os.environ.setdefault("CAI_RAY_AUTO_DTYPE", "float32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        path = Path(str(item.fspath))
        if "integration" in path.parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in path.parts:
            item.add_marker(pytest.mark.gpu)
            if not has_cuda:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The random tiny Llama, built once into the model cache."""
    from cai_ray.models import prepare

    return prepare("tiny-llama")


def run_cli(*args: str) -> tuple[int, str, str]:
    """`cai-ray ARGS` in this process (no interpreter start-up, the imports already warm, and
    the test session's Ray joined when there is one): exit code, stdout and stderr."""
    import contextlib
    import io

    from cai_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def actor_pids(actor_class: str) -> list[int]:
    """Pids of this test's own Ray actors of `actor_class` (its local Ray, or that of a CLI
    it started: descendants of this process), oldest first; never another run's on the
    machine, which a fault test must not kill."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    out = []
    for p in sorted(procs, key=lambda p: p.pid):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{actor_class}"):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out
