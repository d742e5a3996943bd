"""Tiny random MiniGPT-v2 files in the ORIGINAL upstream formats, and the sizes of such a model (`TinySizes`).

* `eva_vit_g.pth`-style raw ViT state dict (fp16 tensors like the real file, a position embedding for a
  smaller "checkpoint grid" so that loading interpolates it);
* a MiniGPT checkpoint `{"model": ...}` as upstream's `_save_checkpoint` writes it: llama_proj + LoRA in fp32
  with peft 0.2.0 names (or newer `.default.` names), plus the inv_freq buffers.
The true-size benchmark (backend/bench/true_size.py) writes its files with these, and training/base_weights.py
describes its from-scratch base with `TinySizes` / `TinyUpstreamFiles`; the tests' tiny LLaMA folder and complete
tiny model are in Testing/tiny_upstream_models.py. Same seed, same bytes. Nothing here is loaded by the model code;
it only writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.checkpoint_io import LLM_PREFIX, lora_key
from backend.checkpoints import write_vit_sidecar


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny MiniGPT-v2 (real model: patch 14, width 1408, depth 39, grid 16 -> 32, hidden 4096...)."""

    image_size: int = 56
    patch_size: int = 7  # grid 8 x 8 = 64 patches -> 16 image tokens
    vit_width: int = 176  # heads by upstream's rule: 176 // 88 = 2 (`vit_heads`)
    vit_depth: int = 2
    vit_mlp_hidden: int = 256
    checkpoint_grid: int = 6  # pos_embed stored for a 6 x 6 grid, interpolated to 8 x 8 when loading
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_intermediate: int = 128
    lora_r: int = 64  # with alpha 16: scaling 0.25, as the real model
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def vit_heads(self) -> int:
        """ViT attention heads: upstream's rule width // 88 (at least 1), written beside the ViT file because the
        weights do not tell."""
        return max(1, self.vit_width // 88)


@dataclass(frozen=True)
class TinyUpstreamFiles:
    vit_checkpoint: Path
    llama_dir: Path
    minigpt_checkpoint: Path
    sizes: TinySizes


def build_tiny_vit_checkpoint(path: str | os.PathLike, sizes: TinySizes = TinySizes(), seed: int = 0) -> Path:
    """Raw EVA ViT state dict (keys as in eva_vit_g.pth) in fp16, like the real file, and its head-count sidecar."""
    generator = torch.Generator().manual_seed(seed)
    width, hidden, patch = sizes.vit_width, sizes.vit_mlp_hidden, sizes.patch_size

    def rand(*shape: int, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale + offset).half()

    state = {
        "cls_token": rand(1, 1, width, scale=0.5),
        "pos_embed": rand(1, 1 + sizes.checkpoint_grid ** 2, width, scale=0.5),
        "patch_embed.proj.weight": rand(width, 3, patch, patch, scale=0.1),
        "patch_embed.proj.bias": rand(width),
    }
    for block in range(sizes.vit_depth):
        prefix = f"blocks.{block}."
        state.update({
            prefix + "norm1.weight": rand(width, scale=0.1, offset=1.0), prefix + "norm1.bias": rand(width),
            prefix + "attn.qkv.weight": rand(3 * width, width, scale=0.1),
            prefix + "attn.q_bias": rand(width), prefix + "attn.v_bias": rand(width),
            prefix + "attn.proj.weight": rand(width, width), prefix + "attn.proj.bias": rand(width),
            prefix + "norm2.weight": rand(width, scale=0.1, offset=1.0), prefix + "norm2.bias": rand(width),
            prefix + "mlp.fc1.weight": rand(hidden, width, scale=0.1), prefix + "mlp.fc1.bias": rand(hidden),
            prefix + "mlp.fc2.weight": rand(width, hidden), prefix + "mlp.fc2.bias": rand(width),
        })
    torch.save(state, path)
    write_vit_sidecar(path, sizes.vit_heads)
    return Path(path)


def build_tiny_minigpt_checkpoint(path: str | os.PathLike, sizes: TinySizes = TinySizes(), seed: int = 2,
                                  peft_names: str = "0.2.0", with_ln_vision: bool = False) -> Path:
    """`{"model": {...}, "epoch": 0}`: llama_proj and LoRA A/B (B non-zero, so LoRA changes the output) in fp32."""
    if peft_names not in ("0.2.0", "new"):
        raise ValueError(f"peft_names must be '0.2.0' or 'new', got {peft_names!r}")
    generator = torch.Generator().manual_seed(seed)
    hidden, r = sizes.llm_hidden, sizes.lora_r
    state = {
        "llama_proj.weight": torch.randn(hidden, 4 * sizes.vit_width, generator=generator) * 0.05,
        "llama_proj.bias": torch.randn(hidden, generator=generator) * 0.05,
    }
    for layer in range(sizes.llm_layers):
        for target in sizes.lora_targets:
            state[lora_key(layer, target, "A")] = torch.randn(r, hidden, generator=generator) * 0.1
            state[lora_key(layer, target, "B")] = torch.randn(hidden, r, generator=generator) * 0.1
        state[f"{LLM_PREFIX}model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = rotary_inv_freq(sizes).float()
    if with_ln_vision:
        state["ln_vision.weight"] = 1 + torch.randn(sizes.vit_width, generator=generator) * 0.1
        state["ln_vision.bias"] = torch.randn(sizes.vit_width, generator=generator) * 0.1
    if peft_names == "new":
        state = {name.replace(".lora_A.weight", ".lora_A.default.weight")
                 .replace(".lora_B.weight", ".lora_B.default.weight"): tensor for name, tensor in state.items()}
    torch.save({"model": state, "epoch": 0}, path)
    return Path(path)


def rotary_inv_freq(sizes: TinySizes) -> torch.Tensor:
    """The `rotary_emb.inv_freq` buffer of one LLaMA layer, which transformers 4.30 saved with the weights (so it is
    in upstream's checkpoints and legacy LLaMA folders; our loaders must skip it)."""
    head_dim = sizes.llm_hidden // sizes.llm_heads
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
