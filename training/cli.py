"""`minigpt-pancreas-train`: the training package's command line.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
wires them together, so `--help` stays fast (heavy imports happen inside `run`). Later stages (`fit`,
`evaluate`, `export`) are added to COMMANDS the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when the parser is built or their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("training.prepare.command",
                "turn NIH Pancreas-CT, MSD Task07 or AbdomenCT-1K into slice PNGs, records, splits and task sets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt-pancreas-train",
        description="MiniGPT-Pancreas training: dataset preparation, fine-tuning, evaluation and export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
