"""Tiny random MiniGPT-v2 models in the ORIGINAL upstream file formats, for the tests: all three upstream inputs
(`build_tiny_upstream`) and the LLaMA Hugging Face folder among them (`build_tiny_llama_dir`), the way
Llama-2-7b-chat-hf ships it: config.json in the transformers-4.3x style, fp16 weights as `model.safetensors` or legacy
`pytorch_model.bin` with 4.30's `rotary_emb.inv_freq` buffers, tokenizer.model from `backend.tiny`.
The ViT and MiniGPT files come from backend/tiny_upstream.py, which the true-size benchmark uses too.
Same seed, same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from backend.tiny import build_tiny_sentencepiece
from backend.tiny_upstream import (
    TinySizes, TinyUpstreamFiles, build_tiny_minigpt_checkpoint, build_tiny_vit_checkpoint, rotary_inv_freq,
)
from backend.tokenizer import UpstreamLlamaTokenizer


def build_tiny_upstream(out_dir: str | os.PathLike, sizes: TinySizes = TinySizes(), seed: int = 0,
                        peft_names: str = "0.2.0", legacy_llama_bin: bool = True) -> TinyUpstreamFiles:
    """Write all three upstream inputs into `out_dir` and return their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    vit = build_tiny_vit_checkpoint(folder / "eva_vit_g.pth", sizes, seed=seed)
    llama = build_tiny_llama_dir(folder / "llama", sizes, seed=seed + 1, legacy_bin=legacy_llama_bin)
    minigpt = build_tiny_minigpt_checkpoint(folder / "checkpoint_stage3.pth", sizes, seed=seed + 2,
                                            peft_names=peft_names)
    return TinyUpstreamFiles(vit, llama, minigpt, sizes)


def build_tiny_llama_dir(out_dir: str | os.PathLike, sizes: TinySizes = TinySizes(), seed: int = 1,
                         legacy_bin: bool = True) -> Path:
    """A LLaMA HF folder with a tiny real tokenizer; weights random (std 0.1 so that logits are not flat)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(out_dir)
    tokenizer = UpstreamLlamaTokenizer(build_tiny_sentencepiece(folder))
    config = {  # the keys of Llama-2-7b-chat-hf's config.json (transformers 4.3x), with tiny sizes
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": sizes.llm_hidden, "initializer_range": 0.1, "intermediate_size": sizes.llm_intermediate,
        "max_position_embeddings": 512, "model_type": "llama", "num_attention_heads": sizes.llm_heads,
        "num_hidden_layers": sizes.llm_layers, "num_key_value_heads": sizes.llm_heads, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.30.0", "use_cache": True,
        "vocab_size": tokenizer.vocab_size,
    }
    model_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    with torch.random.fork_rng():  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        state = {name: tensor.half() for name, tensor in LlamaForCausalLM(model_config).state_dict().items()}
        for name in list(state):  # RMSNorm weights start at 1; spread them so that a wrong mapping shows
            if name.endswith("norm.weight"):
                state[name] = (1 + 0.1 * torch.randn(state[name].shape)).half()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if legacy_bin:
        for layer in range(sizes.llm_layers):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = rotary_inv_freq(sizes)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return folder


def load_tiny_upstream(out_dir: str | os.PathLike):
    """A tiny MiniGPT-v2 written by `build_tiny_upstream` into `out_dir` and loaded the way users load the real one."""
    from backend.checkpoints import load_upstream

    files = build_tiny_upstream(out_dir)
    return load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                         image_size=files.sizes.image_size)


def tiny_engine(out_dir: str | os.PathLike, model_id: str = "tiny-test", recording: bool = False):
    """The real engine (batch 4) around `load_tiny_upstream`; `recording`: it also keeps a copy of every slice it
    was asked about, in `engine.seen`."""
    from backend.engine import InferenceEngine

    class RecordingEngine(InferenceEngine):
        def run(self, slices_hu, prompts, **options):
            self.seen.extend(np.array(s) for s in slices_hu)
            return super().run(slices_hu, prompts, **options)

    engine = (RecordingEngine if recording else InferenceEngine)(load_tiny_upstream(out_dir), batch_size=4,
                                                                 model_id=model_id)
    engine.seen = []
    return engine
