"""Subcommands of `minigpt-pancreas`; each module exposes `add_arguments(parser)` and `run(args) -> int`."""
