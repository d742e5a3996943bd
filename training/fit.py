"""One stage of the cascaded LoRA fine-tune (`minigpt-pancreas-train fit CONFIG.json`), top to bottom.

Upstream's recipe (docs/upstream.md section 5.1), kept exactly unless noted:
* trainable: llama_proj + the LoRA matrices (the ViT, ln_vision and the LLaMA stay frozen). The demo cascade's
  stage 0 (`"train": "all"`, usually from `"scratch"`) trains every parameter but LoRA instead, standing in for
  MiniGPT-v2's own pre-training, and writes its base into each model folder (`training.base_weights`); before
  it, `"train": "vision"` trains the vision tower alone on the patch-grounding loss (the language model is not
  run, so a step costs about a third), standing in for the EVA-CLIP pre-training MiniGPT-v2's tower came with;
* AdamW, betas (0.9, 0.999), weight decay 0.05 on matrices, 0 on biases and norms;
* LR per iteration from `lr_at` (upstream's LinearWarmupCosineLRScheduler); an "epoch" is `iters_per_epoch`
  iterations, each one batch from ONE dataset chosen by sample ratio (`training.data`);
* AMP on CUDA: float16 weights + autocast + GradScaler; no gradient clipping unless `grad_clip` is set. Stages
  that train base weights ("all", "vision") keep them in float32 and compute under autocast in the half dtype
  (a bfloat16 weight cannot take AdamW's small updates);
* gradient accumulation: the loss is divided by the number of accumulated batches (upstream summed them; the
  default of 1 makes both the same);
* a checkpoint after every epoch and at the end: `checkpoint_{epoch}.pth` in upstream's format plus
  `model_epoch_{epoch}/` in ours (layout: training/config.py). Resuming restores weights, optimizer, scaler,
  step and every random state, so a resumed run computes what an uninterrupted one would.

Several GPUs: `torchrun --nproc-per-node 4 -m training.cli fit CONFIG.json` (DistributedDataParallel; each
process draws its own batches of `batch_size`; rank 0 writes the files).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backend.checkpoint_io import CheckpointError, load_torch_file, to_internal_name, to_upstream_name
from backend.checkpoints import load_upstream
from backend.config import MiniGPTConfig
from backend.model import MiniGPTv2
from backend.model_dir import load_model, read_manifest, save_model_dir
from SlicerMiniGPTPancreas.atomic import atomic_write, atomic_write_bytes, staged_folder
from training.base_weights import ScratchSizes, write_initial_base, write_trained_base
from training.config import (LATEST_FILE, LOG_FILE, SCRATCH_FOLDER, FitConfig, FitConfigError, checkpoint_name,
                             model_dir_name, prepare_output_dir, resolve_previous_stage)
from training.answer_value import AnswerValueLoss
from training.data import TrainingData
from training.patch_grounding import PatchGroundingLoss


@dataclass(frozen=True)
class FitResult:
    model: MiniGPTv2  # the trained model, in eval mode
    step: int  # iterations done in total (including those before a resume)
    latest: dict[str, Any] | None  # the record of latest.json: step, epoch, checkpoint, model_dir


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def lr_at(step: int, cfg: FitConfig) -> float:
    """Upstream's LinearWarmupCosineLRScheduler before global iteration `step` (0-based, = epoch * ipe + i).

    While step < warmup_steps: warmup_lr + (init_lr - warmup_lr) * i / warmup_steps, at most init_lr, where i is
    the iteration WITHIN the epoch (upstream passes that, so a warmup longer than an epoch restarts each epoch).
    Then cosine from init_lr to min_lr over all max_epoch * iters_per_epoch iterations, by the global step.
    """
    if step < cfg.warmup_steps:
        i = step % cfg.iters_per_epoch
        return min(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * i / max(cfg.warmup_steps, 1))
    return (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / cfg.total_steps)) + cfg.min_lr


def build_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors; no weight decay for 1-d tensors or names with bias / ln / bn."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.ndim < 2 or any(part in to_upstream_name(name) for part in ("bias", "ln", "bn"))
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for every tensor; upstream's per-tensor update cost a 2-core CPU 27 ms a stage 0 step, this 7
    return torch.optim.AdamW(groups, lr=cfg.init_lr, betas=cfg.betas, fused=True)


def fit(cfg: FitConfig, resume: bool = False, force: bool = False) -> FitResult:
    """Train one stage as `cfg` says; `resume` continues the run in cfg.output_dir, `force` replaces it."""
    procs = Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(cfg.device, procs)
    dtype = resolve_dtype(cfg.precision, device)
    if procs.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # every task entry and image is checked before anything is written or the (slow) model is loaded
    data = TrainingData(cfg.datasets, cfg.batch_size, starting_image_size(cfg), cfg.seed, procs.rank,
                        procs.world_size, cfg.num_workers, cfg.augment)
    latest = _broadcast(prepare_output_dir(cfg, resume, force) if procs.rank == 0 else None, procs)
    torch.manual_seed(cfg.seed + procs.rank)  # upstream: seed + rank; LoRA dropout draws from it
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    model = load_starting_model(cfg, torch.float32 if cfg.train != "lora" else dtype, device)
    model.compute_dtype = dtype  # autocast's dtype (model.autocast); the weights stay as loaded
    _choose_trained_parameters(model, cfg.train)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model.llama_model)
    trained = _LossModule(model, cfg)
    optimizer = build_optimizer(trained, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    step = restore_checkpoint(cfg.output_dir / latest["checkpoint"], trained, optimizer, scaler, data, procs) \
        if latest else 0
    loss_of = trained if procs.world_size == 1 else nn.parallel.DistributedDataParallel(
        trained, device_ids=[device.index] if device.type == "cuda" else None)
    log = RunLog(cfg, procs.rank, step)
    log.say(_describe(cfg, model, data, device, dtype, procs, latest))

    model.train()
    try:
        # a recomputing (checkpointed) backward must use the forward's kernel
        with attention_kernel(device), _without_frozen_lora(model, cfg.train):
            while step < cfg.last_step:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = data.next_batch()
                step += 1
                update = step % cfg.grad_accumulation == 0
                # DDP averages gradients over processes only on the backward that precedes an optimizer step
                with nullcontext() if update or procs.world_size == 1 else loss_of.no_sync():
                    with model.autocast():
                        # rows on generate's prompt layout (stage 0 only); torch's generator, so a resume redraws them
                        inference = (torch.rand(len(batch.answers)) < cfg.inference_layout_share).tolist() \
                            if cfg.inference_layout_share else None
                        loss = loss_of(batch.pixels.to(device), batch.instructions, batch.answers, batch.grounding,
                                       inference)
                    scaler.scale(loss / cfg.grad_accumulation).backward()
                if update:
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_([p for p in trained.parameters() if p.requires_grad], cfg.grad_clip)
                    scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                log.step(step, _mean_over_processes(loss.detach(), procs), lr)
                if step % cfg.iters_per_epoch == 0 or step == cfg.last_step:
                    latest = save_checkpoint(cfg, step, trained, optimizer, scaler, data, procs)
                    log.checkpoint(latest)
    finally:
        log.flush()
        data.close()
        if procs.world_size > 1:
            dist.destroy_process_group()
    return FitResult(model.eval(), step, latest)


class _LossModule(nn.Module):
    """What one step minimises: the answer loss, plus stage 0's auxiliary losses when they are on (their weights
    in the config). A module, so that DistributedDataParallel synchronises every gradient and the optimizer sees
    the auxiliary heads too."""

    def __init__(self, model: MiniGPTv2, cfg: FitConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.grounding = PatchGroundingLoss(model) if cfg.patch_grounding else None
        self.answer_value = AnswerValueLoss(model) if cfg.answer_value else None

    def forward(self, pixels: torch.Tensor, instructions: list[str], answers: list[str],
                grounding: list[dict[str, str]], inference_layout: list[bool] | None) -> torch.Tensor:
        if self.cfg.train == "vision":  # the tower alone: its features feed only the grounding head
            self.model.encode_images(pixels)
            return self.cfg.patch_grounding * self.grounding(grounding)
        output = self.model.training_forward(pixels, instructions, answers, inference_layout,
                                             keep_hidden=self.answer_value is not None)
        loss = output.loss
        if self.grounding is not None:
            loss = loss + self.cfg.patch_grounding * self.grounding(grounding)
        if self.answer_value is not None:
            loss = loss + self.cfg.answer_value * self.answer_value(output)
        return loss

    def auxiliary_heads(self) -> dict[str, nn.Module]:
        """The heads of the auxiliary losses that are on: kept in checkpoints for resuming, never exported."""
        return {name: loss.head for name, loss in (("grounding", self.grounding), ("answer_value", self.answer_value))
                if loss is not None}


# ---------------------------------------------------------------------------------- device, precision, model

def resolve_device(name: str, procs: Processes) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise FitConfigError(f"'device': {name!r} is not a device such as 'cpu', 'cuda' or 'cuda:1'.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FitConfigError(f"'device' is {name!r} but CUDA is not available here; use 'cpu' or 'auto'.")
        device = torch.device("cuda", procs.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def attention_kernel(device: torch.device):
    """The attention kernel of a training step: on CPU the plain (math) one, because at the demo's short sequences
    the fused kernel's backward alone took a quarter of a stage 0 step (a step 10-20 % faster without it)."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else nullcontext()


def slow_bfloat16_note(dtype: torch.dtype, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """What to know when bfloat16 autocast is asked of a CPU without native bfloat16 (None otherwise, or when the
    CPU's features cannot be read). Measured on a 2-core Xeon with AVX-512 but no BF16: a bfloat16 matrix product
    at a quarter of float32's rate, the demo's tower stage 2.6x slower than in float32."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    try:
        features = set(cpuinfo.read_text().split())
    except OSError:
        return None
    if not features or features & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 flags; "bf16" on Arm
        return None
    return ("this CPU has no native bfloat16 (no AVX-512 BF16, AMX or Arm BF16), so bfloat16 autocast runs slower "
            "than float32 here; \"precision\": \"float32\" is faster and trains to other numbers.")


@contextmanager
def _without_frozen_lora(model: MiniGPTv2, train: str):
    """Stage 0 ("all") keeps LoRA frozen at B = 0, where it adds nothing to the output but costs its dropout and two
    small matmuls per q/v projection (~5 % of a CPU stage 0 step): the stage runs with the adapters off."""
    if train != "all":
        yield
        return
    with model.llama_model.disable_adapter():
        yield
    _choose_trained_parameters(model, train)  # peft's re-enabling marks the LoRA matrices trainable again


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' and autocast's dtype: "auto" is upstream's float16 AMP on CUDA and float32 elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "float16" and device.type != "cuda":
        raise FitConfigError("'precision': float16 training needs a CUDA device; use bfloat16 or float32 on "
                             f"{device.type}.")
    return getattr(torch, precision)


def load_starting_model(cfg: FitConfig, dtype: torch.dtype, device: torch.device) -> MiniGPTv2:
    source = cfg.model
    if source.kind == "scratch":  # the same seed writes the same files, so a resumed run rebuilds them equal
        files = write_initial_base(cfg.output_dir / SCRATCH_FOLDER, ScratchSizes(**source.scratch), cfg.seed)
        return load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                             image_size=source.scratch["image_size"], dtype=dtype, device=device)
    if source.kind == "upstream":
        return load_upstream(source.vit_checkpoint, source.llama_dir, source.checkpoint,
                             image_size=source.image_size, dtype=dtype, device=device)
    return load_model(_starting_folder(cfg), dtype=dtype, device=device)


def _choose_trained_parameters(model: MiniGPTv2, train: str) -> None:
    """"lora": as loaded (llama_proj + LoRA). "all": ViT, ln_vision, llama_proj and the whole LLaMA learn; LoRA
    stays frozen (B = 0: no effect). "vision": ViT and ln_vision only."""
    if train == "lora":
        return
    tower = ("visual_encoder.", "ln_vision.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" not in name and (train == "all" or name.startswith(tower)))


def starting_image_size(cfg: FitConfig) -> int:
    """The model's input side, known before loading it (a model folder records it in its manifest)."""
    if cfg.model.kind == "scratch":
        return cfg.model.scratch["image_size"]
    if cfg.model.kind == "upstream":
        return cfg.model.image_size
    return MiniGPTConfig.from_dict(read_manifest(_starting_folder(cfg))["config"]).vision.image_size


def _starting_folder(cfg: FitConfig) -> Path:
    source = cfg.model
    return source.model_dir if source.kind == "model_dir" else resolve_previous_stage(source.previous_stage,
                                                                                     source.epoch)


def _enable_gradient_checkpointing(llm: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        llm.activation_checkpointing_enable(kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------------------------------------- checkpoints

def upstream_state(model: MiniGPTv2) -> dict[str, torch.Tensor]:
    """The checkpoint's "model": llama_proj + LoRA under peft 0.2.0 names, plus ln_vision when it is not the
    identity (upstream's strict=False loading takes it, and dropping it would change the model)."""
    state = {name: tensor.cpu() for name, tensor in model.trainable_state_dict().items()}
    norm = model.ln_vision
    if not (bool((norm.weight == 1).all()) and bool((norm.bias == 0).all())):
        state.update({f"ln_vision.{key}": value.detach().cpu() for key, value in norm.state_dict().items()})
    return state


def save_checkpoint(cfg: FitConfig, step: int, trained: _LossModule, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, data: TrainingData, procs: Processes) -> dict[str, Any]:
    """Write model_epoch_{e}/, then checkpoint_{e}.pth, then latest.json (rank 0); return latest.json's record.
    The auxiliary heads (stage 0) are kept in the checkpoint for resuming, never in the model folder."""
    model = trained.model
    epoch = (step - 1) // cfg.iters_per_epoch
    random_states = _gather({"data": data.state_dict(), "torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, procs)
    record = {"step": step, "epoch": epoch, "epoch_complete": step % cfg.iters_per_epoch == 0,
              "checkpoint": checkpoint_name(epoch), "model_dir": model_dir_name(epoch)}
    if procs.rank == 0:
        out = cfg.output_dir
        with staged_folder(out / record["model_dir"]) as staging:
            base = write_trained_base(model, staging) if cfg.train != "lora" else None
            save_model_dir(model, staging, hash_base_files=cfg.hash_base_files, base=base)
            staging.chmod(0o755)  # a temporary folder is private (0700); a model folder is meant to be shared
        payload = {"model": upstream_state(model), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                   "epoch": epoch, "config": cfg.to_dict(), "step": step, "random_states": random_states,
                   "auxiliary_heads": {name: head.state_dict() for name, head in trained.auxiliary_heads().items()}}
        atomic_write(out / record["checkpoint"], lambda temporary: torch.save(payload, temporary))
        atomic_write_bytes(out / LATEST_FILE, (json.dumps(record, indent=1) + "\n").encode())
    _barrier(procs)
    return record


def restore_checkpoint(path: Path, trained: _LossModule, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler, data: TrainingData, procs: Processes) -> int:
    """Load a checkpoint written by `save_checkpoint` into the run's objects; return its step."""
    state = load_torch_file(path, "fit checkpoint")
    model = trained.model
    for name, head in trained.auxiliary_heads().items():
        head.load_state_dict(state["auxiliary_heads"][name])
    parameters = model.state_dict(keep_vars=True)
    names = {name: to_internal_name(name, model.config.lora_target_modules) for name in state["model"]}
    missing = sorted(set(model.trainable_state_dict()) - set(state["model"]))
    unknown = sorted(name for name, internal in names.items() if internal not in parameters)
    if missing or unknown:
        raise CheckpointError(f"{path} does not fit this model (missing {missing[:3]}, unknown {unknown[:3]}); "
                              "it belongs to another run. Start over with --force.")
    with torch.no_grad():
        for name, tensor in state["model"].items():
            parameters[names[name]].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    mine = state["random_states"]
    if len(mine) == procs.world_size:
        data.load_state_dict(mine[procs.rank]["data"])
        torch.set_rng_state(mine[procs.rank]["torch"])
        if mine[procs.rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine[procs.rank]["cuda"])
    elif procs.rank == 0:
        print(f"note: {path} was written by {len(mine)} processes, this run has {procs.world_size}; weights and "
              "optimizer are restored, the data order starts afresh.", flush=True)
    return int(state["step"])


# -------------------------------------------------------------------------------------- processes, logging

def _broadcast(value: Any, procs: Processes) -> Any:
    if procs.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, procs: Processes) -> list[Any]:
    if procs.world_size == 1:
        return [value]
    values = [None] * procs.world_size
    dist.all_gather_object(values, value)
    return values


def _barrier(procs: Processes) -> None:
    if procs.world_size > 1:
        dist.barrier()


def _mean_over_processes(loss: torch.Tensor, procs: Processes) -> float:
    if procs.world_size > 1:
        dist.all_reduce(loss)
        loss = loss / procs.world_size
    return float(loss)


class RunLog:
    """Progress on stdout every `log_every` steps and one JSON line per step in log.jsonl (rank 0 only).

    On resume the log is cut back to the checkpoint's step, so it always describes the run that the weights are.
    """

    def __init__(self, cfg: FitConfig, rank: int, start_step: int) -> None:
        self.cfg, self.active, self.file = cfg, rank == 0, cfg.output_dir / LOG_FILE
        self.pending: list[dict[str, Any]] = []
        self.mark = (start_step, time.monotonic())  # (step, time) of the last progress line, for it/s
        if self.active and self.file.is_file():
            kept = [line for line in self.file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            atomic_write_bytes(self.file, "".join(line + "\n" for line in kept).encode())

    def say(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float) -> None:
        epoch = (step - 1) // self.cfg.iters_per_epoch
        self.pending.append({"step": step, "epoch": epoch, "loss": loss, "lr": lr})
        if step % self.cfg.log_every == 0 or step == self.cfg.last_step:
            (done, since), now = self.mark, time.monotonic()
            self.mark = (step, now)
            self.say(f"step {step}/{self.cfg.last_step} epoch {epoch} loss {loss:.4f} lr {lr:.3g} "
                     f"{(step - done) / max(now - since, 1e-9):.2f} it/s")
            self.flush()

    def checkpoint(self, record: dict[str, Any]) -> None:
        self.pending.append({"event": "checkpoint", **record})
        self.flush()
        self.say(f"saved {record['checkpoint']} and {record['model_dir']}/ (step {record['step']})")

    def flush(self) -> None:
        if self.active and self.pending:
            with open(self.file, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in self.pending)
        self.pending.clear()


_TRAINED = {"lora": "llama_proj + LoRA", "all": "every base parameter", "vision": "the vision tower alone"}


def _describe(cfg: FitConfig, model: MiniGPTv2, data: TrainingData, device: torch.device, dtype: torch.dtype,
              procs: Processes, latest: dict[str, Any] | None) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"fit {cfg.stage or cfg.output_dir.name}: {cfg.model.kind} model, {trainable:,} trainable parameters "
             f"({_TRAINED[cfg.train]}), "
             f"{device} {str(dtype).replace('torch.', '')}, {procs.world_size} process(es)"]
    lines += [f"  {d.name}: {len(d)} entries, sample_ratio {d.spec.sample_ratio:g}" for d in data.datasets]
    lines += [f"  note: {note}" for note in [slow_bfloat16_note(dtype, device)] if note]
    start = f"resuming after step {latest['step']}" if latest else "starting"
    lines.append(f"  {start}; {cfg.last_step} of {cfg.total_steps} steps ({cfg.max_epoch} epochs of "
                 f"{cfg.iters_per_epoch}), batch {cfg.batch_size} x {cfg.grad_accumulation}; output {cfg.output_dir}")
    return "\n".join(lines)
