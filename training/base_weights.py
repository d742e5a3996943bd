"""Base weights for the demo cascade's stage 0: a freshly initialised tiny MiniGPT-v2, and the trained base written
back in the ORIGINAL file formats.

MiniGPT-Pancreas starts from MiniGPT-v2, whose EVA ViT and LLaMA-2 were pre-trained on web-scale data. The demo
model has no such base, so its stage 0 trains a tiny base of the same code from scratch on phantom grounding tasks
(every parameter trainable, `"train": "all"` in the fit config). These functions make that possible without a
second file format:

* `write_initial_base` writes a randomly initialised tiny model as upstream's three files (an `eva_vit_g.pth`-style
  ViT state dict, a LLaMA Hugging Face folder with a tiny SentencePiece tokenizer, a MiniGPT `.pth` with llama_proj
  and zero-effect LoRA), so `load_upstream` builds it like the real one. Initialisation is the usual one for
  training transformers from scratch (normal std 0.02, zero biases, unit norms); LoRA B is zero as in peft.
* `write_trained_base` writes the current ViT and LLaMA of a model (stage 0 changes them) as the same kind of
  files inside a model folder, so that every later stage loads them as its frozen base.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.checkpoint_io import lora_key
from backend.checkpoints import BaseFiles, write_vit_sidecar
from backend.model import MiniGPTv2
from backend.tiny import build_tiny_sentencepiece
from backend.tiny_upstream import TinySizes, TinyUpstreamFiles
from backend.tokenizer import MODEL_FILE_NAME, UpstreamLlamaTokenizer

VIT_FILE = "eva_vit.pth"
LLAMA_FOLDER = "llama"
CHECKPOINT_FILE = "checkpoint_init.pth"
BASE_FOLDER = "base"  # inside a model folder written by stage 0
INIT_STD = 0.02


@dataclass(frozen=True)
class ScratchSizes:
    """Sizes of a model trained from scratch (a `model: {"scratch": {...}}` fit source). ViT heads follow
    upstream's rule width // 88 (`TinySizes.vit_heads`), so keep the width a multiple of 88."""

    image_size: int = 128
    patch_size: int = 16
    vit_width: int = 176
    vit_depth: int = 4
    vit_mlp_hidden: int = 704
    llm_hidden: int = 128
    llm_layers: int = 3
    llm_heads: int = 4
    llm_intermediate: int = 344
    lora_r: int = 16

    def tiny_sizes(self) -> TinySizes:
        return TinySizes(image_size=self.image_size, patch_size=self.patch_size, vit_width=self.vit_width,
                         vit_depth=self.vit_depth, vit_mlp_hidden=self.vit_mlp_hidden,
                         checkpoint_grid=self.image_size // self.patch_size, llm_hidden=self.llm_hidden,
                         llm_layers=self.llm_layers, llm_heads=self.llm_heads,
                         llm_intermediate=self.llm_intermediate, lora_r=self.lora_r)

    def to_dict(self) -> dict:
        return asdict(self)


def write_initial_base(out_dir: str | os.PathLike, sizes: ScratchSizes, seed: int) -> TinyUpstreamFiles:
    """Write a freshly initialised model as upstream files into `out_dir` (deterministic for a seed)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tiny = sizes.tiny_sizes()
    torch.save(_initial_vit(tiny, generator), folder / VIT_FILE)
    write_vit_sidecar(folder / VIT_FILE, tiny.vit_heads)  # the weights do not tell the head count
    llama = _initial_llama(folder / LLAMA_FOLDER, tiny, generator)
    torch.save({"model": _initial_trainable(tiny, generator), "epoch": 0}, folder / CHECKPOINT_FILE)
    return TinyUpstreamFiles(folder / VIT_FILE, llama, folder / CHECKPOINT_FILE, tiny)


def _normal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * INIT_STD


def _initial_vit(sizes: TinySizes, generator: torch.Generator) -> dict[str, torch.Tensor]:
    width, hidden, patch, grid = sizes.vit_width, sizes.vit_mlp_hidden, sizes.patch_size, sizes.checkpoint_grid
    state = {"cls_token": _normal(generator, 1, 1, width), "pos_embed": sincos_position_embedding(grid, width),
             "patch_embed.proj.weight": _normal(generator, width, 3, patch, patch),
             "patch_embed.proj.bias": torch.zeros(width)}
    for block in range(sizes.vit_depth):
        prefix = f"blocks.{block}."
        state.update({
            prefix + "norm1.weight": torch.ones(width), prefix + "norm1.bias": torch.zeros(width),
            prefix + "attn.qkv.weight": _normal(generator, 3 * width, width),
            prefix + "attn.q_bias": torch.zeros(width), prefix + "attn.v_bias": torch.zeros(width),
            prefix + "attn.proj.weight": _normal(generator, width, width),
            prefix + "attn.proj.bias": torch.zeros(width),
            prefix + "norm2.weight": torch.ones(width), prefix + "norm2.bias": torch.zeros(width),
            prefix + "mlp.fc1.weight": _normal(generator, hidden, width), prefix + "mlp.fc1.bias": torch.zeros(hidden),
            prefix + "mlp.fc2.weight": _normal(generator, width, hidden), prefix + "mlp.fc2.bias": torch.zeros(width),
        })
    return state


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """[1, 1 + grid*grid, width]: zero for CLS, then each patch's row and column as sines and cosines (half the
    channels each, as MAE initialises its ViT). A learned embedding starting at small random values carries
    almost no position, and the language model can only say where a box is if the image tokens say where they are."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))  # [W/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    angles = [axis.flatten()[:, None] * frequencies[None] for axis in (rows, cols)]  # 2 x [G*G, W/4]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # [G*G, 4 * (W/4)]
    table = torch.nn.functional.pad(table, (0, width - table.shape[1]))  # widths not divisible by 4
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()[None]


def _initial_llama(folder: Path, sizes: TinySizes, generator: torch.Generator) -> Path:
    """A LLaMA HF folder (config.json, model.safetensors, tokenizer.model) with fresh weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = UpstreamLlamaTokenizer(build_tiny_sentencepiece(folder))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_size": sizes.llm_hidden,
              "intermediate_size": sizes.llm_intermediate, "num_attention_heads": sizes.llm_heads,
              "num_hidden_layers": sizes.llm_layers, "num_key_value_heads": sizes.llm_heads,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "initializer_range": INIT_STD,
              "tie_word_embeddings": False, "vocab_size": tokenizer.vocab_size, "torch_dtype": "float32"}
    shapes = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})).state_dict()
    state = {name: torch.ones_like(t) if name.endswith("norm.weight") else _normal(generator, *t.shape)
             for name, t in shapes.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: t.contiguous() for name, t in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def _initial_trainable(sizes: TinySizes, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """llama_proj (trained) and LoRA A/B with B = 0, so LoRA changes nothing until a LoRA stage trains it."""
    hidden, r = sizes.llm_hidden, sizes.lora_r
    state = {"llama_proj.weight": _normal(generator, hidden, 4 * sizes.vit_width),
             "llama_proj.bias": torch.zeros(hidden)}
    for layer in range(sizes.llm_layers):
        for target in sizes.lora_targets:
            state[lora_key(layer, target, "A")] = _normal(generator, r, hidden)
            state[lora_key(layer, target, "B")] = torch.zeros(hidden, r)
    return state


def write_trained_base(model: MiniGPTv2, model_folder: str | os.PathLike) -> BaseFiles:
    """Write `model`'s ViT and LLaMA (LoRA left out) as upstream files under `model_folder/base/`."""
    from safetensors.torch import save_file

    base = Path(model_folder) / BASE_FOLDER
    llama = base / LLAMA_FOLDER
    llama.mkdir(parents=True, exist_ok=True)
    vit_state = {name: t.detach().float().cpu().contiguous() for name, t in model.visual_encoder.state_dict().items()}
    torch.save(vit_state, base / VIT_FILE)
    save_file(_plain_llama_state(model), llama / "model.safetensors", metadata={"format": "pt"})
    source = model.base_files.llama_dir
    (llama / "config.json").write_bytes((source / "config.json").read_bytes())
    (llama / MODEL_FILE_NAME).write_bytes((source / MODEL_FILE_NAME).read_bytes())
    return BaseFiles(base / VIT_FILE, llama, model.base_files.imported_from)


def _plain_llama_state(model: MiniGPTv2) -> dict[str, torch.Tensor]:
    """The LlamaForCausalLM state dict without peft's wrapping: `base_layer.` folded away, LoRA dropped."""
    wrapped = model.llama_model.get_base_model().state_dict()
    return {name.replace(".base_layer.", "."): t.detach().float().cpu().contiguous()
            for name, t in wrapped.items() if ".lora_" not in name}
