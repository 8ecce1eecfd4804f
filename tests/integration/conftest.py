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
    # address="local": always a new Ray of this test process's own, never one found on the
    # machine (another test worker's, or a `ray start` head)
    ray.init(address="local", num_cpus=6, include_dashboard=False,
             runtime_env={"env_vars": env},
             logging_level="WARNING")
    yield
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here runs a local Ray with real engines (vLLM, DeepSpeed, the tiny model):
    `integration` and `slow`, outside the fast tier (`pytest -m "not slow"`)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
