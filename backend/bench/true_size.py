"""The true-size check: MiniGPT-v2 at its real shapes, random weights, on this machine's CPU.

EVA ViT-g at 448 px (width 1408, 40 blocks stored of which upstream builds 39, 16 heads) + LLaMA-2-7B shapes
(4096 wide, 32 layers, 11008 MLP, vocabulary 32000) + LoRA r 64 on q/v, written in the ORIGINAL file formats
(`eva_vit_g.pth` in float16; a Llama-2-7b-chat-hf-style folder with float16 safetensors shards, their index and
config.json; a MiniGPT `{"model": ...}` checkpoint with peft 0.2.0 names), then loaded through `load_upstream` in
bfloat16 and asked about one slice. It shows that the real-size path loads without holding the weights twice
(peak RSS against the loaded weights' bytes) and how long an answer takes. The tokenizer is the project's tiny
one (a real LLaMA tokenizer is not redistributable); the LLaMA's 32000-row embedding and head keep their size.

The files (about 16 GB) are written by a child process, so that this process's peak RSS is the loader's alone,
and are deleted afterwards. Not run in CI: `minigpt-pancreas bench --true-size`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.tiny_upstream import TinySizes, build_tiny_minigpt_checkpoint, build_tiny_vit_checkpoint
from SlicerMiniGPTPancreas.errors import UserError

TRUE_SIZES = TinySizes(image_size=448, patch_size=14, vit_width=1408, vit_depth=40, vit_mlp_hidden=6144,
                       checkpoint_grid=16, llm_hidden=4096, llm_layers=32, llm_heads=32, llm_intermediate=11008,
                       lora_r=64)
LLAMA_VOCAB = 32000
LAYERS_PER_SHARD = 4  # ~1.6 GB float16 shards: the writer never holds more than one
FILES_BYTES = 16_500_000_000  # what the three files take on disk
NEEDED_MEMORY_BYTES = 20_000_000_000  # bfloat16 weights (~15.6 GB) x 1.3


class TrueSizeError(UserError, RuntimeError):
    """The machine cannot run the check (memory, disk); the message says what is missing."""


def run_true_size(question: str, scratch: Path | None = None) -> dict:
    """Write the files, load them in bfloat16, answer `question` on one synthetic slice; the figures as a dict."""
    _check_resources(scratch)
    folder = Path(tempfile.mkdtemp(prefix="minigpt-true-size-", dir=scratch))
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "backend.bench.true_size", str(folder)], check=True)
        written_s = time.perf_counter() - started
        return {"files_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                "write_seconds": written_s, **_load_and_answer(folder, question)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load_and_answer(folder: Path, question: str) -> dict:
    from backend.checkpoints import load_upstream
    from backend.engine import InferenceEngine

    started = time.perf_counter()
    model = load_upstream(folder / "eva_vit_g.pth", folder / "Llama-2-7b-chat-hf", folder / "checkpoint_stage3.pth",
                          image_size=TRUE_SIZES.image_size, dtype=torch.bfloat16, device="cpu")
    load_s = time.perf_counter() - started
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    engine = InferenceEngine(model, batch_size=1, model_id="true-size-random", precision="bfloat16")
    slice_hu = np.random.default_rng(0).normal(40, 120, (512, 512)).astype(np.int16)
    started = time.perf_counter()
    result = engine.run([slice_hu], question, constrain_boxes=True)[0]  # a box: a real answer's token count
    answer_s = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"load_seconds": load_s, "weights_bytes": weights, "peak_rss_bytes": peak_rss,
            "peak_rss_over_weights": peak_rss / weights, "seconds_per_answer": answer_s, "answer": result.answer,
            "vision": str(model.config.vision), "llm_layers": model.llama_model.config.num_hidden_layers,
            "lora_r": model.config.lora_r, "torch_threads": torch.get_num_threads()}


def _check_resources(scratch: Path | None) -> None:
    available = _mem_available_bytes()
    if available < NEEDED_MEMORY_BYTES:
        raise TrueSizeError(f"the true-size check needs {NEEDED_MEMORY_BYTES / 1e9:.0f} GB of available memory, "
                            f"this machine has {available / 1e9:.1f} GB now; close other programs or run it elsewhere.")
    free = shutil.disk_usage(scratch or tempfile.gettempdir()).free
    if free < FILES_BYTES:
        raise TrueSizeError(f"the true-size files need {FILES_BYTES / 1e9:.1f} GB of disk, "
                            f"{scratch or tempfile.gettempdir()} has {free / 1e9:.1f} GB free; pass --scratch DIR.")


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise TrueSizeError("cannot read MemAvailable from /proc/meminfo (the true-size check runs on Linux only).")


# --------------------------------------------------------------------------------------------- the files

def write_true_size_files(folder: Path) -> None:
    build_tiny_vit_checkpoint(folder / "eva_vit_g.pth", TRUE_SIZES)
    write_llama_folder(folder / "Llama-2-7b-chat-hf", TRUE_SIZES)
    build_tiny_minigpt_checkpoint(folder / "checkpoint_stage3.pth", TRUE_SIZES)


def write_llama_folder(folder: Path, sizes: TinySizes, seed: int = 1) -> None:
    """A Llama-2-7b-chat-hf-style folder: config.json, float16 safetensors shards + index, tokenizer.model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from backend.tiny import build_tiny_sentencepiece

    folder.mkdir(parents=True)
    build_tiny_sentencepiece(folder)
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": sizes.llm_hidden, "initializer_range": 0.02, "intermediate_size": sizes.llm_intermediate,
              "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": sizes.llm_heads,
              "num_hidden_layers": sizes.llm_layers, "num_key_value_heads": sizes.llm_heads, "pad_token_id": 0,
              "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False,
              "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True,
              "vocab_size": LLAMA_VOCAB}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):  # names and shapes only
        shapes = {name: tuple(tensor.shape) for name, tensor in LlamaForCausalLM(
            LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
        ).state_dict().items()}
    shards = _shard_names(shapes, sizes.llm_layers)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_weight(name, shapes[name], generator) for name in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _shard_names(shapes: dict, layers: int) -> list[list[str]]:
    def layer_of(name: str) -> int:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else layers)
    groups: dict[int, list[str]] = {}
    for name in shapes:
        groups.setdefault(max(layer_of(name), 0) // LAYERS_PER_SHARD, []).append(name)
    return [groups[key] for key in sorted(groups)]


def _random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return (1 + 0.1 * torch.randn(shape, generator=generator)).half()
    return (0.02 * torch.randn(shape, generator=generator)).half()


if __name__ == "__main__":  # the child process of `run_true_size`
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    write_true_size_files(Path(sys.argv[1]))
