"""The trainer's GPU path without Ray or vLLM: what can be checked on a machine that has torch,
transformers and DeepSpeed (carried as wheels by `benchmarks/gpu_check.sh`) and nothing else.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--dtype bfloat16|float32] [--out DIR]

For a random Llama with an untied head under ZeRO-3, and one with a tied head under ZeRO-2 and
ZeRO-3 (one rank each, NCCL on CUDA, gloo on CPU), the real trainer worker
(`PPOTrainerWorker`, the class the PPO stage runs on Ray) is built in this process and checked:

- weight metas: every name the engine's loader expects (a tied `lm_head.weight` included), with
  full shapes (`ds_shape` under ZeRO-3) and the training dtype;
- the ZeRO gather (`_gathered`, what both weight-sync transports send): full tensors, equal to
  the HF checkpoint before training; after training the tied head still equals the embedding;
- log-prob agreement at the sampler's temperature (T = 0.7): the trainer's `experience`
  against plain transformers on the same weights, in the same dtype; the control (HF at T = 1)
  must miss the tolerance, and the bf16 error against float32 is reported;
- a bf16 SFT micro-step (`train_sft`) on one batch, five times: finite, decreasing loss;
- a PPO step (`train_ppo`, clipped surrogate, one minibatch): finite stats, and the log-prob of
  the positively-advantaged sequences rises against the negatively-advantaged ones;
- on CUDA: the JIT-built FusedAdam (`trainer.optimizer=fused_adam`) takes a step.

Then an SFT throughput line per ZeRO stage for a ~100M-parameter model (tokens/s, and the
ZeRO-3 / ZeRO-2 ratio measured in the same run; nothing asserted on speed).

Prints one PASS/FAIL line per check and writes them to DIR/gpu_check.json; exits 1 when any
check failed. `--device cpu --dtype float32` runs the same checks here (slowly for the 100M
model: `--no-throughput` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS: list[dict[str, Any]] = []


def record(name: str, ok: bool, **numbers: Any) -> bool:
    RESULTS.append({"check": name, "ok": bool(ok), **numbers})
    detail = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def guarded(name: str, fn: Callable[[], None]) -> None:
    """Run a group of checks; an exception fails the group and the run goes on."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - report and continue with the next group
        record(name, False, error=f"{type(err).__name__}: {err}")
        traceback.print_exc()


def build_models(base: Path, out: Path) -> dict[str, Path]:
    """The built-in tiny Llama (untied head), the same with a tied head, and a ~100M one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cai_ray.models import _build_tiny_llama

    untied = out / "tiny-untied"
    if not (untied / "config.json").exists():
        _build_tiny_llama(untied)
    tok = AutoTokenizer.from_pretrained(untied)
    made = {"untied": untied}
    for name, size in (("tied", dict(hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)),
                       ("100m", dict(hidden_size=768, intermediate_size=2048,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     num_key_value_heads=4))):
        d = out / f"tiny-{name}"
        if not (d / "config.json").exists():
            torch.manual_seed(1)
            cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                              tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              **size)
            LlamaForCausalLM(cfg).save_pretrained(d)
            tok.save_pretrained(d)
        made[name] = d
    return made


def make_worker(model_dir: Path, device: str, dtype: str, zero: int, temperature: float,
                optimizer: str = "adamw", lr: float = 1e-3, mini_batch: int = 8) -> Any:
    from cai_ray.actors.group import WorkerContext
    from cai_ray.actors.ppo import PPOTrainerWorker
    from cai_ray.actors.trainer import free_port
    from cai_ray.config import load_config

    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        f"model.path={model_dir}", f"trainer.zero_stage={zero}", f"trainer.dtype={dtype}",
        f"trainer.lr={lr}", f"trainer.optimizer={optimizer}", "trainer.micro_batch_size=4",
        "ppo.rollout_batch_size=4", "ppo.samples_per_prompt=2",
        f"ppo.mini_batch_size={mini_batch}", "ppo.ppo_epochs=1", "ppo.clip_eps=0.2",
        f"trainer.comm_backend={'nccl' if device == 'cuda' else 'gloo'}"])
    w = PPOTrainerWorker(WorkerContext("trainer", 0, 1), cfg.model, cfg.trainer, cfg.ppo, None,
                         device, 0, temperature)
    w.setup("127.0.0.1", free_port(), 100)
    return w


def hf_logprobs(model: Any, seqs: list[tuple[list[int], list[int]]], temperature: float,
                device: str) -> Any:
    """log softmax(logits / T) of each response token, flat, straight from transformers."""
    import torch

    out = []
    with torch.no_grad():
        for p, r in seqs:
            ids = torch.tensor([p + r], device=device)
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / temperature
            lp = torch.log_softmax(logits, -1)
            out.append(lp.gather(-1, ids[0, len(p):, None])[:, 0])
    return torch.cat(out).cpu()


def random_seqs(n: int, vocab: int, seed: int, prompt: int = 12,
                response: int = 20) -> list[tuple[list[int], list[int]]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, vocab, (prompt,), generator=g).tolist(),
             torch.randint(3, vocab, (response + i % 3,), generator=g).tolist())
            for i in range(n)]


def check_trainer(tag: str, model_dir: Path, device: str, dtype: str, zero: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cai_ray.actors.weight_sync import export_names
    from cai_ray.hardware import torch_dtype
    from cai_ray.messages import Experience, SFTSample

    temp = 0.7
    tdt = torch_dtype(dtype)
    w = make_worker(model_dir, device, dtype, zero, temp)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdt).to(device).eval()
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    name = f"{tag}/zero{zero}"

    metas = w.weight_metas()
    record(f"{name}: weight metas", {m.name: m.shape for m in metas} == want and
           all(m.dtype == dtype for m in metas), tensors=len(metas),
           tied_head_sent=("lm_head.weight" in {m.name for m in metas}),
           zero3_partitioned=sum(1 for p in w.engine.module.parameters()
                                 if getattr(p, "ds_shape", None) is not None and
                                 p.numel() == 0))

    hf_state = hf.state_dict()
    got = {n: t.clone() for n, t in w._gathered()}
    same = [n for n in want if n in got and torch.equal(got[n].to(device), hf_state[n])]
    record(f"{name}: ZeRO gather = checkpoint", len(same) == len(want) and
           list(got) == export_names(w.engine.module), equal=len(same), expected=len(want))

    seqs = random_seqs(8, hf.config.vocab_size, 0)
    trainer_lp = w.experience(seqs).logprobs.float()
    ref_lp = hf_logprobs(hf, seqs, temp, device)
    control = hf_logprobs(hf, seqs, 1.0, device)
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    exact = hf_logprobs(hf32, seqs, temp, device)
    diff = float((trainer_lp - ref_lp).abs().max())
    ctrl = float((trainer_lp - control).abs().max())
    tol = 1e-3 if tdt == torch.float32 else 5e-2
    record(f"{name}: log-probs agree with HF at T={temp}", diff < tol < ctrl, max_diff=diff,
           tolerance=tol, control_T1_diff=ctrl,
           vs_float32_max=float((trainer_lp - exact).abs().max()),
           vs_float32_mean=float((trainer_lp - exact).abs().mean()))
    del hf32

    batch = [SFTSample([{"role": "user", "content": f"Question {i}: how do plants grow?"}],
                       f"Answer {i}: with light, water and care.") for i in range(4)]
    losses, t0 = [], time.monotonic()
    for _ in range(5):
        losses.append(w.train_sft(batch).loss)
    record(f"{name}: {dtype} SFT micro-steps", all(math.isfinite(x) for x in losses) and
           losses[-1] < losses[0], first_loss=losses[0], last_loss=losses[-1],
           seconds_per_step=(time.monotonic() - t0) / 5)

    seqs = random_seqs(8, hf.config.vocab_size, 1)
    old = w.experience(seqs).logprobs
    adv_seq = torch.tensor([1.0, -1.0] * 4)
    adv = torch.cat([adv_seq[i].repeat(len(r)) for i, (_, r) in enumerate(seqs)])
    t0 = time.monotonic()
    stats = w.train_ppo(Experience(seqs, adv, old_logprobs=old))
    new = w.experience(seqs).logprobs
    per = [float((new - old)[sum(len(r) for _, r in seqs[:i]):
                             sum(len(r) for _, r in seqs[:i + 1])].float().mean())
           for i in range(len(seqs))]
    up = sum(per[0::2]) / 4 - sum(per[1::2]) / 4
    record(f"{name}: PPO step", all(math.isfinite(v) for v in stats.metrics().values()) and
           up > 0, logp_gain_pos_minus_neg=up, clip_fraction=stats.clip_fraction,
           seconds=time.monotonic() - t0)

    after = {n: t.clone() for n, t in w._gathered()}
    moved = sum(1 for n in want if not torch.equal(after[n], got[n]))
    tied = bool(hf.config.tie_word_embeddings)
    tie_ok = (not tied) or torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    record(f"{name}: gather after training", moved > 0 and tie_ok, tensors_moved=moved,
           tied_head_equals_embedding=tie_ok if tied else "n/a")
    w.close()
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()


def check_fused_adam(model_dir: Path, dtype: str) -> None:
    t0 = time.monotonic()
    w = make_worker(model_dir, "cuda", dtype, 2, 1.0, optimizer="fused_adam")
    built = time.monotonic() - t0
    from cai_ray.messages import SFTSample

    batch = [SFTSample([{"role": "user", "content": "Hi"}], "Hello there.")] * 4
    losses = [w.train_sft(batch).loss for _ in range(3)]
    record("fused_adam: JIT build and step", type(w.engine.optimizer).__name__ != "AdamW" and
           all(math.isfinite(x) for x in losses) and losses[-1] < losses[0],
           optimizer=type(w.engine.optimizer).__name__, build_seconds=built,
           first_loss=losses[0], last_loss=losses[-1])
    w.close()


def throughput(model_dir: Path, device: str, dtype: str) -> None:
    import torch

    from cai_ray.messages import SFTSample

    text = " ".join(["the assistant answers the question clearly and helpfully"] * 40)
    batch = [SFTSample([{"role": "user", "content": f"{i} {text[:400]}"}], text)
             for i in range(4)]
    rates = {}
    for zero in (2, 3):
        w = make_worker(model_dir, device, dtype, zero, 1.0, lr=1e-5)
        w.train_sft(batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0, tokens = time.monotonic(), 0
        for _ in range(10):
            tokens += w.train_sft(batch).tokens
        if device == "cuda":
            torch.cuda.synchronize()
        rates[zero] = tokens / (time.monotonic() - t0)
        w.close()
        if device == "cuda":
            torch.cuda.empty_cache()
    record("throughput: 100M SFT, one rank", all(r > 0 for r in rates.values()),
           zero2_tokens_per_s=rates[2], zero3_tokens_per_s=rates[3],
           zero3_over_zero2=rates[3] / rates[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-check")))
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    versions: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("transformers", "deepspeed"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            versions[mod] = f"missing ({err})"
    if args.device == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print("environment:", json.dumps(versions), flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        record("cuda available", False)
        return 1
    for mod in ("ray", "vllm"):  # the trainer path must not need them
        if mod in sys.modules:
            record(f"{mod} not imported", False)

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(ROOT, Path(tmp))
        for tag, zero in (("untied", 3), ("tied", 2), ("tied", 3)):
            guarded(f"{tag}/zero{zero}",
                    lambda t=tag, z=zero: check_trainer(t, models[t], args.device, args.dtype, z))
        if args.device == "cuda":
            guarded("fused_adam", lambda: check_fused_adam(models["tied"], args.dtype))
        if not args.no_throughput:
            guarded("throughput", lambda: throughput(models["100m"], args.device, args.dtype))
    for mod in ("ray", "vllm"):
        record(f"ran without {mod}", mod not in sys.modules)
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    summary = {"environment": versions, "results": RESULTS, "failed": failed,
               "seconds": time.monotonic() - t_start}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in "
          f"{summary['seconds']:.0f} s; results in {args.out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
