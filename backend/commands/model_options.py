"""The model options of `predict`, `serve`, `demo`, `bench` and `minigpt-pancreas-train evaluate`, defined once.

Where the model comes from (--model DIR, --upstream VIT LLAMA CKPT, or by default the bundled demo model), where
it runs (--device) and how its weights are held (--dtype, --quantization), and how many slices go into one model
call (--batch-size: a number, or auto to size it to memory). `resolve_model_source` checks all of it before the
slow loading, `engine_from_args` loads.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from backend.close_up import MAX_ZOOM, MIN_ZOOM
from SlicerMiniGPTPancreas.errors import UserError

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("8bit", "4bit")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ModelSourceError(UserError, ValueError):
    """The model named on the command line is not there (or a numeric option is out of range)."""


def device_name(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")
    return text


def batch_size(text: str) -> int | str:
    """argparse type of --batch-size: auto, or a whole number (checked >= 1 by `resolve_model_source`)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a whole number") from None


def close_up_zoom_value(text: str) -> float:
    """argparse type of --close-up-zoom: 0 (ask once) or a zoom from 1 to 4."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != 0 and not MIN_ZOOM <= value <= MAX_ZOOM:
        raise argparse.ArgumentTypeError(f"{text} is not 0 (ask once) or a zoom from {MIN_ZOOM:g} to {MAX_ZOOM:g}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, close_up: bool = False) -> argparse._MutuallyExclusiveGroup:
    """Add the model options; returns the group of --model / --upstream, for a command's other exclusive sources.
    --batch-size defaults to auto (sized to memory, `backend.batching.auto_batch_size`: 64 slices for the demo
    model on a CPU); answers do not depend on the batch size, only speed and memory do. close_up: add
    --close-up-zoom, for the commands that ask the cascade's questions (`backend.close_up`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, metavar="DIR",
                        help="a model folder (import-upstream, training export, fit's model_epoch_N); default: the "
                             "bundled demo model (backend/demo_model, or $MINIGPT_PANCREAS_DEMO_MODEL)")
    source.add_argument("--upstream", nargs=3, type=Path, metavar=("VIT", "LLAMA", "CKPT"),
                        help="the original files: eva_vit_g.pth, the LLaMA-2 folder, a MiniGPT .pth")
    parser.add_argument("--image-size", type=int, default=448, metavar="PX",
                        help="with --upstream: model input side in pixels (default 448)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (default: cuda when PyTorch sees a GPU, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights precision (default auto: float32 on the CPU, bfloat16 or float16 on a GPU)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="load the LLaMA weights in 8 or 4 bits (CUDA + bitsandbytes)")
    parser.add_argument("--batch-size", type=batch_size, default="auto", metavar="N",
                        help="slices per model call, or auto: sized to memory (default auto)")
    if close_up:
        parser.add_argument("--close-up-zoom", type=close_up_zoom_value, default=None, metavar="Z",
                            help="ask the pancreas and tumour questions again of a close-up Z times closer round "
                                 "the first pancreas box (1-4), or 0: once. Default: as the model folder says "
                                 "(the bundled demo model was trained for it; upstream's model is asked once)")
    return source


def resolve_model_source(args: argparse.Namespace, announce: bool = True) -> None:
    """Check the model options cheaply (before minutes of loading). Without --model and --upstream, take the bundled
    demo model and, if `announce` (not for a command whose output is one JSON object), print so as the command's
    first output line."""
    from backend.demo_model import DemoModelError, bundled_model_dir, default_model_notice

    for option, value in (("--batch-size", args.batch_size), ("--image-size", args.image_size)):
        if value != "auto" and value < 1:
            raise ModelSourceError(f"{option} must be at least 1, got {value}.")
    if args.model is None and args.upstream is None:
        try:
            args.model = bundled_model_dir()
        except DemoModelError as error:  # its message says how to build it or what to pass instead
            raise ModelSourceError(str(error)) from error
        if announce:
            print(default_model_notice(args.model), flush=True)
    if args.model is not None:
        _check_model_folder(args.model)
    else:
        _check_upstream_files(args.upstream)


def engine_from_args(args: argparse.Namespace):
    """The `backend.engine.InferenceEngine` the options describe (call `resolve_model_source` first)."""
    from backend.engine import load_engine

    engine = load_engine(model_dir=args.model, upstream=args.upstream, image_size=args.image_size,
                         device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                         quantization=args.quantization, batch_size=args.batch_size)
    if hasattr(args, "close_up_zoom"):
        engine.close_up_zoom = close_up_zoom_of(args)
    return engine


def close_up_zoom_of(args: argparse.Namespace) -> float | None:
    """--close-up-zoom (0: None), else what the model folder says (None for --upstream files)."""
    from backend.model_dir import close_up_zoom

    if args.close_up_zoom is not None:
        return args.close_up_zoom or None
    return close_up_zoom(args.model) if args.model is not None else None


def _check_model_folder(folder: Path) -> None:
    from backend.model_dir import read_manifest

    if not folder.is_dir():
        raise ModelSourceError(f"model folder not found: {folder}. Create one with `minigpt-pancreas import-upstream` "
                               "or `minigpt-pancreas-train export`, or pass the original files with --upstream.")
    read_manifest(folder)  # CheckpointError (a ValueError) when it is not a model folder


def _check_upstream_files(paths: list[Path]) -> None:
    vit, llama, checkpoint = paths
    for path, what, exists in ((vit, "EVA ViT file", vit.is_file()), (llama, "LLaMA folder", llama.is_dir()),
                               (checkpoint, "MiniGPT checkpoint", checkpoint.is_file())):
        if not exists:
            raise ModelSourceError(f"--upstream: the {what} {path} does not exist.")
