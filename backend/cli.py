"""`minigpt-pancreas`: the backend's command line.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
wires them together, so `--help` stays fast (no torch import until a command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("backend.demo", "run the whole pipeline on a synthetic CT phantom and write boxes and overlays"),
    "import-upstream": ("backend.commands.import_upstream",
                        "convert the original eva_vit_g.pth + LLaMA-2 folder + MiniGPT .pth into a model folder"),
    "info": ("backend.commands.info", "describe a model folder (and check its base files) or a MiniGPT .pth"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigpt-pancreas",
        description="MiniGPT-Pancreas backend: model conversion, inference and the local HTTP service.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        _lazy_add_arguments(module_name, command_parser)
    return parser


def _lazy_add_arguments(module_name: str, parser: argparse.ArgumentParser) -> None:
    """Let the command module declare its options; modules keep heavy imports inside `run`."""
    module = importlib.import_module(module_name)
    module.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("minigpt-pancreas: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        # User-facing errors (bad input, missing or broken files, a full disk) carry a message that says what is
        # wrong and what to do; show it without a traceback. Anything else is a bug and keeps its traceback.
        print(f"minigpt-pancreas {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
