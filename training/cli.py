"""`minigpt-pancreas-train`: the training package's command line.

Built with the backend's command runner: each subcommand is a module exposing `add_arguments(parser)` and
`run(args) -> int`, listed in COMMANDS.
"""

from __future__ import annotations

import sys

from backend.cli import run_commands

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("training.prepare.command",
                "turn NIH Pancreas-CT, MSD Task07 or AbdomenCT-1K into slice PNGs, records, splits and task sets"),
    "fit": ("training.commands.fit",
            "fine-tune one stage of the cascade (LoRA + llama_proj) from a JSON config; resumable, multi-GPU"),
    "cascade": ("training.commands.cascade",
                "run a whole cascade file: data, every stage (best epoch by validation), test evaluation, export"),
    "evaluate": ("training.commands.evaluate",
                 "answer the prepared test sets and write the paper's tables under upstream's E1/E2/E3 and STRICT"),
    "export": ("training.commands.export",
               "write a self-contained model folder (trained tensors + copies of the base files + model card)"),
}
DESCRIPTION = "MiniGPT-Pancreas training: dataset preparation, fine-tuning, evaluation and export."


def main(argv: list[str] | None = None) -> int:
    return run_commands("minigpt-pancreas-train", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
