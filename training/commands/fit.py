"""`minigpt-pancreas-train fit CONFIG.json`: train one stage of the cascade (training/fit.py does the work)."""

from __future__ import annotations

import argparse
import os

from backend.commands.model_options import device_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the stage's JSON config (examples: training/configs/*.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in output_dir from its latest checkpoint")
    mode.add_argument("--force", action="store_true",
                      help="delete the run already in output_dir (its checkpoints too) and start over")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="stop after N iterations (smoke runs; the LR schedule still spans max_epoch epochs)")
    parser.add_argument("--device", type=device_name,
                        help="auto, cpu, cuda or cuda:N (default: the config's, else auto)")


def run(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.fit import fit

    overrides = {key: value for key, value in (("max_steps", args.max_steps), ("device", args.device))
                 if value is not None}
    result = fit(load_config(args.config, overrides), resume=args.resume, force=args.force)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        where = f"; latest model: {result.latest['model_dir']}" if result.latest else ""
        print(f"done: {result.step} steps{where}")
    return 0
