"""`minigpt-pancreas info`: describe a model folder (and check its base files) or an upstream MiniGPT checkpoint.

Nothing is built: a model folder is described from its manifest, an upstream `.pth` from its tensor names and
shapes. Exit status 0 when everything checked is in order, 1 when base files differ, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="a model folder (from import-upstream) or a MiniGPT-v2 / MiniGPT-Pancreas .pth")
    parser.add_argument("--verify-hashes", action="store_true",
                        help="for a model folder: also compare the sha256 of every base file (reads ~15 GB for "
                             "the real model, minutes); by default only sizes are compared")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="for a .pth: also load files holding Python objects besides tensors (trusted files only)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        return _describe_model_dir(path, args.verify_hashes)
    return _describe_checkpoint(path, args.allow_pickle)


def _describe_model_dir(folder: Path, verify_hashes: bool) -> int:
    from backend.config import MiniGPTConfig
    from backend.model_dir import check_base_files, read_manifest

    manifest = read_manifest(folder)
    config = MiniGPTConfig.from_dict(manifest["config"])
    vision = config.vision
    print(f"model folder: {folder}")
    print(f"ViT: {vision.depth} blocks, width {vision.width}, {vision.num_heads} heads, MLP {vision.mlp_hidden}, "
          f"patch {vision.patch_size}, image {vision.image_size} px ({vision.grid_size}x{vision.grid_size} patches, "
          f"position embedding from a {vision.checkpoint_grid}x{vision.checkpoint_grid} grid)")
    print(f"image tokens: {config.image_tokens} of {vision.width * config.tokens_per_merge} -> "
          f"{config.llm_hidden_size} (llama_proj)")
    print(f"LoRA: r {config.lora_r}, alpha {config.lora_alpha} (scaling {config.lora_scaling:g}), dropout "
          f"{config.lora_dropout}, targets {', '.join(config.lora_target_modules)}")
    card = manifest.get("card")
    if card:
        kind = "synthetic demonstration model, not for clinical use" if card.get("synthetic") else "model"
        print(f"card: {card.get('model_id')} ({kind}), exported {card.get('created')}: {card.get('description')}")
    if manifest.get("imported_from"):
        print(f"imported from: {manifest['imported_from']}")
    base, problems = check_base_files(manifest, verify_hashes=verify_hashes, model_dir=folder)
    print(f"EVA ViT file: {base.vit_checkpoint}")
    print(f"LLaMA folder: {base.llama_dir}")
    check = "sha256 and size" if verify_hashes else "size only (--verify-hashes for content)"
    if problems:
        print(f"base files: NOT as saved ({check}):")
        for line in problems:
            print(f"  {line}")
        return 1
    print(f"base files: as saved ({check})")
    return 0


def _describe_checkpoint(file: Path, allow_pickle: bool) -> int:
    from backend.checkpoint_io import ROTARY_INV_FREQ
    from backend.checkpoints import infer_lora, read_minigpt_checkpoint

    state = read_minigpt_checkpoint(file, allow_pickle)
    lora_r, targets = infer_lora(state, None, file)
    lora = [name for name in state if ".lora_" in name]
    inv_freq = [name for name in state if ROTARY_INV_FREQ.search(name)]
    other = sorted(set(state) - set(lora) - set(inv_freq) - {"llama_proj.weight", "llama_proj.bias"})
    print(f"MiniGPT checkpoint: {file}")
    print(f"tensors in 'model': {len(state)} ({len(lora)} LoRA, {len(inv_freq)} rotary inv_freq buffers)")
    if "llama_proj.weight" in state:
        out_features, in_features = state["llama_proj.weight"].shape
        print(f"llama_proj: {in_features} -> {out_features}")
    else:
        print("llama_proj: MISSING")
    layers = len({name.split(".layers.")[1].split(".")[0] for name in lora})
    print(f"LoRA: r {lora_r}, targets {', '.join(targets)}, {layers} layers")
    if other:
        print(f"other tensors: {len(other)} ({', '.join(other[:6])}{', ...' if len(other) > 6 else ''})")
    return 0
