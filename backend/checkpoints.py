"""Loading the original MiniGPT-v2 / MiniGPT-Pancreas files: `load_upstream`, size inference and the checked
assembly of the model from a raw ViT state dict, a LLaMA folder and the trainable tensors.

Unlike upstream (`load_state_dict(strict=False)`, result ignored, spec §2.2), every expected tensor is checked:
a missing or mis-shaped one stops loading with a message that lists all of them. Extra keys are reported in
`model.load_report` and logged; `rotary_emb.inv_freq` buffers of transformers 4.30 are ignored silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backend.checkpoint_io import (
    ROTARY_INV_FREQ, CheckpointError, find_problems, load_torch_file, lora_key, normalize_lora_names, refuse,
    tensor_dict, to_internal_name,
)
from backend.config import MiniGPTConfig, VisionConfig
from backend.llm import LoraSettings, load_llm, read_llama_config
from backend.model import MiniGPTv2
from backend.tokenizer import UpstreamLlamaTokenizer
from backend.vision import EvaViT, interpolate_pos_embed

__all__ = ["CheckpointError", "BaseFiles", "load_upstream", "infer_vision_config", "assemble_model"]

log = logging.getLogger(__name__)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EVA_VIT_G_WIDTH, EVA_VIT_G_HEADS = 1408, 16
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_LORA_A_KEY = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_A\.weight$")


@dataclass(frozen=True)
class BaseFiles:
    """Where a model's frozen weights come from (recorded by the own model format)."""

    vit_checkpoint: Path
    llama_dir: Path
    imported_from: Path | None = None  # provenance: the upstream checkpoint the trained tensors were imported from


def load_upstream(vit_checkpoint: str | os.PathLike, llama_dir: str | os.PathLike,
                  minigpt_checkpoint: str | os.PathLike, image_size: int = 448, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", *, vit_num_heads: int | None = None, lora_alpha: float = 16.0,
                  lora_dropout: float = 0.05, lora_target_modules: tuple[str, ...] | None = None,
                  quantization: str | None = None, attn_implementation: str = "sdpa",
                  allow_pickle: bool = False) -> MiniGPTv2:
    """Build MiniGPT-v2 from the original files, offline, and return it in eval mode.

    vit_checkpoint: `eva_vit_g.pth` (raw keys). llama_dir: a LLaMA-2 Hugging Face folder (config.json, weights,
    tokenizer.model). minigpt_checkpoint: a MiniGPT-v2 / MiniGPT-Pancreas `.pth` holding `{"model": ...}`, with
    peft 0.2.0 LoRA names (`...q_proj.lora_A.weight`) or newer ones (`...q_proj.lora_A.default.weight`).

    Sizes are inferred from the files, so smaller models of the same formats load too:
      * ViT width and patch size from `patch_embed.proj.weight` [width, 3, patch, patch]; MLP hidden size from
        `blocks.0.mlp.fc1.weight`; the checkpoint's position grid from `pos_embed` [1, 1 + g*g, width], which is
        interpolated bicubically (float32) to the grid of `image_size`.
      * depth = the number of contiguous `blocks.N` in the file, except that a 1408-wide file with 40 or more
        blocks gives 39: upstream builds 39 blocks and ignores EVA-CLIP-g's 40th (`blocks.39.*`).
      * heads: not stored in weights (`vit_heads`): `vit_num_heads`, else `{"num_heads": N}` in a sidecar JSON
        beside the ViT file (`eva_vit_g.json` for `eva_vit_g.pth`; the files this project writes have one), else
        16 for EVA ViT-g's width 1408. Any other width is refused: a wrong guess gives wrong answers, not an error.
      * LLaMA sizes from `llama_dir/config.json`; LoRA r from the `lora_A` shapes and the LoRA targets from the
        checkpoint's LoRA keys (unless `lora_target_modules` is given); alpha 16 and dropout 0.05 unless given
        (upstream never reads other values from its configs); scaling = alpha / r.
    `ln_vision` comes from the checkpoint when it holds `ln_vision.weight/bias`, else it is the identity (as
    upstream creates it). dtype: float32, float16 or bfloat16 (half: ViT Linear/Conv weights and the LLaMA in that
    dtype, LayerNorms, llama_proj and LoRA in float32, computing under autocast as upstream). quantization: None,
    "8bit" or "4bit" (CUDA + bitsandbytes). Raises CheckpointError naming the file, every missing or mis-shaped
    tensor and what to do.
    """
    vit_raw = tensor_dict(load_torch_file(vit_checkpoint, "EVA ViT checkpoint", allow_pickle), vit_checkpoint,
                          "EVA ViT checkpoint")
    vision = infer_vision_config(vit_raw, image_size, vit_num_heads, vit_checkpoint)
    trainable = read_minigpt_checkpoint(minigpt_checkpoint, allow_pickle)
    llama_config = read_llama_config(llama_dir)
    lora_r, targets = infer_lora(trainable, lora_target_modules, minigpt_checkpoint)
    config = MiniGPTConfig(vision=vision, llm_hidden_size=llama_config.hidden_size, lora_r=lora_r,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=targets,
                           llm_attn_implementation=attn_implementation)
    tokenizer = UpstreamLlamaTokenizer.from_dir(llama_dir)
    base = BaseFiles(Path(vit_checkpoint).resolve(), Path(llama_dir).resolve(), Path(minigpt_checkpoint).resolve())
    return assemble_model(config, vit_raw, base, trainable, Path(minigpt_checkpoint), tokenizer, dtype,
                          torch.device(device), quantization)


def read_minigpt_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The `"model"` state dict of an upstream checkpoint, LoRA names normalised to the peft 0.2.0 form.

    Spec [U]: whether released checkpoints also hold "optimizer" / "scaler" / "epoch" is unverified; only "model"
    is read (as upstream), and entries that `weights_only` loading refuses can be allowed with `allow_pickle`.
    """
    data = load_torch_file(path, "MiniGPT checkpoint", allow_pickle)
    if "model" not in data or not isinstance(data["model"], dict):
        raise CheckpointError(
            f"MiniGPT checkpoint {path} has no 'model' entry (top-level keys: {sorted(map(str, data))[:8]}). "
            "Upstream checkpoints are dicts {'model': state_dict, ...}; pass a checkpoint_*.pth written by the "
            "MiniGPT-v2 / MiniGPT-Pancreas trainer or the released MiniGPT-v2 checkpoint."
        )
    return normalize_lora_names(tensor_dict(data["model"], path, "MiniGPT checkpoint"))


def infer_vision_config(raw: dict[str, torch.Tensor], image_size: int, num_heads: int | None,
                        file: str | os.PathLike) -> VisionConfig:
    """ViT sizes from an `eva_vit_g.pth`-style raw state dict (rules in `load_upstream`'s docstring)."""
    needed = [key for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight") if key not in raw]
    if needed:
        raise CheckpointError(
            f"EVA ViT checkpoint {file} lacks {needed}, so it is not an EVA ViT state dict with raw keys. "
            "Pass eva_vit_g.pth (the BLIP-2 / LAVIS file), not a MiniGPT or LLaMA file."
        )
    width, _, patch, _ = raw["patch_embed.proj.weight"].shape
    blocks = {int(match.group(1)) for key in raw if (match := _BLOCK_KEY.match(key))}
    depth = 0
    while depth in blocks:
        depth += 1
    if depth >= 40 and width == 1408:
        # Spec [U]: whether eva_vit_g.pth holds EVA-CLIP-g's 40th block is unverified. Upstream builds 39 blocks
        # and its strict=False load ignores a 40th, so both kinds of real file load to the same 39-block ViT.
        depth = 39
    grid_tokens = raw["pos_embed"].shape[1] - 1
    heads = vit_heads(width, num_heads, Path(file))
    config = VisionConfig(image_size=image_size, patch_size=patch, width=width, depth=depth, num_heads=heads,
                          mlp_hidden=raw["blocks.0.mlp.fc1.weight"].shape[0], checkpoint_grid=math.isqrt(grid_tokens))
    config.validate()
    return config


def vit_heads(width: int, num_heads: int | None, vit_file: Path) -> int:
    """The ViT head count (rules in `load_upstream`'s docstring): a wrong one gives wrong answers, not an error."""
    if num_heads is not None:
        return num_heads
    sidecar = vit_file.with_suffix(".json")
    if sidecar.is_file():
        return _sidecar_heads(sidecar)
    if width == EVA_VIT_G_WIDTH:
        return EVA_VIT_G_HEADS
    raise CheckpointError(
        f"EVA ViT checkpoint {vit_file} is {width} wide, not EVA ViT-g's {EVA_VIT_G_WIDTH}, and its attention head "
        "count is not stored in the weights. Pass it (vit_num_heads=N, `import-upstream --vit-num-heads N`) or "
        f"write {{\"num_heads\": N}} to {sidecar}.")


def write_vit_sidecar(vit_file: str | os.PathLike, num_heads: int) -> Path:
    """Write `{"num_heads": N}` beside a ViT file we write (`eva_vit.pth` -> `eva_vit.json`), so that loading it
    never has to guess the head count."""
    sidecar = Path(vit_file).with_suffix(".json")
    sidecar.write_text(json.dumps({"num_heads": num_heads}) + "\n", encoding="utf-8")
    return sidecar


def _sidecar_heads(sidecar: Path) -> int:
    try:
        heads = json.loads(sidecar.read_text(encoding="utf-8"))["num_heads"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{sidecar} must be JSON like {{\"num_heads\": 16}} (the ViT head count): "
                              f"{error}") from None
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise CheckpointError(f"{sidecar}: num_heads must be a whole number, got {heads!r}.")
    return heads


def infer_lora(trainable: dict[str, torch.Tensor], targets: tuple[str, ...] | None,
               file: str | os.PathLike) -> tuple[int, tuple[str, ...]]:
    """(r, target modules) from the checkpoint's `lora_A` tensors [r, in_features]."""
    found = {(int(m.group(1)), m.group(2)): tensor.shape for key, tensor in trainable.items()
             if (m := _LORA_A_KEY.match(key))}
    if not found:
        raise CheckpointError(
            f"MiniGPT checkpoint {file} holds no LoRA tensors (expected keys like {lora_key(0, 'q_proj', 'A')}). "
            "MiniGPT-v2 checkpoints always hold LoRA weights; pass a MiniGPT-v2 / MiniGPT-Pancreas checkpoint."
        )
    ranks = sorted({shape[0] for shape in found.values()})
    if len(ranks) != 1:
        raise CheckpointError(f"MiniGPT checkpoint {file} mixes LoRA ranks {ranks}; it is not one model's state.")
    in_file = tuple(sorted({target for _, target in found}))
    return ranks[0], tuple(targets) if targets is not None else in_file


def assemble_model(config: MiniGPTConfig, vit_raw: dict[str, torch.Tensor], base: BaseFiles,
                   trainable: dict[str, torch.Tensor], trainable_file: str | os.PathLike,
                   tokenizer: UpstreamLlamaTokenizer, dtype: torch.dtype, device: torch.device,
                   quantization: str | None = None) -> MiniGPTv2:
    """Check every tensor, then build the model: ViT from `vit_raw`, LLaMA from `base.llama_dir`, and
    llama_proj / LoRA (/ ln_vision, / any other model tensor, as upstream's strict=False would) from
    `trainable` (upstream names, LoRA in peft 0.2.0 form)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}.")
    config.validate()
    report = [f"ViT: {config.vision}", f"LLaMA folder: {base.llama_dir}"]
    # Every check runs before the (slow) LLaMA weights are read.
    vit_state = _checked_vit_state(config.vision, vit_raw, base.vit_checkpoint, report, dtype)
    llama_config = read_llama_config(base.llama_dir)
    if tokenizer.vocab_size > llama_config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} pieces but the LLaMA in {base.llama_dir} "
                              f"only {llama_config.vocab_size} embeddings; tokenizer.model belongs to another model.")
    if llama_config.hidden_size != config.llm_hidden_size:
        raise CheckpointError(f"the LLaMA in {base.llama_dir} is {llama_config.hidden_size} wide, the model config "
                              f"says {config.llm_hidden_size}; pass the LLaMA folder the model was built on.")
    expected = _expected_trainable(config, llama_config, trainable)
    refuse(trainable_file, "MiniGPT checkpoint", find_problems(expected, trainable),
           "The checkpoint does not belong to this LLaMA / ViT (e.g. a 13B checkpoint with a 7B LLaMA, or a "
           "truncated export). Pass the matching files.")
    llm = load_llm(base.llama_dir, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                config.lora_target_modules),
                   dtype, device, quantization, config.llm_attn_implementation)
    with torch.device("meta"):  # ViT, ln_vision and llama_proj are filled from the files below, not initialised
        model = MiniGPTv2(config, llm, tokenizer, dtype)
    model.visual_encoder.load_state_dict(vit_state, assign=True)
    identity = {"weight": torch.ones(config.vision.width), "bias": torch.zeros(config.vision.width)}
    ln_state = {key: trainable.get(f"ln_vision.{key}", identity[key]).float() for key in identity}
    report.append("ln_vision: from " + (str(trainable_file) if "ln_vision.weight" in trainable else "identity"))
    model.ln_vision.load_state_dict(ln_state, assign=True)
    model.llama_proj.load_state_dict({key: trainable[f"llama_proj.{key}"].float() for key in ("weight", "bias")},
                                     assign=True)
    for part in (model.visual_encoder, model.ln_vision, model.llama_proj):
        part.to(device)
    lora = {name: trainable[name] for name in expected if ".lora_" in name}
    extra = _other_model_tensors(model, trainable, expected, trainable_file, quantization is not None, report)
    parameters = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for upstream_name, tensor in {**lora, **extra}.items():
            parameters[to_internal_name(upstream_name, config.lora_target_modules)].copy_(tensor)
    if dtype != torch.float32:
        model.visual_encoder.cast_matmul_weights_(dtype)
    model.llama_proj.requires_grad_(True)
    model.base_files = base
    model.load_report = report
    for line in report:
        log.info(line)
    return model.eval()


def _checked_vit_state(vision: VisionConfig, raw: dict[str, torch.Tensor], file: Path, report: list[str],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The raw tensors the ViT needs (taken out of `raw`): Conv2d/Linear weights in `dtype` as
    `EvaViT.cast_matmul_weights_` makes them, the rest upcast to float32 (exact); `pos_embed` interpolated to the new
    grid. Taking them out one at a time keeps the real 2 GB file from being held twice (or as 4 GB of float32)
    while the LLaMA loads."""
    with torch.device("meta"):
        tower = EvaViT(vision)
    expected = {key: tuple(value.shape) for key, value in tower.state_dict().items()}
    matmul = {f"{name}.{key}" for name, module in tower.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
              for key, _ in module.named_parameters(recurse=False)}
    ignored = sorted(set(raw) - set(expected))
    state = {key: raw.pop(key).to(dtype if key in matmul else torch.float32) for key in expected if key in raw}
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and pos_embed.dim() == 3 and pos_embed.shape[-1] == vision.width:
        try:
            state["pos_embed"] = interpolate_pos_embed(pos_embed, vision.grid_size)
        except ValueError:
            pass  # a non-square grid stays as it is and is reported as mis-shaped below
    refuse(file, "EVA ViT checkpoint", find_problems(expected, state),
           "Pass the original eva_vit_g.pth (re-download it if it is damaged).")
    if ignored:
        report.append(f"ignored {len(ignored)} tensor(s) of {file} that the {vision.depth}-block ViT does not use: "
                      + _short_list(ignored))
    return state


def _expected_trainable(config: MiniGPTConfig, llama_config, trainable: dict[str, torch.Tensor]
                        ) -> dict[str, tuple[int, ...]]:
    """Upstream names and shapes of llama_proj, every LoRA matrix and (when the file has it) ln_vision."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # the LLaMA's layer shapes without allocating or reading weights
        layers = LlamaForCausalLM(llama_config).model.layers
    width = config.vision.width
    expected = {"llama_proj.weight": (config.llm_hidden_size, width * config.tokens_per_merge),
                "llama_proj.bias": (config.llm_hidden_size,)}
    for index, layer in enumerate(layers):
        for target in config.lora_target_modules:
            linear = getattr(layer.self_attn, target, None)
            if linear is None:
                raise CheckpointError(f"LoRA target {target!r} is not a LLaMA attention projection "
                                      "(q_proj, k_proj, v_proj, o_proj).")
            expected[lora_key(index, target, "A")] = (config.lora_r, linear.in_features)
            expected[lora_key(index, target, "B")] = (linear.out_features, config.lora_r)
    if "ln_vision.weight" in trainable or "ln_vision.bias" in trainable:
        expected.update({f"ln_vision.{key}": (width,) for key in ("weight", "bias")})
    return expected


def _other_model_tensors(model: MiniGPTv2, trainable: dict[str, torch.Tensor], expected: dict, file,
                         quantized: bool, report: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of `trainable` beyond the expected ones that name a model tensor of the same shape: upstream's
    `load_state_dict(strict=False)` loads those over the base files, so they are loaded here too. Others are
    reported and ignored; transformers 4.30's `rotary_emb.inv_freq` buffers are ignored silently."""
    model_tensors = model.state_dict(keep_vars=True)
    extra, unknown = {}, []
    for name, tensor in trainable.items():
        if name in expected or ROTARY_INV_FREQ.search(name):
            continue
        target = model_tensors.get(to_internal_name(name, model.config.lora_target_modules))
        if target is None or tuple(target.shape) != tuple(tensor.shape) or quantized:
            unknown.append(name)
        else:
            extra[name] = tensor
    if extra:
        report.append(f"loaded {len(extra)} frozen tensor(s) from {file} over the base files: " + _short_list(extra))
    if unknown:
        report.append(f"ignored {len(unknown)} unexpected tensor(s) of {file}: " + _short_list(unknown))
        log.warning(report[-1])
    return extra


def _short_list(names) -> str:
    names = sorted(names)
    return ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
