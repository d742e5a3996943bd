"""EVA ViT-g vision tower as MiniGPT-v2 builds it (docs/upstream.md §1.1), and its position-embedding interpolation.

Module and parameter names equal the raw keys of `eva_vit_g.pth` (`patch_embed.proj.weight`, `blocks.3.attn.q_bias`,
...), so a checked raw state dict loads without renaming. Pre-norm blocks, LayerNorm eps 1e-6, q/v biases with a
zero k bias, exact GELU, absolute position embedding, no final norm: the output is the last block's output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [B, 3, S, S] -> [B, C, g, g] -> [B, g*g, C], patches in row-major order
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one qkv matrix, learned q and v biases and no k bias."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = (config.width // config.num_heads) ** -0.5
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.width))
        self.v_bias = nn.Parameter(torch.zeros(config.width))
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # [3C]
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # [B, N, 3C]
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, h, N, d]
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, h, N, d]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """`forward([B, 3, S, S]) -> [B, 1 + g*g, width]`, CLS token first, g = S / patch_size."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.shape[-3:] != (3, size, size):
            raise ValueError(
                f"pixel_values must be [B, 3, {size}, {size}], got {list(pixel_values.shape)}; "
                "use backend.preprocess_image(image, image_size=model.config.vision.image_size)."
            )
        patches = self.patch_embed(pixel_values)  # [B, g*g, C]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # [B, 1, C]
        x = torch.cat((cls, patches), dim=1) + self.pos_embed  # [B, 1 + g*g, C]
        for block in self.blocks:
            x = block(x)
        return x

    def cast_matmul_weights_(self, dtype: torch.dtype) -> None:
        """Upstream `convert_weights_to_fp16`: only Conv2d/Linear weights and biases change dtype.

        LayerNorms, `pos_embed`, `cls_token`, `q_bias` and `v_bias` stay float32; the forward then runs under
        autocast, as upstream's `maybe_autocast` does.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(dtype)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a checkpoint position embedding to another patch grid, as upstream `interpolate_pos_embed` does.

    pos_embed: [1, 1 + g*g, C] (any float dtype, e.g. the fp16 of eva_vit_g.pth), CLS first.
    Returns [1, 1 + new_grid**2, C] float32: CLS kept, the g x g grid resized with bicubic
    `F.interpolate(align_corners=False)` computed in float32 (the upcast is exact, the interpolation is not
    done in fp16). When the grid already matches it is returned unchanged (upcast only), as upstream skips it.
    """
    pos_embed = pos_embed.float()
    cls_token, grid_tokens = pos_embed[:, :1], pos_embed[:, 1:]  # [1, 1, C], [1, g*g, C]
    old_grid = math.isqrt(grid_tokens.shape[1])
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} grid tokens, not a square number")
    if old_grid == new_grid:
        return pos_embed
    width = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)  # [1, C, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_tokens = grid.permute(0, 2, 3, 1).flatten(1, 2)  # [1, new*new, C]
    return torch.cat((cls_token, grid_tokens), dim=1)
