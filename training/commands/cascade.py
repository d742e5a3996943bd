"""`minigpt-pancreas-train cascade CASCADE.json`: every stage of the cascade, evaluation and export, resumable
(training/cascade.py does the work; training/cascade_config.py documents the file)."""

from __future__ import annotations

import argparse

from backend.commands.model_options import device_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cascade", help="the cascade file (examples: training/configs/demo/cascade.json, "
                        "training/configs/cascade.json)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (default: cuda when available), cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from training.cascade import run_cascade
    from training.cascade_config import load_cascade

    run_cascade(load_cascade(args.cascade), device=args.device)
    return 0
