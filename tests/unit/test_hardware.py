"""`dtype: auto`: the pure choice over the CPU kinds torch reports, and its resolution in a
loaded config (every `auto` replaced, the reason logged once)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cai_ray import hardware
from cai_ray.config import ModelSpec, load_config
from cai_ray.hardware import auto_fields, choose_dtype, cpu_flags, resolve_dtypes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("device, capability, flags, cuda_bf16, expected", [
    ("cpu", "AVX2", (), True, "float32"),                      # AMD Zen 3: bf16 is emulated
    ("cpu", "AVX512", (), True, "float32"),                    # AVX-512 without bf16
    ("cpu", "AVX512", ("avx512f", "avx2"), True, "float32"),
    ("cpu", "AVX512", ("avx512f", "avx512_bf16"), True, "bfloat16"),  # torch says only AVX512
    ("cpu", "AVX512", ("amx_bf16", "amx_tile"), True, "bfloat16"),
    ("cpu", "AVX512_BF16", (), True, "bfloat16"),
    ("cpu", "AMX_BF16", (), True, "bfloat16"),
    ("cpu", "AVX512_AMX", (), True, "bfloat16"),
    ("cpu", "DEFAULT", ("avx512_bf16",), True, "float32"),     # flags only refine AVX512
    ("cpu", "NO AVX", (), True, "float32"),
    ("cpu", "VSX", (), True, "float32"),
    ("cpu", "ZVECTOR", (), True, "float32"),
    ("cpu", "", (), True, "float32"),
    ("cuda", "AVX2", (), True, "bfloat16"),
    ("cuda", "AVX2", (), False, "float32"),                    # pre-Ampere GPU
])
def test_choose_dtype_over_the_capability_table(device, capability, flags, cuda_bf16,
                                                expected) -> None:
    dtype, reason = choose_dtype(device, capability, cuda_bf16, flags)
    assert dtype == expected
    assert reason
    if device == "cpu":
        assert f"CPU capability {capability or 'unknown'}" in reason


def test_reasons_say_why() -> None:
    assert choose_dtype("cpu", "AVX2")[1] == \
        "CPU capability AVX2: no native bfloat16; bf16 matmul is emulated"
    assert "avx512_bf16 in /proc/cpuinfo" in choose_dtype("cpu", "AVX512", True,
                                                          ["avx512_bf16"])[1]


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                 "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(f)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolution_replaces_every_auto_in_a_loaded_config(monkeypatch, caplog) -> None:
    monkeypatch.delenv(hardware.PIN_ENV, raising=False)
    monkeypatch.setattr(hardware, "_detect", lambda device: ("bfloat16", f"fake {device}"))
    monkeypatch.setattr(hardware, "_logged", set())
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml",
                      ["feedback.model.path=tiny-llama", "reward.model.path=tiny-llama",
                       "rollout.engine.dtype=float32"], check_env=False)
    assert cfg.model.dtype == "auto" and cfg.trainer.dtype == "auto"  # load_config keeps auto
    expected = ["model.dtype", "feedback.model.dtype", "feedback.engine.dtype",
                "reward.model.dtype", "trainer.dtype"]
    assert auto_fields(cfg) == expected
    with caplog.at_level(logging.INFO, logger="cai_ray.hardware"):
        assert resolve_dtypes(cfg) == expected
        assert resolve_dtypes(cfg) == []  # nothing left
    assert auto_fields(cfg) == []
    fb, rm = cfg.feedback.model, cfg.reward.model
    assert fb is not None and rm is not None
    assert (cfg.model.dtype, fb.dtype, cfg.feedback.engine.dtype, rm.dtype,
            cfg.trainer.dtype) == ("bfloat16",) * 5
    assert cfg.rollout.engine.dtype == "float32"  # an explicit dtype is kept
    lines = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert lines == ["dtype auto -> bfloat16 (fake cpu) for " + ", ".join(expected)]


def test_defaults_are_auto_and_the_pin_wins(monkeypatch) -> None:
    cfg = load_config(None, [], check_env=False)
    assert auto_fields(cfg) == ["model.dtype", "rollout.engine.dtype", "feedback.engine.dtype",
                                "trainer.dtype"]
    monkeypatch.setenv(hardware.PIN_ENV, "float32")
    monkeypatch.setattr(hardware, "_detect", lambda device: ("bfloat16", "fake"))
    resolve_dtypes(cfg, device="cpu")
    assert auto_fields(cfg) == [] and cfg.trainer.dtype == cfg.model.dtype == "float32"
    monkeypatch.setenv(hardware.PIN_ENV, "fp8")
    with pytest.raises(ValueError, match="CAI_RAY_AUTO_DTYPE='fp8'"):
        hardware.detect("cpu")


def test_workers_meeting_auto_make_the_same_choice(monkeypatch) -> None:
    import torch

    monkeypatch.delenv(hardware.PIN_ENV, raising=False)
    monkeypatch.setattr(hardware, "_detect", lambda device: ("bfloat16", "fake"))
    assert hardware.torch_dtype("auto") is torch.bfloat16  # never a silent float32
    assert hardware.torch_dtype("float32") is torch.float32
    assert hardware.dtype_name(ModelSpec().dtype) == "bfloat16"
    monkeypatch.setattr(hardware, "_detect", lambda device: ("float32", "fake"))
    assert hardware.torch_dtype("auto") is torch.float32  # nor a silent bfloat16


def test_this_machine_gives_a_concrete_choice(monkeypatch) -> None:
    monkeypatch.delenv(hardware.PIN_ENV, raising=False)
    dtype, reason = hardware.detect("cpu")
    assert dtype in ("float32", "bfloat16") and reason.startswith("CPU capability ")


TRIM = """
import gc, sys
from cai_ray.hardware import release_freed_memory, rss_bytes
objs = [bytes(1000) for _ in range(300_000)]  # ~300 MB in malloc's heap (over pymalloc's 512)
keep = objs[::50]  # a few live chunks pin the heap, as a checkpoint save's leftovers do
del objs
if sys.argv[1] == "ours":
    before, after = release_freed_memory()
else:  # garbage collection alone
    before = rss_bytes(); gc.collect(); after = rss_bytes()
print(before, after)
"""


@pytest.mark.parametrize("mode", ["ours", "control"])
def test_freed_heap_pages_go_back_to_the_os(mode: str) -> None:
    """After a checkpoint save the trainer hands its freed heap back (malloc_trim); control:
    collecting garbage alone leaves those pages resident."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", TRIM, mode], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    before, after = map(int, p.stdout.split())
    assert before > 200e6
    released = before - after
    assert (released > 150e6) is (mode == "ours"), (before, after)
