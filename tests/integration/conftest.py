from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with more CPU slots than cores, so several 1-CPU actors coexist."""
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="WARNING")
    yield
    ray.shutdown()
