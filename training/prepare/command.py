"""`minigpt-pancreas-train prepare`: options, the optional JSON config, and exit codes.

Exit codes: 0 done (volumes that could not be prepared are listed and skipped); 1 with --strict when any
volume or file was skipped; 2 user error (bad option, root or config, an output that cannot be written), printed
as one line by the command runner; 130 interrupted (finished volumes are kept: rerun the same command to resume).

Config file (JSON) for `--all`, every key optional except "roots"; relative paths are relative to the file:
    {"roots": {"nih": "Pancreas-CT", "msd": "Task07_Pancreas", "abdomenct1k": "AbdomenCT-1K"},
     "out": "prepared", "seed": 42, "test_ratio": 0.2, "val_ratio": 0.0, "threshold": 0.6, "test_threshold": 0.0,
     "intensity": "window", "label_geometry": "check", "duplicates": "same-split", "organ_balance": true,
     "summary_thresholds": [0.2, 0.4, 0.6, 0.8], "workers": 4}
Command-line options override the config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from training.prepare.files import DATASETS, PrepareError

_CONFIG_KEYS = ("roots", "out", "seed", "test_ratio", "val_ratio", "threshold", "test_threshold", "intensity",
                "label_geometry", "duplicates", "organ_balance", "summary_thresholds", "workers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of `prepare` (no heavy imports here: --help must stay fast)."""
    what = parser.add_argument_group("what to prepare")
    what.add_argument("--dataset", choices=DATASETS, help="the dataset found under --root")
    what.add_argument("--root", help="folder the dataset was extracted to (only read, never written)")
    what.add_argument("--all", action="store_true", help="prepare every dataset named in --config's \"roots\"")
    what.add_argument("--config", help="JSON file naming the roots and options (see the module docs)")
    what.add_argument("--out", help="output folder (slices, records, splits.json, tasks/, summary.json)")
    how = parser.add_argument_group("how")
    how.add_argument("--intensity", choices=("window", "paper"),
                     help="PNG contrast: upstream HEAD's HU window (default) or the paper-era equalisation")
    how.add_argument("--label-geometry", choices=("check", "image"),
                     help="check (default): refuse labels not on the CT's voxel grid; image: ignore the label's "
                     "geometry and take its voxel [k, j, i] as the CT's (DICOM slices in position order)")
    how.add_argument("--threshold", type=float, help="keep slices whose box ratio is > this (default 0.6)")
    how.add_argument("--test-threshold", type=float,
                     help="the test files' threshold (default: --threshold); 0 scores every slice with the structure")
    how.add_argument("--test-ratio", type=float, help="fraction of each dataset's volumes held out (default 0.2)")
    how.add_argument("--val-ratio", type=float,
                     help="fraction of each dataset's volumes taken from train for tasks/*_val.json, on which the "
                     "cascade picks its epochs (default 0: no val split)")
    how.add_argument("--seed", type=int, help="seed of the split and of every sample (default 42)")
    how.add_argument("--duplicates", choices=("same-split", "drop"),
                     help="same scan in two datasets: keep both in one split (default) or drop the later copy")
    how.add_argument("--no-organ-balance", dest="organ_balance", action="store_false", default=None,
                     help="keep every multi-organ entry instead of subsampling organs to the rarest one")
    how.add_argument("--summary-thresholds", help="comma-separated thresholds of the summary table (0.2,0.4,0.6,0.8)")
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, help="parallel worker processes (default min(4, CPUs))")
    run.add_argument("--force", action="store_true", help="redo volumes that are already prepared")
    run.add_argument("--quiet", action="store_true", help="no progress bars or notes; the summary is still printed")
    run.add_argument("--strict", action="store_true", help="exit with 1 if any volume could not be prepared")


def run(args: argparse.Namespace) -> int:
    """Run `prepare`; its user errors (PrepareError, OutputError) go to the command runner, which prints one line."""
    options = build_options(args)
    from training.prepare.pipeline import run_prepare

    echo = _quiet_echo if args.quiet else print
    try:
        report = run_prepare(options, echo=echo)
    except KeyboardInterrupt:  # more than the runner's note: what was kept, and how to go on
        print("\ninterrupted: finished volumes are kept; rerun the same command to resume.", file=sys.stderr)
        return 130
    return 1 if args.strict and report.problems else 0


def _quiet_echo(line: str) -> None:
    if not line.startswith("note:"):
        print(line)


# Option name -> its type, for values that come from the JSON config (argparse types the command line).
_OPTION_TYPES = {"seed": int, "test_ratio": float, "val_ratio": float, "threshold": float,
                 "test_threshold": float, "duplicates": str,
                 "organ_balance": bool, "workers": int, "intensity": str, "label_geometry": str}


def build_options(args: argparse.Namespace):
    """Merge the command line over the config over the defaults into `PrepareOptions`."""
    from training.prepare.pipeline import PrepareOptions
    from training.prepare.volume_job import VolumeSettings

    config = _read_config(args.config) if args.config else {}
    roots = _roots(args, config)
    out = args.out or config.get("out")
    if not out:
        raise PrepareError("--out is required (the folder to write the prepared data to).")
    chosen: dict[str, Any] = {}
    for key, kind in _OPTION_TYPES.items():
        value = getattr(args, key) if getattr(args, key) is not None else config.get(key)
        if value is not None:
            chosen[key] = _typed(key, value, kind)
    thresholds = args.summary_thresholds or config.get("summary_thresholds")
    if thresholds is not None:
        chosen["summary_thresholds"] = _thresholds(thresholds)
    settings = VolumeSettings(**{key: chosen.pop(key) for key in ("intensity", "label_geometry") if key in chosen})
    return PrepareOptions(roots=roots, out=str(out), settings=settings, force=args.force,
                          progress=not args.quiet and sys.stderr.isatty(), **chosen)


def typed_option(key: str, value: Any) -> Any:
    """A config value of option `key` as its type, or a `PrepareError` naming the option."""
    return _typed(key, value, _OPTION_TYPES[key])


def _typed(key: str, value: Any, kind: type) -> Any:
    """`value` as `kind`, or a `PrepareError` naming the option (bool is not accepted as a number)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise PrepareError(f"{key} must be {kind.__name__}, got {value!r}.")


def _roots(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, str]:
    config_roots = config.get("roots", {})
    if args.all:
        if args.dataset or args.root:
            raise PrepareError("--all prepares the roots of --config; do not combine it with --dataset/--root.")
        if not config_roots:
            raise PrepareError("--all needs --config FILE with a \"roots\" object, e.g. "
                               "{\"roots\": {\"nih\": \"/data/Pancreas-CT\", \"msd\": \"/data/Task07_Pancreas\"}}.")
        return dict(config_roots)
    if not args.dataset:
        raise PrepareError("say what to prepare: --dataset nih|msd|abdomenct1k with --root DIR, or --all --config "
                           "FILE.")
    root = args.root or config_roots.get(args.dataset)
    if not root:
        raise PrepareError(f"--root is required with --dataset {args.dataset} (the folder it was extracted to).")
    return {args.dataset: root}


def _read_config(path: str) -> dict[str, Any]:
    config_path = Path(path).expanduser()
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepareError(f"--config {config_path} does not exist.") from None
    except (OSError, ValueError) as error:
        raise PrepareError(f"--config {config_path} is not readable JSON: {error}.") from None
    if not isinstance(config, dict):
        raise PrepareError(f"--config {config_path} must hold a JSON object.")
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise PrepareError(f"--config {config_path}: unknown key(s) {', '.join(unknown)}; "
                           f"allowed: {', '.join(_CONFIG_KEYS)}.")
    roots = config.get("roots", {})
    if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
        raise PrepareError(f"--config {config_path}: \"roots\" must map dataset names to folders.")
    base = config_path.resolve().parent
    config["roots"] = {dataset: str(base / Path(root).expanduser()) for dataset, root in roots.items()}
    if "out" in config:
        config["out"] = str(base / Path(config["out"]).expanduser())
    return config


def _thresholds(value: Any) -> tuple[float, ...]:
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        thresholds = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise PrepareError(f"summary thresholds must be numbers like 0.2,0.4,0.6,0.8, got {value!r}.") from None
    if not thresholds or not all(0.0 <= t < 1.0 for t in thresholds):
        raise PrepareError(f"summary thresholds must lie in [0, 1), got {value!r}.")
    return thresholds
