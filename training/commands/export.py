"""`minigpt-pancreas-train export RUN --out DIR`: a self-contained model folder (training/export.py does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from backend.commands.model_options import close_up_zoom_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a model folder that holds everything loading needs: the trained tensors, the tokenizer and COPIES of "
        "the base files (EVA ViT .pth and the LLaMA config and weights: about 15 GB for the real model, so this "
        "takes a while), described by relative paths with sha256 and a model card. It loads from wherever it is "
        "moved: minigpt-pancreas serve --model DIR.")
    parser.add_argument("run", type=Path, metavar="RUN",
                        help="a fit output folder (its latest model, or model_epoch_N with --epoch) or a model folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the folder to write (must not exist or be empty, unless --force)")
    parser.add_argument("--epoch", type=int, metavar="N", help="export the fit run's model_epoch_N (default: latest)")
    parser.add_argument("--model-id", metavar="ID",
                        help="the id servers and outputs report (default: <run name>-<first 8 hex of the trained "
                             "tensors' sha256>)")
    parser.add_argument("--description", metavar="TEXT", help="one line for the model card")
    parser.add_argument("--synthetic", action="store_true",
                        help="mark the model as trained on synthetic data only (a demonstration model, not for "
                             "clinical use); servers and commands say so")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --out (only once the new folder is complete)")
    parser.add_argument("--half-base", action="store_true",
                        help="store the base weights in float16, as upstream ships them (half the size; evaluate "
                             "the exported folder afterwards, its answers may differ in the last digits)")
    parser.add_argument("--close-up-zoom", type=close_up_zoom_value, metavar="Z",
                        help="record that the model is asked pancreas and tumour questions again of a close-up Z "
                             "times closer round its first pancreas box (1-4; a model trained on close-ups, "
                             "fit's augment.focus); predict --cascade and evaluate then do so. 0: asked once")


def run(args: argparse.Namespace) -> int:
    from training.export import export_model

    manifest = export_model(args.run, args.out, epoch=args.epoch, model_id=args.model_id,
                            description=args.description, synthetic=args.synthetic, force=args.force,
                            half_base=args.half_base, close_up_zoom=args.close_up_zoom)
    card = manifest["card"]
    files = [manifest["tensors"], manifest["tokenizer"], manifest["base"]["vit_checkpoint"],
             *manifest["base"]["llama_dir"]["files"].values()]
    size_mb = sum(entry["size"] for entry in files) / 1e6
    kind = "synthetic demonstration model" if card["synthetic"] else "model"
    print(f"exported {kind} {card['model_id']} from {manifest['exported_from']}: {len(files) + 1} files, "
          f"{size_mb:.1f} MB")
    print(f"wrote {args.out.absolute()}/ (use it: minigpt-pancreas serve --model {args.out})")
    return 0
