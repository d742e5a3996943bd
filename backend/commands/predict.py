"""`minigpt-pancreas predict`: ask the model about every axial slice of a CT volume file, without a server.

The volume (NIfTI, NRRD, MetaImage, or a folder holding one DICOM series) is read with SimpleITK, shown to the
model as radiological axial slices (the model view: up = anterior, left = patient right), and answered in batches
by `backend.engine.InferenceEngine` (the bundled demo model unless --model or --upstream says otherwise). The
output folder is built beside its target and swapped in whole; an existing --out is replaced only when it holds
nothing but an earlier output of this command, and it is checked before the model loads:

  boxes.csv       one row per box: slice, answer, pixel box on the model-view slice, confidence, RAS centre/size
  boxes.mrk.json  one ROI per box, one slice thick, described with the model id, for 3D Slicer (File > Add Data);
                  stored in LPS like Slicer
  answers.json    the model id and every slice's answer: text, kind, boxes, yes/no and P(yes), reason, time
  overlays/       the slices with boxes, boxes drawn (PNG)
  summary.json    inputs, model, counts

Slice numbers are model-view slices, 0 = the most inferior, whatever the file's storage order. A tilted volume
(gantry tilt, oblique reformat) is refused unless --resample: then it is resampled onto the nearest axial grid
(`geometry.resample_to_axial`) and the outputs say so ("resampled" in summary.json); slice numbers and pixel boxes
then refer to the resampled grid, RAS positions to the patient as always.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from backend import prompts
from backend.commands.model_options import add_model_arguments, engine_from_args, resolve_model_source
from backend.volume_files import read_volume
from SlicerMiniGPTPancreas.atomic import staged_folder
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.protocol import MAX_PROMPT_CHARS

DEFAULT_PROMPT = prompts.refer_eval_instruction(prompts.PANCREAS_PHRASE)  # upstream's evaluation refer prompt
COMMAND_NAME = "minigpt-pancreas predict"  # recorded in summary.json: marks a folder this command may replace
_SLICES = re.compile(r"^\s*(\d*)\s*(:?)\s*(\d*)\s*$")


class PredictError(UserError, ValueError):
    """The command cannot run as asked (missing or unreadable volume, bad --slices, missing model...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="VOLUME", type=Path,
                        help="CT volume: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, or a folder of one DICOM series")
    add_model_arguments(parser, close_up=True)
    parser.add_argument("--prompt", default=None, help=f"question for every slice (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--cascade", action="store_true",
                        help="ask the paper's cascade instead of one question: the pancreas box on every slice, "
                             "tumour yes/no with P(yes) on every slice, and the tumour box where the answer is yes")
    parser.add_argument("--label", default=None,
                        help="name of the ROIs (default: 'pancreas' with the default prompt, else 'box')")
    parser.add_argument("--slices", metavar="START:STOP", default=None,
                        help="model-view slices START..STOP-1 (0 = most inferior); either end may be left out, "
                             "a single number picks one slice (default: all)")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="for a DICOM folder holding several series: the SeriesInstanceUID to use")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="answer length limit (default 20, upstream)")
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="let the model write only one box per slice (detection prompts)")
    parser.add_argument("--resample", action="store_true",
                        help="resample a tilted (oblique) volume onto the nearest axial grid instead of refusing it")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <volume name>-predictions here); an earlier predict output "
                             "there is replaced whole, a folder holding other files is refused")


def run(args: argparse.Namespace) -> int:
    from backend.commands.cascade_outputs import write_cascade_outputs
    from backend.commands.predict_outputs import check_output_folder, write_outputs

    started = time.perf_counter()
    volume = Path(args.volume)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    label = args.label or ("pancreas" if args.prompt is None else "box")
    out = Path(args.out or f"{_volume_name(volume)}-predictions").absolute()
    # Everything cheap is checked before the model loads: a typo or an unwritable --out should not cost minutes.
    resolve_model_source(args)  # prints which model, first, when it is the bundled one
    _check_options(args, prompt)
    check_output_folder(out, COMMAND_NAME, inputs=[volume])
    view, resampled = model_view(read_volume(volume, args.series), args.resample)
    chosen = parse_slices(args.slices, view.shape[0])
    if resampled:
        print(f"note: the volume was {resampled}", file=sys.stderr)

    engine = engine_from_args(args)
    asked_closer = args.cascade or prompt.strip() in prompts.CLOSE_UP_QUESTIONS  # backend.close_up
    details = {
        "command": COMMAND_NAME, "volume": str(volume.absolute()), "prompt": "cascade" if args.cascade else prompt,
        "model": engine.model_id, "device": engine.device, "precision": engine.precision,
        "image_variant": engine.image_variant, "box_decoding": engine.box_decoding,
        "constrain_boxes": args.constrain_boxes, "resampled": resampled,
        "close_up_zoom": engine.close_up_zoom if asked_closer else None,
    }
    if args.cascade:
        answers = sweep_volume(engine, view, chosen, args.max_new_tokens)
        summary = _write_output_folder(out, volume, lambda staging: write_cascade_outputs(
            staging, view, list(chosen), answers, details=details, seconds=time.perf_counter() - started))
        _print_cascade_summary(summary, out)
        return 0
    results = _predict(engine, [view.slice(s) for s in chosen], prompt, args)
    summary = _write_output_folder(out, volume, lambda staging: write_outputs(
        staging, view, list(zip(chosen, results)), label=label, details=details,
        seconds=time.perf_counter() - started))
    _print_summary(summary, out)
    return 0


def _write_output_folder(out: Path, volume: Path, write) -> dict:
    """`write(staging)`'s summary, once the folder it wrote has replaced `out`; `out` is checked again because
    the user may have put a file there while the model ran."""
    from backend.commands.predict_outputs import check_output_folder, writing

    check_output_folder(out, COMMAND_NAME, inputs=[volume])
    with writing(out), staged_folder(out) as staging:
        return write(staging)


def model_view(image, resample: bool):
    """(the model view of a SimpleITK image, None) or, for a tilted image with `resample`, (the view of it
    resampled onto the nearest axial grid, what was done)."""
    from SlicerMiniGPTPancreas import geometry

    try:
        return geometry.ModelView.from_volume(*geometry.volume_from_sitk(image)), None
    except geometry.ObliqueVolumeError:
        if not resample:
            raise
    tilt = geometry.tilt_displacement_voxels(geometry.ras_matrix_from_sitk(image)[:3, :3], image.GetSize())
    view = geometry.ModelView.from_volume(*geometry.volume_from_sitk(geometry.resample_to_axial(image)))
    return view, (f"tilted (up to {tilt:.2f} voxels across it) and was resampled onto the nearest axial grid "
                  "(linear interpolation): slice numbers and pixel boxes refer to that grid, RAS positions to the "
                  "patient")


def sweep_volume(engine, view, chosen: range, max_new_tokens: int = 20) -> list:
    """The cascade's answers about the `chosen` model-view slices, with a progress bar."""
    from tqdm import tqdm

    from backend.cascade_sweep import sweep_cascade

    with tqdm(unit="answer", desc="cascade", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return sweep_cascade(engine, [view.slice(s) for s in chosen], max_new_tokens=max_new_tokens,
                             progress=progress, close_up_zoom=engine.close_up_zoom)


def parse_slices(text: str | None, count: int) -> range:
    """Model-view slices chosen by "START:STOP" (STOP exclusive, ends optional) or "N"; all for None."""
    if text is None:
        return range(count)
    match = _SLICES.match(text)
    if not match or (not match.group(2) and not match.group(1)):
        raise PredictError(f"--slices {text!r} is not START:STOP (e.g. 10:30), START:, :STOP or one slice number.")
    start_text, colon, stop_text = match.groups()
    start = int(start_text) if start_text else 0
    stop = (int(stop_text) if stop_text else count) if colon else start + 1
    if start >= stop:
        raise PredictError(f"--slices {text!r} selects nothing: START must be below STOP.")
    if stop > count:
        raise PredictError(f"--slices {text!r} goes past the last slice: the volume has {count} axial slices "
                           f"(0..{count - 1}).")
    return range(start, stop)


def _volume_name(volume: Path) -> str:
    name = volume.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "volume"
    return name or "volume"


def _check_options(args: argparse.Namespace, prompt: str) -> None:
    if args.cascade and (args.prompt is not None or args.label is not None or args.constrain_boxes):
        raise PredictError("--cascade asks its own three questions; leave out --prompt, --label and "
                           "--constrain-boxes.")
    if args.max_new_tokens < 1:
        raise PredictError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    prompts.check_question(prompt, "--prompt")
    if len(prompt) > MAX_PROMPT_CHARS:  # the service's limit: a longer question would crowd the image out
        raise PredictError(f"--prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}. Ask a shorter "
                           "question.")


def _predict(engine, slices: list, prompt: str, args: argparse.Namespace) -> list:
    """The answers to `prompt`, of close-ups where the model asks for them (`backend.close_up`)."""
    from tqdm import tqdm

    from backend.close_up import answer_closer

    with tqdm(unit="answer", desc="predict", file=sys.stderr) as bar:
        def ask(some: list, question: str) -> list:
            start = bar.n
            bar.total = (bar.total or 0) + len(some)
            return engine.run(some, question, max_new_tokens=args.max_new_tokens,
                              constrain_boxes=args.constrain_boxes,
                              progress=lambda done, total: bar.update(start + done - bar.n))

        return answer_closer(ask, slices, prompt, engine.close_up_zoom)


def _print_summary(summary: dict, out: Path) -> None:
    slices = summary["slices"]
    print(f"{summary['model']} on {summary['device']} ({summary['precision']}): {slices['count']} slices "
          f"({slices['first']}..{slices['last']}) of {summary['volume']} in {summary['seconds']:.1f} s")
    print(f"  prompt: {summary['prompt']}")
    print(f"  answers: {', '.join(f'{n} {kind}' for kind, n in summary['answers_by_kind'].items()) or 'none'}; "
          f"{summary['boxes']} boxes on {summary['slices_with_boxes']} slices")
    if summary["yes_answers"] is not None:
        print(f"  yes on {summary['yes_answers']} slices")
    print(f"  wrote {out}/: {', '.join(summary['files'])} (open boxes.mrk.json in 3D Slicer: File > Add Data)")


def _print_cascade_summary(summary: dict, out: Path) -> None:
    slices = summary["slices"]
    print(f"{summary['model']} on {summary['device']} ({summary['precision']}): cascade on {slices['count']} slices "
          f"({slices['first']}..{slices['last']}) of {summary['volume']} in {summary['seconds']:.1f} s")
    print(f"  pancreas boxes on {summary['pancreas_boxes']} slices; tumour said yes on {summary['tumour_yes']}, "
          f"tumour boxes on {summary['tumour_boxes']}")
    print(f"  wrote {out}/: {', '.join(summary['files'])} (open boxes.mrk.json in 3D Slicer: File > Add Data)")
