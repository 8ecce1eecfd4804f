"""`trainer.optimizer` reaches the optimizer the trainers build (it used to be ignored: torch
AdamW was built whatever the config said)."""

from __future__ import annotations

import pytest
import torch

from cai_ray.actors.trainer import build_optimizer
from cai_ray.config import TrainerConfig, load_config
from cai_ray.configschema import ValidationError


def test_adamw_is_torch_adamw_with_the_configured_decay() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(p, TrainerConfig(optimizer="adamw", weight_decay=0.1), lr=2e-5)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 2e-5 and opt.defaults["weight_decay"] == 0.1


@pytest.mark.parametrize("name,cls,mode", [("fused_adam", "FusedAdam", "adam_w_mode"),
                                           ("cpu_adam", "DeepSpeedCPUAdam", "adamw_mode")])
def test_deepspeed_optimizers_are_built_as_adamw(monkeypatch, name: str, cls: str,
                                                 mode: str) -> None:
    import deepspeed.ops.adam as ds_adam

    made: list[dict[str, object]] = []

    class Recorder:
        def __init__(self, params: object, **kw: object) -> None:
            made.append(kw)

    monkeypatch.setattr(ds_adam, cls, Recorder)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))],
                          TrainerConfig(optimizer=name, weight_decay=0.01), lr=1e-4)
    assert isinstance(opt, Recorder)
    assert made == [{"lr": 1e-4, "weight_decay": 0.01, mode: True}]


def test_fused_adam_refused_on_cpu_before_anything_starts() -> None:
    with pytest.raises(ValidationError, match=r"trainer\.optimizer.*fused_adam is a CUDA kernel"):
        load_config(None, ["run.device=cpu", "trainer.optimizer=fused_adam"])
    assert load_config(None, ["run.device=cpu", "trainer.optimizer=cpu_adam"])


def test_torch_adamw_runs_its_fused_kernel_with_the_same_update() -> None:
    torch.manual_seed(0)
    w0, g = torch.randn(64, 32), torch.randn(64, 32)
    t = TrainerConfig(optimizer="adamw", weight_decay=0.1)
    fused_p, loop_p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fused = build_optimizer([fused_p], t, lr=1e-2)
    assert fused.defaults["fused"] is True  # the kernel transformers' Trainer also picks
    loop = torch.optim.AdamW([loop_p], lr=1e-2, weight_decay=0.1)  # the per-tensor loop
    for _ in range(3):
        fused_p.grad, loop_p.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    assert (fused_p - w0).abs().max() > 1e-3  # it moved
    assert torch.allclose(fused_p, loop_p, atol=1e-6)
