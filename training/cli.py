"""`minigpt-pancreas-train`: the training package's command line.

Built with the backend's command runner: each subcommand is a module exposing `add_arguments(parser)` and
`run(args) -> int`. Later stages (`fit`, `evaluate`, `export`) are added to COMMANDS the same way.
"""

from __future__ import annotations

import sys

from backend.cli import run_commands

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("training.prepare.command",
                "turn NIH Pancreas-CT, MSD Task07 or AbdomenCT-1K into slice PNGs, records, splits and task sets"),
    "fit": ("training.commands.fit",
            "fine-tune one stage of the cascade (LoRA + llama_proj) from a JSON config; resumable, multi-GPU"),
    "evaluate": ("training.commands.evaluate",
                 "answer the prepared test sets and write the paper's tables under upstream's E1/E2/E3 and STRICT"),
}
DESCRIPTION = "MiniGPT-Pancreas training: dataset preparation, fine-tuning, evaluation and export."


def main(argv: list[str] | None = None) -> int:
    return run_commands("minigpt-pancreas-train", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
