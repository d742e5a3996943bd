"""Configuration of the MiniGPT-v2 model: every size the code uses, with the real model's values as defaults.

`VisionConfig` describes the EVA ViT-g tower, `MiniGPTConfig` the rest (token merge, projection, LoRA, prompt
limits). The LLaMA's own sizes stay in the HF folder's `config.json`; `llm_hidden_size` is repeated here because
`llama_proj` needs it. Tiny models of the same code (tests, demos) are just other values of these dataclasses.
Both round-trip through JSON (`to_dict` / `from_dict`), which the own model format stores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from SlicerMiniGPTPancreas.errors import UserError


class ConfigError(UserError, ValueError):
    """A model configuration is inconsistent or cannot be read; the message says which value and why."""


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT-g as MiniGPT-v2 builds it (docs/upstream.md §1.1)."""

    image_size: int = 448  # input side in pixels (square)
    patch_size: int = 14
    width: int = 1408  # embed_dim == num_features
    depth: int = 39  # EVA-CLIP-g has 40 blocks; MiniGPT-v2 / BLIP-2 build 39
    num_heads: int = 16  # not readable from weights (`checkpoints.vit_heads`)
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    layer_norm_eps: float = 1e-6
    checkpoint_grid: int = 16  # grid side of the position embedding stored in eva_vit_g.pth (224 px / 14)

    @property
    def grid_size(self) -> int:
        """Patches per image side at `image_size` (32 for 448 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    def validate(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                f"use a multiple such as {self.grid_size * self.patch_size or self.patch_size}."
            )
        if self.num_heads < 1 or self.width % self.num_heads != 0:
            raise ConfigError(
                f"ViT width {self.width} is not divisible by num_heads {self.num_heads}; "
                "pass a head count that divides the width (vit_num_heads=...)."
            )
        if min(self.width, self.depth, self.mlp_hidden, self.checkpoint_grid) < 1:
            raise ConfigError(f"ViT sizes must be positive, got {self}.")


@dataclass(frozen=True)
class MiniGPTConfig:
    """MiniGPT-v2 around the ViT: ln_vision, token merge, llama_proj, LoRA and prompt limits (spec §1.2-1.4)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    ln_vision_eps: float = 1e-5
    tokens_per_merge: int = 4  # horizontally adjacent patch tokens concatenated into one LLM token
    llm_hidden_size: int = 4096
    lora_r: int = 64
    lora_alpha: float = 16.0  # scaling = alpha / r = 0.25 for the released models
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_txt_len: int = 1024  # answer tokens kept in training (train configs)
    max_context_len: int = 3800  # prompt embeddings kept in training
    chat_max_length: int = 2000  # chat context window incl. max_new_tokens (upstream Chat.answer_prepare)
    llm_attn_implementation: str = "sdpa"  # "eager" is upstream's math; "sdpa" agrees to ~1e-7 and is faster

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image (256 for the real model)."""
        return self.vision.num_patches // self.tokens_per_merge

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def validate(self) -> None:
        self.vision.validate()
        if self.tokens_per_merge < 1 or self.vision.num_patches % self.tokens_per_merge != 0:
            raise ConfigError(
                f"{self.vision.num_patches} patches cannot be merged {self.tokens_per_merge} at a time; "
                "choose image_size so that (image_size / patch_size)^2 is a multiple of tokens_per_merge."
            )
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}.")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty; MiniGPT-v2 uses ('q_proj', 'v_proj').")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MiniGPTConfig":
        data = dict(data)
        vision_data = dict(data.pop("vision", {}))
        _reject_unknown(VisionConfig, vision_data, "vision")
        _reject_unknown(cls, data, "model")
        if "lora_target_modules" in data:
            data["lora_target_modules"] = tuple(data["lora_target_modules"])
        config = cls(vision=VisionConfig(**vision_data), **data)
        config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MiniGPTConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"model config is not valid JSON ({error}).") from error
        if not isinstance(data, dict):
            raise ConfigError("model config JSON must be an object.")
        return cls.from_dict(data)


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {where} config keys {unknown}; known keys are {sorted(known)}. "
            "The file was written by another version of this program."
        )
