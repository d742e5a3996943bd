"""The evaluation's tables: metrics.json (everything), tables.md (the paper's tables, every number labelled with
its protocol, the baselines beside the model) and tables.csv (the same, one row per task / subset / variant or
baseline). Each file is written whole; the figures are `evaluate_figures`'.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, NamedTuple

from backend.model_dir import provenance_path
from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from training.evaluate_baseline import BOX_LABEL, MAJORITY_LABEL
from training.evaluate_confidence import confidence_table
from training.evaluate_scoring import VARIANT_NAMES

METRICS_FILE, TABLES_MD, TABLES_CSV = "metrics.json", "tables.md", "tables.csv"
REPORT_FILES = (METRICS_FILE, TABLES_MD, TABLES_CSV)
DETECTION_TABLES = (("mean_iou", "IoU", "Mean IoU"),
                    ("mean_dice", "Dice", "Mean box Dice"),
                    ("hit_rate", "hit rate", "Hit rate: hits / answers in the IoU mean"),
                    ("detection_accuracy", "det. acc.", "Detection accuracy: hits / all entries"),
                    ("parse_failure_rate", "failures", "Parse failures: unreadable or missing answers / all entries"))
BASELINE_TABLES = ("mean_iou", "hit_rate")  # the fixed box's numbers, shown beside the model's
YES_NO_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("precision", "precision"),
                  ("recall", "recall"), ("specificity", "specificity"), ("npv", "NPV"), ("f1", "F1"),
                  ("n_unparsed", "unparsed"))
CSV_COLUMNS = ("section", "task", "dataset", "subset", "variant", "predictor", "n", "n_scored", "n_failed",
               "n_missing", "mean_iou", "mean_dice", "hit_rate", "detection_accuracy", "parse_failure_rate", "tp",
               "tn", "fp", "fn", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "npv", "f1",
               "auc", "skipped")
MODEL = "model"
PUBLISHED = (  # docs/upstream.md 6.4; which protocol produced them is not stated (arXiv v1 predates E2/E3)
    ("pancreas detection IoU, NIH", "0.595", "arXiv 2412.15925v1 abstract"),
    ("pancreas detection IoU, MSD", "0.550", "arXiv 2412.15925v1 abstract"),
    ("pancreas detection IoU, NIH+MSD", "0.57", "J Healthc Inform Res 2025"),
    ("tumour classification accuracy / precision / recall", "0.876 / 0.874 / 0.878", "arXiv v1 (upstream TC set)"),
    ("AbdomenCT-1K IoU liver / kidney / spleen / pancreas", "0.8399 / 0.722 / 0.705 / 0.497", "arXiv v1"),
    ("tumour detection IoU", "0.168", "arXiv v1"),
)


def write_reports(out: Path, metrics: dict[str, Any]) -> list[Path]:
    """Write tables.md, tables.csv and metrics.json (last) into `out`; return the paths."""
    out = Path(out)
    atomic_write_bytes(out / TABLES_MD, render_markdown(metrics).encode("utf-8"))
    atomic_write_bytes(out / TABLES_CSV, render_csv(metrics).encode("utf-8"))
    atomic_write_bytes(out / METRICS_FILE, (json.dumps(metrics, indent=1) + "\n").encode("utf-8"))
    return [out / TABLES_MD, out / TABLES_CSV, out / METRICS_FILE]


def _number(value: Any) -> str:
    return "–" if value is None else str(value) if isinstance(value, int) else f"{value:.4f}"


class DetectionRow(NamedTuple):
    label: str
    dataset: str
    n: int
    variants: dict[str, Any]  # {variant: the model's numbers}
    baseline: dict[str, Any]  # the fixed box's STRICT numbers, or {"unavailable": why}


def detection_rows(metrics: dict[str, Any]) -> list[DetectionRow]:
    """Every detection line: tasks, their organs (AbdomenCT-1K) and the datasets combined."""
    rows = []
    for task, result in metrics["tasks"].items():
        if result["kind"] != "detection":
            continue
        for organ, organ_result in result.get("organs", {}).items():
            rows.append(DetectionRow(f"{task} / {organ}", result["dataset"], organ_result["n"],
                                     organ_result["variants"], organ_result.get("baseline", result["baseline"])))
        label = f"{task} (weighted over organs)" if "organs" in result else task
        rows.append(DetectionRow(label, result["dataset"], result["n"], result["variants"], result["baseline"]))
    for name, combined in metrics["combined"].items():
        rows.append(DetectionRow(name, f"{combined['dataset']} weighted", combined["n"], combined["variants"],
                                 combined["baseline"]))
    return rows


def _cell(numbers: dict[str, Any], key: str) -> str:
    return "n/a" if "skipped" in numbers or "unavailable" in numbers else _number(numbers.get(key))


def render_markdown(metrics: dict[str, Any]) -> str:
    """The paper's tables; numbers are fractions (0-1), every column names its protocol."""
    run = metrics.get("run", {})
    prepared = provenance_path(run["prepared"]) if run.get("prepared") else "?"
    lines = ["# Evaluation", "", f"Model: {run.get('model', 'not recorded')}. Prepared data: {prepared}. Numbers are "
             "fractions (0-1); `n/a` = not defined for that protocol.", ""]
    rows = detection_rows(metrics)
    if rows:
        lines += ["## Box detection", ""]
        for key, short, title in DETECTION_TABLES:
            lines += _detection_table(rows, key, short, title)
        lines += _balanced_table(rows)
        lines += confidence_table(metrics)
        lines += _unavailable_baselines(rows)
    lines += _yes_no_table(metrics)
    lines += ["## Published numbers (for comparison)", "", "| metric | value | source |", "|---|---|---|"]
    lines += [f"| {metric} | {value} | {source} |" for metric, value, source in PUBLISHED]
    lines += ["", "The protocol behind the published numbers is not stated; arXiv v1 predates E2/E3, so most "
              "likely E1.", "", "## Notes", ""]
    lines += [f"- {note}" for note in metrics.get("notes", [])]
    if "skipped" in metrics.get("figures", {}):
        lines.append(f"- Figures: {metrics['figures']['skipped']}")
    return "\n".join(lines) + "\n"


def _detection_table(rows: list[DetectionRow], key: str, short: str, title: str) -> list[str]:
    """One metric for every row and protocol, and the fixed box beside them where it has that metric."""
    with_baseline = key in BASELINE_TABLES
    header = [f"{short} {variant}" for variant in VARIANT_NAMES] + [f"{short} {BOX_LABEL}, STRICT"] * with_baseline
    lines = [f"### {title}", "", "| task | dataset | n | " + " | ".join(header) + " |",
             "|---|---|---:|" + "---:|" * len(header)]
    for row in rows:
        cells = [_cell(row.variants.get(variant, {}), key) for variant in VARIANT_NAMES]
        cells += [_cell(row.baseline, key)] * with_baseline
        lines.append(f"| {row.label} | {row.dataset} | {row.n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _unavailable_baselines(rows: list[DetectionRow]) -> list[str]:
    reasons = [f"- {row.label}: {row.baseline['unavailable']}" for row in rows if "unavailable" in row.baseline]
    return [f"{BOX_LABEL} unavailable (shown as n/a):", "", *reasons, ""] if reasons else []


def _balanced_table(rows: list[DetectionRow]) -> list[str]:
    balanced = [row for row in rows if any(numbers.get("accuracy") is not None for numbers in row.variants.values())]
    if not balanced:
        return []
    lines = ["### Balanced sets: is the structure on the slice? (present = positive)", "",
             "| task | dataset | variant | TP | TN | FP | FN | accuracy | precision | recall | specificity | NPV "
             "| F1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in balanced:
        for variant in VARIANT_NAMES:
            values = row.variants.get(variant, {})
            if "skipped" not in values:
                lines.append(f"| {row.label} | {row.dataset} | {variant} | " + " | ".join(
                    _number(values.get(key)) for key in ("tp", "tn", "fp", "fn", "accuracy", "precision", "recall",
                                                         "specificity", "npv", "f1")) + " |")
    return lines + [""]


def _yes_no_table(metrics: dict[str, Any]) -> list[str]:
    tasks = [(task, result) for task, result in metrics["tasks"].items() if result["kind"] == "yes_no"]
    if not tasks:
        return []
    lines = ["## Tumour classification (positive = yes)", "",
             "| task | dataset | rule | n | " + " | ".join(short for _, short in YES_NO_COLUMNS) + " | AUC of P(yes) |",
             "|---|---|---|---:|" + "---:|" * (len(YES_NO_COLUMNS) + 1)]
    for task, result in tasks:
        for rule, report in result["rules"].items():
            lines.append(f"| {task} | {result['dataset']} | {rule} | {report['n']} | " + " | ".join(
                _number(report[key]) for key, _ in YES_NO_COLUMNS) + f" | {_number(result['auc']['value'])} |")
        baseline = result["baseline"]
        label = f"{MAJORITY_LABEL} ('{baseline['answer']}')" if "answer" in baseline else MAJORITY_LABEL
        lines.append(f"| {task}: {label} | {result['dataset']} | any | {baseline.get('n', result['n'])} | "
                     + " | ".join(_cell(baseline, key) for key, _ in YES_NO_COLUMNS) + " | – |")
    return lines + ["", "Rules: upstream = anything but exactly 'yes' counts as 'no'; strict = case and punctuation "
                    "ignored, an answer that is neither yes nor no counts as wrong. The AUC ranks the yes "
                    "probability of the first answer token and does not depend on the rule. The "
                    f"{MAJORITY_LABEL} gives its answer to every test entry (accuracy and balanced accuracy only; "
                    "a tie answers 'no'). A task named `<task>@training_prompt` is the same test set asked with "
                    "one of the prompts the model was trained with, instead of upstream's evaluation prompt, which "
                    "no training set uses.", ""]


def render_csv(metrics: dict[str, Any]) -> str:
    """One row per (task, subset, variant or yes/no rule) of the model, and one per baseline (column
    `predictor`); empty cells where a number does not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in detection_rows(metrics):
        task, _, subset = row.label.partition(" / ")
        subset = subset or ("organs weighted" if "weighted over organs" in row.label else
                            "datasets weighted" if task in metrics["combined"] else "all")
        common = {"section": "detection", "task": task.replace(" (weighted over organs)", ""),
                  "dataset": row.dataset, "subset": subset, "n": row.n}
        for variant in VARIANT_NAMES:
            values = row.variants.get(variant, {})
            writer.writerow({**values, **common, "variant": variant, "predictor": MODEL,
                             "skipped": values.get("skipped", "")})
        writer.writerow({**row.baseline, **common, "variant": "STRICT", "predictor": BOX_LABEL,
                         "skipped": row.baseline.get("unavailable", "")})
    for task, result in metrics["tasks"].items():
        if result["kind"] == "yes_no":
            common = {"section": "tumour classification", "task": task, "subset": "all", "dataset": result["dataset"]}
            for rule, report in result["rules"].items():
                writer.writerow({**report, **common, "variant": rule, "predictor": MODEL,
                                 "n_missing": result["n"] - result["n_predicted"], "auc": result["auc"]["value"]})
            writer.writerow({**result["baseline"], **common, "variant": "any", "predictor": MAJORITY_LABEL,
                             "skipped": result["baseline"].get("unavailable", "")})
    return buffer.getvalue()
