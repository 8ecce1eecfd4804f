"""Weight pushes into a real vLLM engine (CPU, in-process) reach the kernels that compute, and
the post-sync audit catches what does not: a tied output head left out, one layer's stale
values, a module that computes with other weights than those pushed. In float32 and bfloat16,
on a tied-embedding model (as SmolLM2, Qwen2.5 <= 3B and Llama-3.2 1B/3B are)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.actors.trainer import pack_sequences, token_logprobs
from cai_ray.actors.weight_sync import checksum, export_names, named_tensors
from cai_ray.config import EngineConfig, ModelSpec, RoleResources

IDS = [3, 40, 41, 200, 7, 99, 12, 350, 6, 77, 501, 9, 18, 19, 20, 300]


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with tied input/output embeddings, saved as HF does (no lm_head.weight
    in the file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = src.config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    state = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request: pytest.FixtureRequest, tied_model_dir: Path
           ) -> Iterator[tuple[str, ActorGroup[RolloutWorker]]]:
    dtype = request.param
    g = ActorGroup("rollout", RolloutWorker, RoleResources(), local=True,
                   init_args=(ModelSpec(path=str(tied_model_dir)),
                              EngineConfig(dtype=dtype, max_model_len=256, kv_cache_gib=1),
                              "cpu", 0))
    yield dtype, g
    g.shutdown()


def _trainer_model(path: Path, dtype: str, seed: int) -> torch.nn.Module:
    """The engine's initial weights moved as a few optimizer steps would move them."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


def _push(g: ActorGroup[RolloutWorker], model: torch.nn.Module, version: int,
          names: list[str] | None = None,
          stale: dict[str, torch.Tensor] | None = None) -> object:
    live = named_tensors(model)
    sent = [(n, (stale or {}).get(n, live[n]).detach().clone())
            for n in (names or export_names(model))]
    sums = {n: checksum(live[n]) for n in export_names(model)}  # the trainer's own tensors
    g.call(0, RolloutWorker.update_weights, version, weights=sent, checksums=sums)
    return g.call(0, RolloutWorker.sync_report)


def _probe_diff(g: ActorGroup[RolloutWorker], model: torch.nn.Module) -> float:
    got = g.call(0, RolloutWorker.prompt_logprobs, [IDS])[0]
    with torch.no_grad():
        ids, attn, mask = pack_sequences([(IDS[:1], IDS[1:])], 0, 256)
        ref = token_logprobs(model, ids, attn, mask)[0].tolist()
    return max(abs(a - b) for a, b in zip(got, ref, strict=True))


def test_a_full_push_passes_the_audit_and_the_probe(engine, tied_model_dir: Path) -> None:
    dtype, g = engine
    model = _trainer_model(tied_model_dir, dtype, seed=1)
    report = _push(g, model, 1)
    assert report.ok, report.problem()
    assert report.modules >= 10 and report.tensors == len(export_names(model))
    assert report.worst_rel_err <= report.tolerance
    if dtype == "float32":  # the engine runs exactly the pushed weights
        assert _probe_diff(g, model) < 1e-3


def test_a_push_without_the_tied_head_is_caught(engine, tied_model_dir: Path) -> None:
    """`named_parameters()` lists a tied tensor once: the head is never sent, and vLLM keeps
    its initial head however the policy trains. The audit names it, in either dtype."""
    dtype, g = engine
    model = _trainer_model(tied_model_dir, dtype, seed=2)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "lm_head.weight" in export_names(model)
    report = _push(g, model, 2, names=names)
    assert not report.ok and report.missing == ("lm_head.weight",), report.problem()
    if dtype == "float32":  # and it matters: the engine samples from another policy
        assert _probe_diff(g, model) > 1e-2
    assert _push(g, model, 3).ok  # the full push repairs it


def test_one_stale_layer_is_caught(engine, tied_model_dir: Path) -> None:
    dtype, g = engine
    old = _trainer_model(tied_model_dir, dtype, seed=3)
    model = _trainer_model(tied_model_dir, dtype, seed=4)
    layer = "model.layers.1.mlp.down_proj.weight"
    report = _push(g, model, 4, stale={layer: old.state_dict()[layer]})
    assert not report.ok and report.mismatched == (layer,), report.problem()
    assert not report.missing


def test_a_module_computing_with_other_weights_is_caught(engine, tied_model_dir: Path
                                                         ) -> None:
    """The kernel-level check: tensors the audit saw but the engine never loaded (as when a
    loader skips a tied head and its repacked kernel stays stale) fail on the kernels' own
    output, whatever the parameters say."""
    dtype, g = engine
    model = _trainer_model(tied_model_dir, dtype, seed=5)
    assert _push(g, model, 5).ok
    worker = g._actors[0].instance  # in-process: the worker object itself
    audit = worker._audit()
    other = _trainer_model(tied_model_dir, dtype, seed=6)
    live = named_tensors(other)
    for _ in audit.watch((n, live[n]) for n in export_names(other)):
        pass  # seen, not loaded
    report = audit.verify(6)
    assert not report.ok and report.worst_rel_err > report.tolerance, report.problem()
    assert report.worst_module  # names the module


def test_a_directory_load_reaches_the_tied_head(engine, tied_model_dir: Path,
                                                 tmp_path: Path) -> None:
    """Eval and live eval load snapshots from save_pretrained directories, which hold no
    lm_head.weight for a tied model. vLLM's own directory reload skips the head and puts its
    old kernel weights back (the control); our load adds the head and audits the load."""
    dtype, g = engine
    worker = g._actors[0].instance
    control = _trainer_model(tied_model_dir, dtype, seed=8)
    control.save_pretrained(tmp_path / "control")
    worker.llm.collective_rpc("reload_weights",
                              kwargs={"weights_path": str(tmp_path / "control")})
    if dtype == "float32":  # vLLM's path: the body is new, the head is the engine's old one
        assert _probe_diff(g, control) > 1e-2
    model = _trainer_model(tied_model_dir, dtype, seed=7)
    model.save_pretrained(tmp_path / "snap")
    g.call(0, RolloutWorker.update_weights, 7, path=str(tmp_path / "snap"))
    report = g.call(0, RolloutWorker.sync_report)
    assert report is not None and report.ok, report.problem() if report else None
    assert "lm_head.weight" in worker._audit().last_received
    if dtype == "float32":
        assert _probe_diff(g, model) < 1e-3
