"""`minigpt-pancreas-train evaluate`: the paper's tables for a model on the prepared test sets (training/evaluate.py
does the work; this module parses options, loads the model and prints the summary)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, metavar="OUT",
                        help="the output folder of `prepare` (with tasks/); with --rescore, default: the one used")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="DIR",
                        help="a model folder (import-upstream, or fit's model_epoch_N/); a fit output folder means "
                             "its latest model")
    source.add_argument("--upstream", nargs=3, type=Path, metavar=("VIT", "LLAMA", "CKPT"),
                        help="the original files: eva_vit_g.pth, the LLaMA-2 folder, a MiniGPT .pth")
    source.add_argument("--rescore", action="store_true",
                        help="score the answers saved in --out again, without the model (fast)")
    parser.add_argument("--tasks", metavar="T1,T2", help="comma-separated task names (default: every task with a "
                        "test set; with --rescore every task with saved answers)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="evaluation folder (default: ./evaluation-<model name>); rerunning the same command "
                             "resumes it")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="slices per model call (default 8)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="weights precision (default: float32 on cpu, bfloat16/float16 on cuda)")
    parser.add_argument("--image-size", type=int, default=448, metavar="PX",
                        help="with --upstream: model input side (448)")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                        help="answer length limit (default 20, upstream)")
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="detection answers may only be one box (upstream did not constrain them)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N entries of each task (smoke runs)")
    parser.add_argument("--force", action="store_true",
                        help="delete the answers already in --out (of another model or settings) and start over")


def run(args: argparse.Namespace) -> int:
    from training.evaluate import EvaluateError, check_run_folder, evaluate, rescore, resolve_tasks, run_settings

    for option in ("batch_size", "max_new_tokens", "image_size", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise EvaluateError(f"--{option.replace('_', '-')} must be at least 1, got {value}.")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    if args.rescore:
        if args.out is None:
            raise EvaluateError("--rescore needs --out: the evaluation folder that holds the saved answers.")
        metrics = rescore(args.out, args.prepared, tasks, args.limit)
        _print_summary(metrics, args.out)
        return 0
    if args.prepared is None:
        raise EvaluateError("--prepared is required: the output folder of `minigpt-pancreas-train prepare`.")
    model_id, description, name = _model_identity(args)
    out = args.out or Path(f"evaluation-{name}")
    settings = run_settings(model_id, description, args.prepared, max_new_tokens=args.max_new_tokens,
                            constrain_boxes=args.constrain_boxes)
    # Everything cheap is checked before the model loads: a typo should not cost minutes.
    resolve_tasks(args.prepared, tasks, args.limit, check_images=True)
    check_run_folder(out, settings, args.force)
    engine = _load_engine(args)
    settings.update(device=engine.device, precision=engine.precision)
    with _ProgressBars() as progress:
        metrics = evaluate(engine, args.prepared, out, settings, tasks, limit=args.limit, force=args.force,
                           progress=progress)
    _print_summary(metrics, out)
    return 0


def _model_folder(path: Path) -> Path:
    """The model folder itself, or the latest model of a `fit` output folder."""
    from backend.model_dir import MANIFEST_FILE

    latest = path / "latest.json"
    if not (path / MANIFEST_FILE).is_file() and latest.is_file():
        return path / json.loads(latest.read_text())["model_dir"]
    return path


def _model_identity(args: argparse.Namespace) -> tuple[str, str, str]:
    """(id of the weights, description, short name for the default --out), checked before the model loads."""
    from backend.model_dir import read_manifest
    from training.evaluate import EvaluateError

    if args.model is not None:
        if not args.model.is_dir():
            raise EvaluateError(f"model folder not found: {args.model}. Give a model folder (import-upstream, fit's "
                                "model_epoch_N) or the original files with --upstream VIT LLAMA CKPT.")
        args.model = _model_folder(args.model)
        manifest = read_manifest(args.model)
        folder = args.model.absolute()
        name = f"{folder.parent.name}-{folder.name}" if folder.name.startswith("model_epoch_") else folder.name
        return f"sha256:{manifest['tensors']['sha256']}", str(folder), name
    for what, path in zip(("EVA ViT file", "LLaMA folder", "MiniGPT checkpoint"), args.upstream):
        if not path.exists():
            raise EvaluateError(f"--upstream: {what} not found: {path}.")
    checkpoint = args.upstream[2].absolute()
    return f"upstream:{checkpoint}:{checkpoint.stat().st_size}", str(checkpoint), checkpoint.stem


def _load_engine(args: argparse.Namespace):
    from backend.engine import load_engine

    return load_engine(model_dir=args.model, upstream=args.upstream, image_size=args.image_size, device=args.device,
                       dtype=None if args.dtype == "auto" else args.dtype, batch_size=args.batch_size)


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
        if result.get("kind") == "yes_no":
            rules = result["rules"]
            print(f"{task} ({result['dataset']}, n={result['n']}): accuracy upstream "
                  f"{fraction(rules['upstream']['accuracy'])} / strict {fraction(rules['strict']['accuracy'])}, "
                  f"AUC {fraction(result['auc']['value'])}")
            continue
        variants = result["variants"]
        ious = ", ".join(f"{name} {fraction(variants[name].get('mean_iou'))}" for name in variants)
        print(f"{task} ({result['dataset']}, n={result['n']}): mean IoU {ious}; detection accuracy STRICT "
              f"{fraction(variants['STRICT']['detection_accuracy'])}")
    for note in metrics["notes"]:
        if "no saved answer" in note:
            print(f"note: {note}")
    print(f"wrote {Path(out).absolute()}/: metrics.json, tables.md, tables.csv"
          + (", iou_histograms.png" if metrics.get("plot") == "iou_histograms.png" else f" ({metrics.get('plot')})"))
