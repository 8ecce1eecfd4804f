"""vLLM's console output: warnings about the project's deliberate engine choices are dropped
unless VLLM_LOGGING_LEVEL asks for them; per-tensor dtype casts are counted; others pass."""

from __future__ import annotations

import logging

import pytest

from cai_ray.actors import rollout
from cai_ray.actors.rollout import _EngineNoiseFilter
from cai_ray.config import EngineConfig


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("vllm.engine", logging.WARNING, __file__, 1, msg, args, None)


def test_deliberate_warnings_dropped_others_kept() -> None:
    f = _EngineNoiseFilter(deliberate=True)
    assert not f.filter(_record("This model does not officially support disabling chunked "
                                "prefill. Disabling this manually may cause the engine to crash"))
    assert not f.filter(_record("OMP_NUM_THREADS=%s is set; leaving Torch threads at %d for "
                                "serving.", "2", 2))
    assert not f.filter(_record("Attempted to load weight %s with dtype %s into %s", "w", "a", "b"))
    assert not f.filter(_record("%s is not found in LD_PRELOAD. For best performance, ...",
                                "libtcmalloc"))
    assert f.dropped == 1  # only casts are counted
    assert f.filter(_record("KV cache is full; preempting request %s", "r1"))
    assert f.filter(_record("Something else went wrong"))


@pytest.mark.parametrize("level,kept", [("WARNING", False), ("info", True), ("DEBUG", True)])
def test_asking_for_engine_logs_keeps_them(monkeypatch, level: str, kept: bool) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", level)
    handler = logging.Handler()
    monkeypatch.setattr(logging.getLogger("vllm"), "handlers", [handler])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    f = rollout._quiet_engine()
    assert handler.filters == [f]
    assert f.filter(_record("Enforce eager set, disabling torch.compile")) is kept
    assert f.filter(_record("Attempted to load weight %s with dtype %s into", "w", "a")) is False


def test_rotary_reload_warning_dropped_other_layers_kept() -> None:
    f = _EngineNoiseFilter(deliberate=True)
    assert not f.filter(_record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not f.filter(_record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    # a layer with weights that received none is a real problem: it stays on the console
    assert f.filter(_record("%s: Failed to load weights", "QKVParallelLinear"))
    assert _EngineNoiseFilter(deliberate=False).filter(
        _record("%s: Failed to load weights", "RotaryEmbedding"))  # asked for engine logs


def test_the_filter_survives_vllm_applying_its_logging_config(monkeypatch, tmp_path) -> None:
    """vLLM applies its logging config again when an engine starts, replacing the handlers
    `_quiet_engine` filtered. Through VLLM_LOGGING_CONFIG_PATH, vLLM's own configure step
    installs the filter each time. Control: vLLM's default config lets the warning through."""
    import io
    import sys

    from vllm import logger as vllm_logger

    monkeypatch.setattr(rollout.tempfile, "gettempdir", lambda: str(tmp_path))
    for k in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    deliberate = "Enforce eager set, disabling torch.compile, CUDAGraphs"
    real = "KV cache is full; preempting request r1"

    def emitted() -> str:
        out = io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)  # the handler's stream is ext://sys.stdout
        vllm_logger._configure_vllm_root_logger()  # what vLLM runs at import and engine start
        before = rollout._EngineNoiseFilter.casts
        lg = logging.getLogger("vllm.config.vllm")
        lg.warning(deliberate)
        lg.warning(real)
        lg.warning("Attempted to load weight %s with dtype %s into", "w", "a")
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        return out.getvalue(), rollout._EngineNoiseFilter.casts - before

    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")
    try:
        text, _ = emitted()  # control: vLLM's default config
        assert deliberate in text and real in text
        rollout.use_engine_logging()
        assert str(tmp_path) in rollout.os.environ["VLLM_LOGGING_CONFIG_PATH"]
        text, casts = emitted()
        assert deliberate not in text and real in text and "Attempted" not in text
        assert casts == 1
        monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/user/own.json")
        rollout.use_engine_logging()  # a user's own config is left alone
        assert rollout.os.environ["VLLM_LOGGING_CONFIG_PATH"] == "/user/own.json"
    finally:
        monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
        vllm_logger._configure_vllm_root_logger()


@pytest.mark.parametrize("level,bar", [(None, False), ("WARNING", False), ("INFO", True)])
def test_the_weight_loading_bar_shows_only_when_engine_logs_are_asked_for(
        monkeypatch, tiny_model_dir, level: str | None, bar: bool) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from cai_ray.config import EngineConfig, ModelSpec

    if level is None:
        monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    else:
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", level)
    kw = rollout.engine_kwargs(ModelSpec(path=str(tiny_model_dir)), EngineConfig(), "cpu", 0)
    assert kw["use_tqdm_on_load"] is bar
    assert EngineArgs(**kw).use_tqdm_on_load is bar  # a field vLLM's engine takes


IMPORT_TIME = """
import logging, sys
if sys.argv[1] == "ours":
    from cai_ray.actors.rollout import use_engine_logging
    use_engine_logging()
# what `import vllm` does before vLLM has configured its logger
log = logging.getLogger("vllm.triton_utils.importing")
log.warning("Triton is installed, but doesn't include CPU backend. Disabling Triton.")
log.warning("a real engine warning")
"""


@pytest.mark.parametrize("mode", ["ours", "control"])
def test_warnings_at_vllm_import_time_are_filtered_too(mode: str, tmp_path) -> None:
    """`import vllm` warns about the CPU build's Triton before vLLM configures its logger, so
    the record went to logging's last-resort handler, past the filter. `use_engine_logging`
    applies the filtered config at once. Control: without it the deliberate warning shows."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING",
                        "VLLM_LOGGING_LEVEL")}
    env["TMPDIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", IMPORT_TIME, mode], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "a real engine warning" in out
    assert ("doesn't include CPU backend" in out) is (mode == "control"), out


NUMA_BIND = """
import torch, vllm._C  # noqa: F401  (vLLM's CPU ops)
torch.ops._C.init_cpu_memory_env([0])  # what vLLM's CPU worker runs at engine start
"""


@pytest.mark.parametrize("mode,level", [("ours", "WARNING"), ("ours", "INFO"),
                                        ("control", "WARNING")])
def test_the_cpu_engines_numa_warning_stays_out_unless_engine_logs_are_asked_for(
        mode: str, level: str, monkeypatch) -> None:
    """The CPU worker's NUMA binding warns from C++, which no logging filter sees: the engine's
    environment sets torch's C++ log level. Control: without it the warning shows."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", level)
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    env = {k: v for k, v in os.environ.items()}
    if mode == "ours":
        env.update(rollout.vllm_env(EngineConfig(), "cpu", 1))
    p = subprocess.run([sys.executable, "-c", NUMA_BIND], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    shown = "NUMA binding" in p.stderr
    assert shown is (mode == "control" or level == "INFO"), p.stderr


DS_JOIN = """
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
from cai_ray.actors.group import WorkerContext
from cai_ray.actors.trainer import DistributedWorker, free_port

if sys.argv[1] == "ours":
    w = DistributedWorker(WorkerContext("trainer", 0, 1))
    w.device, w.comm_backend = "cpu", "gloo"
    w.join_group("127.0.0.1", free_port())
else:  # what join_group runs, bare
    import deepspeed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
print("joined", dist.get_world_size())
"""


@pytest.mark.slow  # ~20 s each: DeepSpeed's import and op build
@pytest.mark.parametrize("mode", ["ours", "control"])
def test_deepspeeds_op_build_line_stays_out_of_a_trainers_console(mode: str) -> None:
    """DeepSpeed prints that it built its CPU shared-memory op at every rank's init; the join
    keeps that line in the debug log and lets the rest of its output through. Control: bare
    `init_distributed` prints it."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", DS_JOIN, mode], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert "joined 1" in p.stdout
    assert ("built successfully" in p.stdout) is (mode == "control"), p.stdout


@pytest.mark.parametrize("mode", ["ours", "control"])
def test_loading_a_model_in_an_actor_draws_no_weights_bar(mode: str, tiny_model_dir,
                                                           capfd) -> None:
    """Several actors load models at once and their "Loading weights" bars interleave in the
    console. Control: transformers' own loader, with its bars on, draws one."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from cai_ray.config import ModelSpec
    from cai_ray.models import load_causal_lm

    hf_logging.enable_progress_bar()
    try:
        if mode == "ours":
            load_causal_lm(ModelSpec(path=str(tiny_model_dir)), "float32")
        else:
            AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    finally:
        hf_logging.enable_progress_bar()
    assert ("Loading weights" in capfd.readouterr().err) is (mode == "control")


RAY_START = """
import os, sys
from cai_ray.config import load_config
from cai_ray.runtime import ray_session
os.environ.pop("RAY_AUTH_MODE", None)
os.environ.pop("RAY_ADDRESS", None)
if sys.argv[1] == "ours":
    with ray_session(load_config(None, ["run.ray_num_cpus=1"])):
        print("auth", os.environ.get("RAY_AUTH_MODE"))
else:  # what ray_session runs, bare
    import ray
    ray.init(num_cpus=1, include_dashboard=False)
    ray.shutdown()
"""


@pytest.mark.slow  # ~10 s each: a Ray cluster starts
@pytest.mark.parametrize("mode", ["ours", "control"])
def test_a_new_local_ray_cluster_starts_without_the_auth_mode_warning(mode: str,
                                                                      tmp_path) -> None:
    """A new local cluster keeps Ray's default (token authentication) without Ray's warning
    about choosing it on the console. Control: a bare `ray.init` prints it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # a fresh ~/.ray: no auth token yet, as on a new machine
    p = subprocess.run([sys.executable, "-c", RAY_START, mode], capture_output=True, text=True,
                       timeout=180, env=env)
    assert p.returncode == 0, p.stderr
    assert ("Token authentication is enabled" in p.stderr) is (mode == "control"), p.stderr
    if mode == "ours":
        assert "auth token" in p.stdout  # Ray still turned token authentication on
