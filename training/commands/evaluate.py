"""`minigpt-pancreas-train evaluate`: the paper's tables for a model on the prepared test sets (training/evaluate.py
does the work; this module parses options, loads the model and prints the summary). Without --model, --upstream or
--rescore it evaluates the bundled demo model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.commands.model_options import (add_model_arguments, close_up_zoom_of, engine_from_args,
                                            resolve_model_source)
from training.evaluate_figures import DEFAULT_EXAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, metavar="OUT",
                        help="the output folder of `prepare` (with tasks/); with --rescore, default: the one used")
    source = add_model_arguments(parser, close_up=True)  # --model may also be a fit output folder: its latest model
    source.add_argument("--rescore", action="store_true",
                        help="score the answers saved in --out again, without the model (fast)")
    parser.add_argument("--tasks", metavar="T1,T2", help="comma-separated task names (default: every task with a "
                        "test set; with --rescore every task with saved answers)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="evaluation folder (default: ./evaluation-<model name>); rerunning the same command "
                             "resumes it")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                        help="answer length limit (default 20, upstream)")
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="detection answers may only be one box (upstream did not constrain them)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N entries of each task (smoke runs)")
    parser.add_argument("--grey-curve", metavar="LOW,HIGH,GAMMA",
                        help="pass every slice through v -> clip((v - LOW) / (HIGH - LOW)) ** GAMMA (grey levels 0-1) "
                             "first, to see how the model copes with another scanner's contrast; e.g. 0,1,1.5 darkens "
                             "soft tissue, -0.2,1.2,1 flattens contrast (default: the slices as they are)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, metavar="N",
                        help="example overlays per detection task in examples/, best to worst IoU (default "
                             "%(default)s; 0: none)")
    parser.add_argument("--force", action="store_true",
                        help="delete the answers already in --out (of another model or settings) and start over")


def run(args: argparse.Namespace) -> int:
    from training.evaluate import check_run_folder, evaluate, rescore, resolve_tasks, run_settings
    from training.evaluate_tasks import EvaluateError
    from training.export import model_folder_of

    for option in ("max_new_tokens", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise EvaluateError(f"--{option.replace('_', '-')} must be at least 1, got {value}.")
    if args.examples < 0:
        raise EvaluateError(f"--examples must be 0 or more, got {args.examples}.")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    if args.rescore:
        if args.out is None:
            raise EvaluateError("--rescore needs --out: the evaluation folder that holds the saved answers.")
        metrics = rescore(args.out, args.prepared, tasks, args.limit, examples=args.examples)
        _print_summary(metrics, args.out)
        return 0
    if args.prepared is None:
        raise EvaluateError("--prepared is required: the output folder of `minigpt-pancreas-train prepare`.")
    if args.model is not None:
        args.model = model_folder_of(args.model)
    resolve_model_source(args)  # prints which model, first, when it is the bundled one
    model_id, description, name = _model_identity(args)
    out = args.out or Path(f"evaluation-{name}")
    settings = run_settings(model_id, description, args.prepared, max_new_tokens=args.max_new_tokens,
                            constrain_boxes=args.constrain_boxes, grey_curve=_grey_curve(args.grey_curve),
                            close_up_zoom=close_up_zoom_of(args))
    # Everything cheap is checked before the model loads: a typo should not cost minutes.
    resolve_tasks(args.prepared, tasks, args.limit, check_images=True)
    check_run_folder(out, settings, args.force)
    engine = engine_from_args(args)
    settings.update(device=engine.device, precision=engine.precision)
    with _ProgressBars() as progress:
        metrics = evaluate(engine, args.prepared, out, settings, tasks, limit=args.limit, force=args.force,
                           progress=progress, examples=args.examples)
    _print_summary(metrics, out)
    return 0


def _grey_curve(text: str | None):
    """The --grey-curve option as a GreyCurve (None when not given); a one-line error when malformed."""
    from training.augment import GreyCurve
    from training.evaluate_tasks import EvaluateError

    if text is None:
        return None
    try:
        low, high, gamma = (float(value) for value in text.split(","))
    except ValueError:
        raise EvaluateError(f"--grey-curve takes three numbers LOW,HIGH,GAMMA (e.g. 0,1,1.5), got {text!r}.") from None
    if not (-1 <= low < high <= 2 and 0.1 <= gamma <= 10):
        raise EvaluateError(f"--grey-curve {text}: need -1 <= LOW < HIGH <= 2 and 0.1 <= GAMMA <= 10.")
    return GreyCurve(low, high, gamma)


def _model_identity(args: argparse.Namespace) -> tuple[str, str, str]:
    """(id of the weights, description, short name for the default --out), before the model loads."""
    from backend.model_dir import read_manifest

    if args.model is not None:
        manifest = read_manifest(args.model)
        folder = args.model.absolute()
        name = f"{folder.parent.name}-{folder.name}" if folder.name.startswith("model_epoch_") else folder.name
        card_id = (manifest.get("card") or {}).get("model_id")  # an exported folder names itself
        return f"sha256:{manifest['tensors']['sha256']}", str(folder), card_id or name
    checkpoint = args.upstream[2].absolute()
    return f"upstream:{checkpoint}:{checkpoint.stat().st_size}", str(checkpoint), checkpoint.stem


class _ProgressBars:
    """A context manager giving a progress callback that shows one tqdm bar per task on stderr."""

    def __enter__(self):
        self.bar, self.task = None, None
        return self.update

    def update(self, task: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if task != self.task:
            self.__exit__()
            self.bar, self.task = tqdm(total=total, unit="slice", desc=task, file=sys.stderr), task
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(metrics: dict, out: Path) -> None:
    def fraction(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for task, result in {**metrics["tasks"], **metrics["combined"]}.items():
        baseline = result["baseline"]
        if result.get("kind") == "yes_no":
            rules = result["rules"]
            print(f"{task} ({result['dataset']}, n={result['n']}): accuracy upstream "
                  f"{fraction(rules['upstream']['accuracy'])} / strict {fraction(rules['strict']['accuracy'])}, "
                  f"balanced strict {fraction(rules['strict']['balanced_accuracy'])}, AUC "
                  f"{fraction(result['auc']['value'])}; majority class {fraction(baseline.get('accuracy'))}")
            continue
        variants = result["variants"]
        ious = ", ".join(f"{name} {fraction(variants[name].get('mean_iou'))}" for name in variants)
        print(f"{task} ({result['dataset']}, n={result['n']}): mean IoU {ious}; detection accuracy STRICT "
              f"{fraction(variants['STRICT']['detection_accuracy'])}; fixed box IoU STRICT "
              f"{fraction(baseline.get('mean_iou'))}")
    for note in metrics["notes"]:
        if "no saved answer" in note:
            print(f"note: {note}")
    figures = metrics["figures"]
    written = f"{figures['iou_histograms']}, {figures['heatmaps']}, {len(figures['examples'])} examples" \
        if "skipped" not in figures else f"no figures: {figures['skipped']}"
    print(f"wrote {Path(out).absolute()}/: metrics.json, tables.md, tables.csv, {written}")
