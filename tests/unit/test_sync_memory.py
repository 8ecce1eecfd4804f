"""The collective weight sync holds about one tensor beyond the model at a time, never the
whole model: a ZeRO-3 trainer (DeepSpeed, one gloo rank, in this process) sends through
`WeightChannel.send`, with only the network call replaced by a recorder that measures, at each
broadcast, how many bytes of earlier gathered tensors are still alive. ZeRO-3 frees a gathered
parameter when its gather ends, so anything still alive is held by the sender. The control, a
sender that collects everything first (what host staging did), must show the whole model."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # DeepSpeed's start-up: ~20 s


class Recorder:
    """Stands in for the network: each broadcast notes the live bytes of earlier tensors."""

    def __init__(self) -> None:
        self.alive: list[tuple[weakref.ref, int]] = []
        self.peak_held = 0

    def watch(self, named: Any) -> Any:
        for name, t in named:
            gc.collect()
            held = sum(n for ref, n in self.alive if ref() is not None)
            self.peak_held = max(self.peak_held, held)
            self.alive.append((weakref.ref(t), t.numel() * t.element_size()))
            yield name, t


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> Any:
    from cai_ray.actors.group import WorkerContext
    from cai_ray.actors.ppo import PPOTrainerWorker
    from cai_ray.actors.trainer import free_port
    from cai_ray.config import load_config

    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        "trainer.zero_stage=3", "trainer.dtype=float32", "trainer.comm_backend=gloo"])
    w = PPOTrainerWorker(WorkerContext("trainer", 0, 1), cfg.model, cfg.trainer, cfg.ppo, None,
                         "cpu", 0, 1.0)
    w.setup("127.0.0.1", free_port(), 10)
    yield w
    w.close()


def _channel() -> Any:
    from cai_ray.actors.weight_channel import WeightChannel

    ch = WeightChannel.__new__(WeightChannel)  # no group: broadcast is the recorder's no-op
    ch.device, ch.backend = torch.device("cpu"), "gloo"
    ch.broadcast = lambda t: None
    return ch


def test_collective_send_holds_one_tensor_at_a_time(trainer: Any) -> None:
    rec = Recorder()
    model_bytes = sum(p.ds_numel * p.element_size() for p in trainer.engine.module.parameters())
    largest = max(p.ds_numel * p.element_size() for p in trainer.engine.module.parameters())
    sent, sums = _channel().send(rec.watch(trainer._gathered()))
    assert len(sums) == len(trainer.weight_metas())  # everything went, the tied head too
    assert sent >= model_bytes
    assert rec.peak_held <= largest  # at most the tensor just sent is still referenced


def test_the_control_staging_everything_holds_the_model(trainer: Any) -> None:
    rec = Recorder()
    params = list(trainer.engine.module.parameters())
    model_bytes = sum(p.ds_numel * p.element_size() for p in params)
    largest = max(p.ds_numel * p.element_size() for p in params)
    staged = [(n, t.clone()) for n, t in trainer._gathered()]
    _channel().send(rec.watch(iter(staged)))
    # at the last tensor every earlier one is still held: the recorder sees a staging sender
    assert rec.peak_held >= model_bytes - largest > largest


def test_object_store_buckets_hold_each_tensor_once_not_its_flat_buffer(
        tiny_model_dir: Path) -> None:
    """Under ZeRO-2 the module's parameters are views of one flat buffer; a pickled view
    carries its whole storage. The exported buckets must serialize to about their tensors'
    own bytes (a bucket of views once grew to 3.8 GB for SmolLM2)."""
    import pickle

    import ray

    from cai_ray.actors.group import WorkerContext
    from cai_ray.actors.ppo import PPOTrainerWorker
    from cai_ray.actors.trainer import free_port
    from cai_ray.config import load_config

    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        "trainer.zero_stage=2", "trainer.dtype=float32", "trainer.comm_backend=gloo"])
    w = PPOTrainerWorker(WorkerContext("trainer", 0, 1), cfg.model, cfg.trainer, cfg.ppo, None,
                         "cpu", 0, 1.0)
    w.setup("127.0.0.1", free_port(), 10)
    try:
        flat = {p.untyped_storage().data_ptr() for p in w.engine.module.parameters()}
        assert len(flat) < len(list(w.engine.module.parameters()))  # views share storage
        # the buckets themselves without Ray; object-store references when the test process
        # has joined one (a fetched bucket is rebuilt from what was pickled: the same test)
        export = w.export_weights(0.05)
        assert len(export.buckets) > 1
        for ref in export.buckets:
            bucket = ref if isinstance(ref, list) else ray.get(ref)
            own = sum(t.numel() * t.element_size() for _, t in bucket)
            assert len(pickle.dumps(bucket)) < 1.1 * own + 4096
    finally:
        w.close()
