"""`minigpt-pancreas import-upstream`: convert the original MiniGPT-v2 / MiniGPT-Pancreas files into a model folder.

The whole model is built once from the files (every tensor checked, as `backend.load_upstream` does); then the
trained tensors, the config and the tokenizer are written, and the frozen base files are recorded by path, size
and sha256 (not copied).
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vit", required=True, metavar="PATH", help="eva_vit_g.pth (the BLIP-2 / LAVIS ViT file)")
    parser.add_argument("--llama", required=True, metavar="DIR",
                        help="LLaMA-2 Hugging Face folder (e.g. Llama-2-7b-chat-hf)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="MiniGPT-v2 stage-3 or MiniGPT-Pancreas checkpoint (.pth holding {'model': ...})")
    parser.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    parser.add_argument("--image-size", type=int, default=448, help="input image side in pixels (default 448)")
    parser.add_argument("--vit-num-heads", type=int, default=None,
                        help="ViT attention heads (default: a sidecar eva_vit_g.json {\"num_heads\": N} beside "
                             "--vit, else 16 for EVA ViT-g; other widths need it)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16, as upstream)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="precision used while checking the files (default bfloat16: ~14 GB RAM for 7B); "
                             "the written tensors are float32 copies either way")
    parser.add_argument("--no-hash", action="store_true",
                        help="record only the sizes of the base files, not their sha256 (hashing 15 GB takes "
                             "minutes); `info --verify-hashes` then cannot check their content")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load checkpoints that hold Python objects besides tensors (only for files "
                             "you trust: unpickling can run code)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def run(args: argparse.Namespace) -> int:
    import torch

    from backend.checkpoints import load_upstream
    from backend.model_dir import save_model_dir

    model = load_upstream(args.vit, args.llama, args.checkpoint, image_size=args.image_size,
                          dtype=getattr(torch, args.dtype), vit_num_heads=args.vit_num_heads,
                          lora_alpha=args.lora_alpha, allow_pickle=args.allow_pickle)
    folder = save_model_dir(model, args.out, hash_base_files=not args.no_hash, overwrite=args.overwrite)
    config = model.config
    for line in model.load_report:
        print(line)
    print(f"LoRA: r {config.lora_r}, alpha {config.lora_alpha} (scaling {config.lora_scaling:g}), "
          f"targets {', '.join(config.lora_target_modules)}")
    print(f"wrote {folder}")
    return 0
