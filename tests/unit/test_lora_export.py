"""LoRA weights out (`export_plan`): what is pushed to vLLM and saved is a plain HF model's
names and values, the adapters merged into a copy: a model of the base class loaded from them
computes exactly what the adapted model computes. The control, the base weights without the
merge, does not; and the live weights stay as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from cai_ray.actors.weight_sync import export_names, export_plan, hf_module


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain_names = list(base.state_dict().keys())
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return base, plain_names, peft.eval()


def _load(base, tensors):
    m = copy.deepcopy(base)
    missing, unexpected = m.load_state_dict(tensors, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m.eval()


def test_names_are_the_plain_models(models) -> None:
    base, plain_names, peft = models
    assert export_names(peft) == plain_names
    assert not any("lora" in n or "base_layer" in n for n in export_names(peft))
    assert export_names(base) == plain_names  # a plain model exports itself unchanged


def test_merged_weights_compute_what_the_adapted_model_computes(models) -> None:
    base, _, peft = models
    before = {n: p.clone() for n, p in peft.named_parameters()}
    merged = _load(base, {x.name: x.make() for x in export_plan(peft)})
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = hf_module(peft)(ids).logits
        got = merged(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert all(torch.equal(p, before[n]) for n, p in peft.named_parameters())  # a copy
    # the control: the base weights without the adapters compute something else
    unmerged = _load(base, {x.name: x.params[0].detach() for x in export_plan(peft)})
    with torch.no_grad():
        assert (unmerged(ids).logits - want).abs().max() > 1e-3
