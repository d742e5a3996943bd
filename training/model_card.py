"""MODEL_CARD.md of a cascade's exported model: what it is, what it was trained on, how it was chosen, its numbers.

Written by `minigpt-pancreas-train cascade` from the run's own records (the cascade file, cascade_state.json and
the test-split metrics.json), so the card always describes the model beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.cascade_config import CascadeConfig

# (task, organ or None, label) rows of the headline table, when the run evaluated them
_DETECTION_ROWS = (
    ("pancreas_detection_msd", None, "pancreas (MSD-layout phantoms)"),
    ("pancreas_detection_nih", None, "pancreas (NIH-layout phantoms)"),
    ("tumor_detection_msd", None, "tumour"),
    ("multi_organ_abdomenct1k", "liver", "liver (AbdomenCT-1K-layout phantoms)"),
    ("multi_organ_abdomenct1k", "kidney", "kidney (the patient's right one, as upstream)"),
    ("multi_organ_abdomenct1k", "spleen", "spleen"),
    ("multi_organ_abdomenct1k", "pancreas", "pancreas (AbdomenCT-1K-layout phantoms)"),
)


def write_model_card(path: Path, config: CascadeConfig, state: dict[str, Any], metrics: dict[str, Any],
                     model_id: str) -> None:
    lines = [f"# {model_id}", "", config.export.get("description", ""), "",
             "**Synthetic demonstration model, not for clinical use.** " if config.export.get("synthetic") else "",
             "## What it is", "",
             "MiniGPT-v2's code (EVA ViT, token merge, `llama_proj`, LLaMA, LoRA on q_proj/v_proj) at small sizes:",
             "", f"`{_sizes(config)}`", "",
             "## How it was built", "",
             f"`minigpt-pancreas-train cascade {_relative(config.file)}` ({state.get('minutes', '?')} minutes for the "
             "whole run on the machine that built it). Stages, each starting from the epoch its predecessor chose "
             "on the validation split (held-out training volumes):", "",
             "| stage | starts from | chosen epoch | validation score per epoch |", "|---|---|---|---|"]
    for stage in config.stages:
        record = state["stages"].get(stage.name, {})
        start = stage.start if isinstance(stage.start, str) else next(iter(stage.start))
        by_epoch = sorted(record.get("scores", {}).items(), key=lambda item: int(item[0]))
        scores = ", ".join(f"{epoch}: {score:.3f}" for epoch, score in by_epoch) or "none (last epoch kept)"
        lines.append(f"| {stage.name} | {start} | {record.get('chosen_epoch')} | {scores} |")
    lines += ["", f"The exported model is stage `{config.final}`.", "", _data_line(config), "", _close_up_line(config),
              "",
              "## Test-split numbers (STRICT protocol: every entry counts, an unreadable answer scores 0)", "",
              "| structure | n | mean IoU | fixed box (mean training box) |", "|---|---|---|---|"]
    lines += [row for row in (_detection_row(metrics, *spec) for spec in _DETECTION_ROWS) if row]
    lines += ["", "| tumour yes/no | n | balanced accuracy | accuracy | AUC | majority class |",
              "|---|---|---|---|---|---|"]
    lines += [row for row in (_yes_no_row(metrics, task) for task in ("tumor_classification",)) if row]
    lines += ["", "Every table of the evaluation, under upstream's protocols too, is in `report/tables.md`; figures in "
              "`report/`.", ""]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n", encoding="utf-8")


def _close_up_line(config: CascadeConfig) -> str | None:
    zoom = config.export.get("close_up_zoom")
    if not zoom:
        return None
    return (f"It is asked about the pancreas and its tumour in two looks (`inference.close_up_zoom` {zoom:g} in its "
            "manifest; `backend/close_up.py`): the pancreas box of the whole slice, then the question again of a "
            f"window {zoom:g} times closer round that box. The window comes from the model's own first answer, never "
            "from the truth. The pancreas and tumour numbers below are of those two-look answers, as "
            "`predict --cascade` gives them.")


def _detection_row(metrics: dict, task: str, organ: str | None, label: str) -> str | None:
    result = metrics["tasks"].get(task)
    if result is None or (organ and organ not in result.get("organs", {})):
        return None
    part = result["organs"][organ] if organ else result
    strict = part["variants"]["STRICT"]
    return f"| {label} | {strict['n']} | {_f(strict['mean_iou'])} | {_f(part['baseline'].get('mean_iou'))} |"


def _yes_no_row(metrics: dict, task: str) -> str | None:
    result = metrics["tasks"].get(task)
    if result is None:
        return None
    strict = result["rules"]["strict"]
    return (f"| {task} | {strict['n']} | {_f(strict['balanced_accuracy'])} | {_f(strict['accuracy'])} | "
            f"{_f(result['auc'].get('value'))} | {_f(result['baseline'].get('accuracy'))} |")


def _sizes(config: CascadeConfig) -> str:
    first = config.stages[0].start
    return ", ".join(f"{k} {v}" for k, v in first.get("scratch", first).items()) if isinstance(first, dict) else ""


def _data_line(config: CascadeConfig) -> str:
    if config.phantoms is None:
        return f"Data: the prepared folder {config.prepared}."
    p = config.phantoms
    return (f"Data: synthetic CT phantoms written in the public datasets' layouts and read back by `prepare` "
            f"({p.msd} MSD Task07-style with tumour, {p.nih} NIH-style DICOM with a healthy pancreas, "
            f"{p.abdomenct1k} AbdomenCT-1K-style with organ masks; seed {p.seed}), each with its own matrix, field "
            f"of view, slice thickness, orientation, noise, contrast and anatomy; split by volume into train / "
            f"validation / test with {config.prepare}.")


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
