"""`minigpt-pancreas-train evaluate`: answer every test entry of the chosen task sets, keep each raw answer, score.

The output folder (`--out`) holds:

    run.json                   what produced the predictions: model identity, prompts, answer length
    predictions/<task>.jsonl   one line per answered test entry: q_id, image, prompt, answer, yes_probability,
                               box_confidence (of the first box; `evaluate_confidence`), seconds. Lines are
                               appended (and synced) after every batch, so an interrupted run keeps what it
                               did and the same command later answers only the missing q_ids.
    metrics.json, tables.md, tables.csv   the model's numbers beside the baselines' (`evaluate_report`)
    iou_histograms.png, heatmaps.png, examples/   the figures (`evaluate_figures`)

Prompts are upstream's evaluation prompts (docs/upstream.md 6.1, 6.3): "[refer] give me the location of the
{phrase}" for detection entries (they carry a `phrase`), the fixed `TC_EVAL_PROMPT` for yes/no entries. That
one prompt was never trained on, so every yes/no task is also asked, and reported as `<task>@training_prompt`,
with one of the training prompts (the one the cascade validates with). The
yes/no probability comes from the same answer's first-token logits. Scoring (`evaluate_scoring`) reads only the
saved answers, so `rescore` compares protocols without the model.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from training.augment import GreyCurve, apply_grey_curve
from training.evaluate_baseline import add_baselines
from training.evaluate_close_up import answer_looking_closer
from training.evaluate_figures import DEFAULT_EXAMPLES, FIGURE_FILES, remove_examples, write_figures
from training.evaluate_report import REPORT_FILES, write_reports
from training.evaluate_scoring import score_all
from training.evaluate_tasks import (
    TRAINING_PROMPT_SUFFIX, EvaluateError, TaskSet, entry_prompt, prompts_used, with_training_prompts,
)

COMMAND_NAME = "minigpt-pancreas-train evaluate"
RUN_FILE = "run.json"
PREDICTIONS_DIR = "predictions"
TEST_SUFFIX = "_test.json"
# run.json keys that must match for saved predictions to be reused (the prepared folder may move).
_SAME_RUN_KEYS = ("model_id", "max_new_tokens", "constrain_boxes", "prompts", "grey_curve", "close_up_zoom")
_DETECTION_KEYS = ("q_id", "image", "answer", "phrase", "bbox", "width", "height")
_YES_NO_KEYS = ("q_id", "image", "answer")

Progress = Callable[[str, int, int], None]  # (task, entries answered so far, entries of the task)


# ------------------------------------------------------------------------------------------------ task sets

def available_tasks(prepared: Path) -> list[str]:
    """Tasks with a non-empty test file in `prepared/tasks/`, sorted (a small dataset can leave a task empty)."""
    files = (Path(prepared) / "tasks").glob(f"*{TEST_SUFFIX}")
    return sorted(path.name[: -len(TEST_SUFFIX)] for path in files if not _is_empty_list(path))


def _is_empty_list(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")) == []
    except (OSError, ValueError):
        return False  # unreadable: load_task says so when the task is asked for


def load_task(prepared: Path, task: str, limit: int | None = None, split: str = "test") -> TaskSet:
    """Read and check `prepared/tasks/<task>_<split>.json` (the test split unless the cascade validates on
    "val"); keep its first `limit` entries when given. `<task>@training_prompt` reads `<task>`'s file."""
    path = Path(prepared) / "tasks" / f"{task.removesuffix(TRAINING_PROMPT_SUFFIX)}_{split}.json"
    if not path.is_file():
        known = ", ".join(available_tasks(prepared)) or "none"
        raise EvaluateError(f"no {split} set for task {task!r}: {path} is missing. Tasks in {prepared}: {known}."
                            + (" Prepare with --val-ratio to get validation sets." if split == "val" else ""))
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluateError(f"cannot read {path}: {error}. Re-run `prepare`.") from error
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise EvaluateError(f"{path} holds no test entries (expected a non-empty JSON list of objects).")
    kind = "detection" if "phrase" in entries[0] else "yes_no"
    required = _DETECTION_KEYS if kind == "detection" else _YES_NO_KEYS
    for entry in entries:
        missing = [key for key in required if key not in entry]
        if missing:
            raise EvaluateError(f"{path}: entry q_id={entry.get('q_id')} lacks {missing}; every {kind} entry needs "
                                f"{list(required)}. Re-run `prepare` with this version.")
    q_ids = [entry["q_id"] for entry in entries]
    if len(set(q_ids)) != len(q_ids):
        raise EvaluateError(f"{path}: q_ids repeat; every entry needs its own q_id. Re-run `prepare`.")
    return TaskSet(task, kind, entries[:limit] if limit else entries)


def resolve_tasks(prepared: Path, names: Sequence[str] | None, limit: int | None = None,
                  check_images: bool = False) -> list[TaskSet]:
    """The named tasks (default: every task with a test file), checked (with their PNGs when `check_images`)
    before any model time is spent."""
    names = list(names) if names else available_tasks(prepared)
    if not names:
        raise EvaluateError(f"{Path(prepared) / 'tasks'} holds no *{TEST_SUFFIX} files; is {prepared} the output "
                            "folder of `minigpt-pancreas-train prepare`?")
    tasks = [load_task(prepared, name, limit) for name in dict.fromkeys(names)]
    for task in tasks if check_images else ():
        missing = [entry["image"] for entry in task.entries if not (Path(prepared) / entry["image"]).is_file()]
        if missing:
            raise EvaluateError(f"{len(missing)} image(s) of {task.name} are missing under {prepared}, e.g. "
                                f"{missing[0]}; give the folder `prepare` wrote (--prepared) or re-run `prepare`.")
    return tasks


# ---------------------------------------------------------------------------------------------- predictions

def predictions_path(out: Path, task: str) -> Path:
    return Path(out) / PREDICTIONS_DIR / f"{task}.jsonl"


def read_predictions(path: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """({q_id: record}, number of unreadable lines). A line cut short by a crash is unreadable and dropped."""
    records: dict[int, dict[str, Any]] = {}
    broken = 0
    if not path.is_file():
        return records, 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            records[int(record["q_id"])] = record
        except (ValueError, TypeError, KeyError):
            broken += 1
    return records, broken


def checked_predictions(out: Path, task: TaskSet) -> dict[int, dict[str, Any]]:
    """The saved answers of `task` by q_id, each checked to belong to the same image as its test entry."""
    records, _ = read_predictions(predictions_path(out, task.name))
    _check_images(out, task, records)
    return records


def _check_images(out: Path, task: TaskSet, records: dict[int, dict[str, Any]]) -> None:
    for entry in task.entries:
        record = records.get(entry["q_id"])
        if record is not None and record.get("image") != entry["image"]:
            raise EvaluateError(
                f"{predictions_path(out, task.name)}: q_id {entry['q_id']} was answered on {record.get('image')} but "
                f"the test set now has {entry['image']} there: the task files changed since. Evaluate into a new "
                "--out, or pass --force to start over.")


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append whole lines and sync them, so a crash after this call loses none of them."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _drop_broken_lines(path: Path, records: dict[int, dict[str, Any]]) -> None:
    """Rewrite the file without a torn last line before appending to it again."""
    text = "".join(json.dumps(record) + "\n" for record in records.values())
    atomic_write_bytes(path, text.encode("utf-8"))


def _load_rgb(prepared: Path, entry: dict[str, Any], grey_curve: list[float] | None = None):
    """[H, W, 3] uint8 of the entry's slice, as upstream's loader converts it (through `grey_curve` when given)."""
    import numpy as np
    from PIL import Image

    with Image.open(Path(prepared) / entry["image"]) as image:
        rgb = image.convert("RGB")
    return np.asarray(apply_grey_curve(rgb, GreyCurve(*grey_curve)) if grey_curve else rgb)


def predict_task(engine, prepared: Path, out: Path, task: TaskSet, *, max_new_tokens: int = 20,
                 constrain_boxes: bool = False, progress: Progress | None = None,
                 yes_no_prompt: str | None = None, grey_curve: list[float] | None = None,
                 close_up_zoom: float | None = None) -> int:
    """Answer the entries of `task` that have no saved answer yet, one engine batch at a time; return how many.
    yes_no_prompt: ask yes/no entries this instead of upstream's evaluation prompt; grey_curve: [low, high,
    gamma] of `training.augment.GreyCurve`, applied to every slice first (another scanner's contrast);
    close_up_zoom: ask pancreas, tumour and tumour yes/no entries of a close-up round the model's own pancreas box
    (`evaluate_close_up`), as `predict --cascade` does."""
    path = predictions_path(out, task.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, broken = read_predictions(path)
    if broken:
        _drop_broken_lines(path, done)
    _check_images(out, task, done)
    pending = [entry for entry in task.entries if entry["q_id"] not in done]
    answered = len(task.entries) - len(pending)
    for begin in range(0, len(pending), engine.batch_size):
        batch = pending[begin: begin + engine.batch_size]
        questions = [yes_no_prompt if yes_no_prompt and task.kind == "yes_no" else entry_prompt(task, entry)
                     for entry in batch]
        images = [_load_rgb(prepared, entry, grey_curve) for entry in batch]
        ask = functools.partial(engine.run_rgb, max_new_tokens=max_new_tokens,
                                constrain_boxes=constrain_boxes and task.kind == "detection")
        looks = answer_looking_closer(ask, task, batch, images, questions, close_up_zoom) if close_up_zoom \
            else [{"answer": result.answer, "result": result} for result in ask(images, questions)]
        _append(path, [{"q_id": entry["q_id"], "image": entry["image"], "prompt": question, "answer": look["answer"],
                        "yes_probability": look["result"].yes_probability,
                        "box_confidence": look["result"].boxes[0].confidence if look["result"].boxes else None,
                        "seconds": round(look["result"].inference_ms / 1000, 4),
                        **{key: value for key, value in look.items() if key not in ("answer", "result")}}
                       for entry, question, look in zip(batch, questions, looks)])
        answered += len(batch)
        if progress is not None:
            progress(task.name, answered, len(task.entries))
    return len(pending)


# ------------------------------------------------------------------------------------------------- the run

def run_settings(model_id: str, model_description: str, prepared: Path, *, max_new_tokens: int = 20,
                 constrain_boxes: bool = False, grey_curve: GreyCurve | None = None,
                 close_up_zoom: float | None = None, **details: Any) -> dict[str, Any]:
    """The run.json record. model_id identifies the weights (e.g. the model folder's tensors sha256)."""
    return {"command": COMMAND_NAME, "model_id": model_id, "model": model_description,
            "prepared": str(Path(prepared).absolute()), "max_new_tokens": max_new_tokens,
            "constrain_boxes": constrain_boxes, "close_up_zoom": close_up_zoom, "prompts": prompts_used(),
            "grey_curve": [grey_curve.low, grey_curve.high, grey_curve.gamma] if grey_curve else None, **details}


def read_run(out: Path) -> dict[str, Any] | None:
    """The run.json of an evaluation folder, or None when there is none."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluateError(f"cannot read {path}: {error}. Pass --force to start over.") from error


def check_run_folder(out: Path, settings: dict[str, Any], force: bool = False) -> None:
    """Refuse an `out` that holds predictions of another run (unless `force`) or files of something else."""
    out = Path(out)
    previous = read_run(out) if not force else None
    if previous is not None:
        changed = [key for key in _SAME_RUN_KEYS if previous.get(key) != settings.get(key)]
        if changed:
            raise EvaluateError(f"--out {out} holds predictions of another run (different {', '.join(changed)}: "
                                f"{previous.get('model')!r} there). Choose another --out, or pass --force to delete "
                                "them and start over.")
    elif not force and out.is_dir() and any(out.iterdir()) and not (out / PREDICTIONS_DIR).is_dir():
        raise EvaluateError(f"--out {out} exists and is not an evaluation folder; choose a new or empty folder.")


def start_run(out: Path, settings: dict[str, Any], force: bool = False) -> None:
    """`check_run_folder`, then (with `force`) delete the earlier predictions and reports, and write run.json."""
    out = Path(out)
    check_run_folder(out, settings, force)
    if force:
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RUN_FILE, (json.dumps(settings, indent=1) + "\n").encode())


def _clear(out: Path) -> None:
    """Delete this command's files in `out` (and nothing else)."""
    for name in (RUN_FILE, *REPORT_FILES, *FIGURE_FILES):
        (out / name).unlink(missing_ok=True)
    remove_examples(out)
    for path in (out / PREDICTIONS_DIR).glob("*.jsonl"):
        path.unlink()


def evaluate(engine, prepared: Path, out: Path, settings: dict[str, Any], tasks: Sequence[str] | None = None, *,
             limit: int | None = None, force: bool = False, progress: Progress | None = None,
             examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """Answer the test sets of `tasks` with `engine` (resuming), then score and write the reports and figures
    (`examples` overlays per detection task); return the metrics. settings: `run_settings(...)`; its
    max_new_tokens / constrain_boxes drive the engine."""
    task_sets = with_training_prompts(resolve_tasks(prepared, tasks, limit, check_images=True))
    start_run(out, settings, force)
    for task in task_sets:
        predict_task(engine, prepared, out, task, max_new_tokens=settings["max_new_tokens"],
                     constrain_boxes=settings["constrain_boxes"], progress=progress,
                     grey_curve=settings.get("grey_curve"), close_up_zoom=settings.get("close_up_zoom"))
    return _score_and_report(out, Path(prepared), task_sets, settings, examples)


def rescore(out: Path, prepared: Path | None = None, tasks: Sequence[str] | None = None,
            limit: int | None = None, examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """Score saved predictions again (no model): `prepared` defaults to the one in run.json, `tasks` to every
    task with a predictions file."""
    out = Path(out)
    run = read_run(out) or {}
    source = prepared or run.get("prepared")
    if not source:
        raise EvaluateError(f"{out} does not record its prepared folder; pass --prepared (the folder with tasks/).")
    prepared = Path(source)
    if not (prepared / "tasks").is_dir():
        raise EvaluateError(f"{prepared} has no tasks/ folder; pass --prepared: the output folder of `prepare`.")
    if not tasks:
        tasks = sorted(path.stem for path in (out / PREDICTIONS_DIR).glob("*.jsonl"))
        if not tasks:
            raise EvaluateError(f"{out / PREDICTIONS_DIR} holds no predictions; run evaluate with --model first.")
    return _score_and_report(out, prepared, resolve_tasks(prepared, tasks, limit), {**run, "prepared": str(prepared)},
                             examples)


def _score_and_report(out: Path, prepared: Path, task_sets: list[TaskSet], run: dict[str, Any],
                      examples: int) -> dict[str, Any]:
    predictions = {task.name: checked_predictions(out, task) for task in task_sets}
    metrics, ious = score_all(task_sets, predictions)
    add_baselines(metrics, prepared, task_sets)
    figures = write_figures(Path(out), prepared, task_sets, predictions, ious, examples)
    metrics = {"run": run, **metrics, "figures": figures}
    write_reports(Path(out), metrics)
    return metrics
