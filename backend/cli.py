"""`minigpt-pancreas`: the backend's command line, and the small command runner both CLIs share.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; a CLI is only a
table of them, so `--help` stays fast (no torch import until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from SlicerMiniGPTPancreas.errors import UserError

# name -> (module, one-line help). Modules keep heavy imports inside `run`.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("backend.commands.bench",
              "time the engine against upstream's one-slice, one-question loop (or load the true-size model)"),
    "demo": ("backend.demo", "run the whole pipeline on a synthetic CT phantom and write boxes and overlays"),
    "import-upstream": ("backend.commands.import_upstream",
                        "convert the original eva_vit_g.pth + LLaMA-2 folder + MiniGPT .pth into a model folder"),
    "info": ("backend.commands.info", "describe a model folder (and check its base files) or a MiniGPT .pth"),
    "predict": ("backend.commands.predict",
                "answer a prompt on every axial slice of a CT volume; boxes as CSV, Slicer .mrk.json and PNGs"),
    "serve": ("backend.commands.serve", "run the HTTP service for the Slicer module (127.0.0.1:8765 by default)"),
}
DESCRIPTION = "MiniGPT-Pancreas backend: model conversion, inference and the local HTTP service."


def build_parser(prog: str = "minigpt-pancreas", description: str = DESCRIPTION,
                 commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in commands.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def run_commands(prog: str, description: str, commands: dict[str, tuple[str, str]],
                 argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen command, and turn a UserError into one line and exit code 2."""
    parser = build_parser(prog, description, commands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except UserError as error:
        # Its message says what is wrong and what to do: show it without a traceback. Anything else (a ValueError
        # from numpy or torch included) is a bug and keeps its traceback.
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_commands("minigpt-pancreas", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
