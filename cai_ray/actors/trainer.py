"""Trainer role: a DeepSpeed engine per actor (one actor = one data-parallel rank).

Supervised finetuning here (SL-CAI); PPO adds its losses on the same engine. On CPU DeepSpeed uses
its CPU accelerator with gloo (its default `ccl` backend is not installed); on GPU, NCCL. Ranks
find each other through rank 0's address, which the driver asks for before `setup` runs on every
rank at once.

The loss is taken on the response tokens only, and the vocabulary projection is computed only at
those positions (`selected_token_logprobs`): a 49k-word head over every position would dominate
a CPU step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_ray.actors.group import ActorGroup, Worker, WorkerContext
from cai_ray.actors.weight_sync import export_plan, hf_module
from cai_ray.algorithms.masked import selected_token_logprobs
from cai_ray.config import Config, ModelSpec, TrainerConfig
from cai_ray.hardware import dtype_name, torch_dtype
from cai_ray.messages import SFTSample, TrainStats
from cai_ray.models import load_tokenizer, quiet_weight_loading, resolve
from cai_ray.runtime import device_of, role_group

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def encode_chat(tok: Any, messages: list[dict[str, str]], response: str, limit: int,
                finished: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and response mask: the prompt as the chat template renders it for generation,
    then the response, and EOS only when the response stopped by itself (`finished`): exactly
    the sequence the rollout engine produced. A response cut off at its token budget has no
    EOS: appending one would teach stopping mid-sentence and score an ending never made."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tok.encode(prompt, add_special_tokens=False)
    r_ids = tok.encode(response, add_special_tokens=False) + ([tok.eos_token_id] if finished
                                                              else [])
    if len(p_ids) + len(r_ids) > limit:
        # Keep at least half the window for the response and drop the prompt's oldest tokens
        # (few-shot turns first): the end of the prompt is what the reply answers.
        r_ids = r_ids[: limit - min(len(p_ids), limit // 2)]
        p_ids = p_ids[len(p_ids) - (limit - len(r_ids)):]
    return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)


Sequence = tuple[list[int], list[int]]  # (prompt token ids, response token ids)


def pad_id(tok: Any) -> int:
    """The id right padding uses (0 when the tokenizer has no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def pack_sequences(seqs: list[Sequence], pad: int, limit: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and response mask ([B, T]) for (prompt, response) token
    sequences. A sequence over `limit` tokens loses the oldest prompt tokens, never a response
    token: per-token quantities (log-probs, values) stay aligned with the rollout's tokens."""
    import torch

    rows = []
    for p, r in seqs:
        if len(r) >= limit:
            raise ValueError(f"a response of {len(r)} tokens does not fit trainer.max_length="
                             f"{limit}; raise it or lower the sampling max_new_tokens")
        p = p[max(0, len(p) + len(r) - limit):]
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):  # right padding: positions stay 0..len-1
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        mask[i, len(p): len(p) + len(r)] = True
    return ids, attn, mask


def token_logprobs(model: Any, ids: Any, attn: Any, mask: Any, entropy: bool = False,
                   temperature: float = 1.0, entropy_grad: bool = True) -> tuple[Any, Any]:
    """log p of every masked token given its prefix, flat [N] in row-major order, and (when
    asked) the entropy of each of those next-token distributions [N]. Only the selected
    positions go through the LM head, called as a module so ZeRO-3 gathers it.

    `temperature`: the distribution is softmax(logits / T), the one a sampler at T drew the
    tokens from (PPO's policy is the sampling policy, as in TRL and OpenRLHF); 1 = raw.
    `entropy_grad` False: the entropy is a statistic only, computed outside autograd (no
    [tokens × vocab] softmax kept for a backward that never comes)."""
    import torch

    if temperature <= 0:
        raise ValueError(f"log-probs need a positive temperature, got {temperature}")
    out = model.model(input_ids=ids, attention_mask=attn)
    hidden = out.last_hidden_state[:, :-1]  # position t predicts token t+1
    sel = mask[:, 1:]
    logits = model.lm_head(hidden[sel])
    if temperature != 1.0:
        logits = logits.float() / temperature
    logp = selected_token_logprobs(logits, ids[:, 1:][sel])
    ent = None
    if entropy:  # with gradient, for an entropy bonus; detach it for statistics
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            z = logits.float()
            ent = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return logp, ent


def ds_config(t: TrainerConfig, total_steps: int, world_size: int,
              grad_accum: int | None = None) -> dict[str, Any]:
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    sched: dict[str, Any] | None = None
    if t.lr_schedule != "constant" or warmup:
        sched = {"type": "WarmupCosineLR" if t.lr_schedule == "cosine" else "WarmupDecayLR",
                 "params": {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup}}
        if t.lr_schedule == "constant":
            sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                                                    "warmup_num_steps": max(warmup, 1)}}
        elif t.lr_schedule == "linear":
            sched["params"].update({"warmup_max_lr": t.lr, "warmup_min_lr": 0.0})
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum or t.grad_accum,
        "train_batch_size": t.micro_batch_size * (grad_accum or t.grad_accum) * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype_name(t.dtype) == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if sched:
        cfg["scheduler"] = sched
    return cfg


def node_ip() -> str:
    """This node's IP as Ray reports it; 127.0.0.1 outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    if not ray.is_initialized():
        return "127.0.0.1"
    return str(ray.util.get_node_ip_address())


def build_optimizer(params: Any, t: TrainerConfig, lr: float) -> Any:
    """The optimizer `trainer.optimizer` names: torch AdamW, or DeepSpeed's FusedAdam (CUDA) or
    DeepSpeedCPUAdam (parameters on the CPU, e.g. ZeRO-Offload), which JIT-build on first use.
    All three are AdamW with the same learning rate, betas and (decoupled) weight decay.

    Torch's AdamW runs its fused kernel (one pass over each tensor for the whole update, on
    the CPU and CUDA alike) where this torch has it, as transformers' Trainer does by default;
    else its per-tensor loop of elementwise ops, which costs 3x+ more on the CPU."""
    if t.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=lr, weight_decay=t.weight_decay, adam_w_mode=True)
    if t.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=t.weight_decay, adamw_mode=True)
    import torch

    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)


def with_lora(model: Any, t: TrainerConfig) -> Any:
    """`model` with trainable LoRA adapters on `trainer.lora.target_modules` (peft), the base
    weights frozen. With gradient checkpointing the inputs must carry a gradient for the
    adapters' to flow (peft's documented step)."""
    from peft import LoraConfig, get_peft_model

    lora = t.lora
    if t.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                            lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules),
                                            task_type="CAUSAL_LM"))


def unwrapped_config(module: Any) -> Any:
    """The HF config of a (peft-wrapped) model, as a plain model of its class saves it."""
    return hf_module(module).config


def save_state_dict(tensors: dict[str, Any], out: Path) -> None:
    """Weights as one `model.safetensors` (tied names stored once, as save_pretrained does)."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    kept = {}
    for name, t in tensors.items():
        key = t.data_ptr()
        if key in seen:  # the same storage under two names (a tied head)
            continue
        seen[key] = name
        kept[name] = t.detach().contiguous().cpu()
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})


def quiet_trainer() -> None:
    """Keep a training rank's console to what it is doing: DeepSpeed's calls into torch's
    renamed collectives warn on every step (a FutureWarning each), and transformers draws a
    progress bar for every save of a one-file model."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    quiet_weight_loading()  # transformers' one switch covers its save bars too


class DistributedWorker(Worker):
    """A rank of a torch.distributed group (DeepSpeed on top). The driver asks rank 0 for an
    address, then calls the subclass's `setup` on every rank at once, which joins here."""

    device: str
    comm_backend: str

    def address(self) -> tuple[str, int]:
        """(host, free port) for the process group's and the weight group's rendezvous; asked
        of rank 0. The host is the node's IP as Ray knows it: the hostname's address is
        127.0.1.1 on stock Debian/Ubuntu, which no other node can reach. Outside Ray (the
        in-process mode, one machine) it is the loopback address."""
        return node_ip(), free_port()

    def join_group(self, master_addr: str, master_port: int) -> None:
        import deepspeed

        quiet_trainer()

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.ctx.rank), WORLD_SIZE=str(self.ctx.world_size),
                          LOCAL_RANK="0" if self.device == "cpu" else os.environ.get(
                              "LOCAL_RANK", "0"))
        backend = self.comm_backend
        if backend == "auto":
            backend = "nccl" if self.device == "cuda" else "gloo"
        # On CPU, DeepSpeed builds its shared-memory collective op here and prints that it
        # did, once per rank; anything else it prints still reaches the console.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(dist_backend=backend)
        for line in printed.getvalue().splitlines():
            if "built successfully" in line:
                log.debug("%s", line)
            else:
                print(line)


def checkpoint_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers: the
    only globals a checkpoint may name when it is read back."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(engine: Any) -> None:
    """Make `engine.load_checkpoint` read with `torch.load(weights_only=True)`: DeepSpeed's own
    reader unpickles anything, so a checkpoint handed over from elsewhere could run code.
    Tensors, containers and `checkpoint_globals()` load; any other global is refused."""
    import torch

    allowed = checkpoint_globals()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def start_ranks(group: ActorGroup[Any], setup: Callable[..., int], total_steps: int,
                timeout_s: float) -> None:
    """Ask rank 0 for a rendezvous address, then run `setup` on every rank at once (each
    blocks in init_process_group until all have joined)."""
    host, port = group.call(0, DistributedWorker.address)
    group.get([group.submit(r, setup, host, port, total_steps)
               for r in range(group.num_actors)], timeout=timeout_s)


def save_group_model(group: ActorGroup[Any], save: Callable[..., str], final: Path) -> Path:
    """Every rank runs `save` into a directory beside `final` (ZeRO-3 gathers need all ranks;
    rank 0 writes), then it is renamed into place: a killed save leaves no half model."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    group.call_all(save, str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


class TrainerWorker(DistributedWorker):
    """Hosts the policy in a DeepSpeed engine. Call `address` on rank 0, then `setup` on all."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, trainer: TrainerConfig,
                 device: str = "cpu", seed: int = 0):
        super().__init__(ctx)
        self.spec, self.cfg, self.device, self.seed = model, trainer, device, seed
        self.comm_backend = trainer.comm_backend
        self.engine: Any = None
        self.tokenizer = load_tokenizer(model)
        self.step = 0
        self.grad_accum: int | None = None  # None = trainer.grad_accum

    def setup(self, master_addr: str, master_port: int, total_steps: int) -> int:
        """Join the process group and build the DeepSpeed engine; returns the parameter count."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        self.join_group(master_addr, master_port)
        torch.manual_seed(self.seed + self.ctx.rank)
        dtype = torch_dtype(self.cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            resolve(self.spec), revision=self.spec.revision, dtype=dtype,
            trust_remote_code=self.spec.trust_remote_code)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.cfg.lora.rank:
            model = with_lora(model, self.cfg)
        opt = build_optimizer([p for p in model.parameters() if p.requires_grad], self.cfg,
                              self.cfg.lr)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt,
            config=ds_config(self.cfg, total_steps, self.ctx.world_size, self.grad_accum))
        return sum(p.numel() for p in model.parameters())

    @property
    def policy(self) -> Any:
        """The HF model the forward passes run (with a LoRA model: its base with the adapters
        active, whose `.model` and `.lm_head` the log-prob helpers call)."""
        return hf_module(self.engine.module)

    # --- SFT ------------------------------------------------------------------------------------

    def encode(self, sample: SFTSample) -> tuple[list[int], list[int]]:
        return encode_chat(self.tokenizer, sample.messages, sample.response, self.cfg.max_length,
                           sample.finished)

    def _batch(self, samples: list[SFTSample]) -> tuple[Any, Any, Any]:
        import torch

        enc = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _ in enc)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.bool)
        for i, (x, m) in enumerate(enc):  # right padding: positions stay 0..len-1
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        dev = self.engine.device
        return ids.to(dev), attn.to(dev), mask.to(dev)

    def sequence_logprobs(self, ids: Any, attn: Any, mask: Any) -> Any:
        """log p of every masked token given its prefix: [N] in row-major order."""
        return token_logprobs(self.policy, ids, attn, mask)[0]

    def train_sft(self, samples: list[SFTSample]) -> TrainStats:
        """One micro-batch: forward, backward, and an optimizer step at accumulation
        boundaries (DeepSpeed counts them)."""
        t0 = time.monotonic()
        self.engine.train()
        ids, attn, mask = self._batch(samples)
        logp = self.sequence_logprobs(ids, attn, mask)
        loss = -logp.mean()
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        lr = self.engine.get_lr()[0] if self.engine.lr_scheduler else self.cfg.lr
        norm = self.engine.get_global_grad_norm()
        return TrainStats(step=self.step, loss=float(loss.item()), tokens=int(mask.sum()),
                          lr=float(lr), grad_norm=float(norm) if norm is not None and
                          math.isfinite(float(norm)) else None,
                          seconds=time.monotonic() - t0)

    def eval_sft(self, samples: list[SFTSample]) -> float:
        """Mean response-token NLL without updating anything."""
        import torch

        self.engine.eval()
        with torch.no_grad():
            ids, attn, mask = self._batch(samples)
            return float(-self.sequence_logprobs(ids, attn, mask).mean().item())

    def save(self, path: str) -> str:
        """save_pretrained format (weights gathered under ZeRO-3), written by rank 0 only."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                               enabled=self.cfg.zero_stage == 3):
            if self.ctx.rank == 0:
                out = Path(path)
                out.mkdir(parents=True, exist_ok=True)
                if self.cfg.lora.rank:  # a plain HF model: the adapters merged into a copy
                    merged = {x.name: x.make() for x in export_plan(module)}
                    unwrapped_config(module).save_pretrained(out)
                    save_state_dict(merged, out)
                else:
                    module.save_pretrained(out, safe_serialization=True)
                self.tokenizer.save_pretrained(out)
        return path

    def close(self) -> None:
        self.engine = None


def trainer_group(cfg: Config, model: ModelSpec, total_steps: int) -> ActorGroup[TrainerWorker]:
    device = device_of(cfg)
    return role_group(cfg, "trainer", TrainerWorker, (model, cfg.trainer, device, cfg.run.seed),
                      {"DS_ACCELERATOR": "cpu"} if device == "cpu" else {},
                      lambda g: start_ranks(g, TrainerWorker.setup, total_steps,
                                            cfg.run.startup_timeout_s))
