"""Subcommands of `minigpt-pancreas-train` that keep their heavy imports (torch) inside `run`."""
