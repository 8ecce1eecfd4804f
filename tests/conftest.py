"""Shared fixtures. Tiers: tests/unit (pure, no Ray), tests/integration (local Ray, tiny model),
tests/gpu (skipped cleanly without CUDA)."""

from __future__ import annotations

import json
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
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts the same way
        items.sort(key=lambda item: -file_seconds(item))


FILE_SECONDS = Path(__file__).resolve().parent / "file_seconds.json"
_file_seconds: dict[str, float] | None = None


def file_seconds(item: pytest.Item) -> float:
    """The measured seconds of the item's file (`tests/file_seconds.json`, refreshed by
    `tests/file_seconds.py`): with `--dist loadfile --no-loadscope-reorder`, xdist hands the
    files out in collection order, so sorting them heaviest first keeps a long file from
    starting last and running alone at the end. A file not measured yet counts as an average
    integration file, or a fast unit file."""
    global _file_seconds
    if _file_seconds is None:
        _file_seconds = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}
    rel = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
    default = 20.0 if "integration" in Path(rel).parts else 1.0
    return _file_seconds.get(rel, default)


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
