"""The evaluation's files: metrics.json (everything), tables.md (the paper's tables, every number labelled with
its protocol), tables.csv (the same, one row per task / subset / variant) and an IoU histogram per variant
(iou_histograms.png, only when matplotlib is installed: it is not a dependency). Each file is written whole.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from SlicerMiniGPTPancreas.atomic import atomic_write, atomic_write_bytes

METRICS_FILE, TABLES_MD, TABLES_CSV, PLOT_FILE = "metrics.json", "tables.md", "tables.csv", "iou_histograms.png"
REPORT_FILES = (METRICS_FILE, TABLES_MD, TABLES_CSV, PLOT_FILE)
VARIANT_NAMES = ("E1", "E2", "E3", "STRICT")
DETECTION_TABLES = (("mean_iou", "IoU", "Mean IoU"),
                    ("mean_dice", "Dice", "Mean box Dice"),
                    ("hit_rate", "hit rate", "Hit rate: hits / answers in the IoU mean"),
                    ("detection_accuracy", "det. acc.", "Detection accuracy: hits / all entries"),
                    ("parse_failure_rate", "failures", "Parse failures: unreadable or missing answers / all entries"))
CSV_COLUMNS = ("section", "task", "dataset", "subset", "variant", "n", "n_scored", "n_failed", "n_missing",
               "mean_iou", "mean_dice", "hit_rate", "detection_accuracy", "parse_failure_rate", "tp", "tn", "fp",
               "fn", "accuracy", "precision", "recall", "f1", "auc", "skipped")
PUBLISHED = (  # upstream-spec.md 6.4; which protocol produced them is not stated (arXiv v1 predates E2/E3)
    ("pancreas detection IoU, NIH", "0.595", "arXiv 2412.15925v1 abstract"),
    ("pancreas detection IoU, MSD", "0.550", "arXiv 2412.15925v1 abstract"),
    ("pancreas detection IoU, NIH+MSD", "0.57", "J Healthc Inform Res 2025"),
    ("tumour classification accuracy / precision / recall", "0.876 / 0.874 / 0.878", "arXiv v1 (upstream TC set)"),
    ("AbdomenCT-1K IoU liver / kidney / spleen / pancreas", "0.8399 / 0.722 / 0.705 / 0.497", "arXiv v1"),
    ("tumour detection IoU", "0.168", "arXiv v1"),
)


def write_reports(out: Path, metrics: dict[str, Any], ious: dict[str, dict[str, list[float]]]) -> list[Path]:
    """Write the plot (if possible), tables.md, tables.csv and metrics.json (last) into `out`; return the paths.
    Sets metrics["plot"] to the plot's file name or the reason it was skipped."""
    out = Path(out)
    metrics["plot"] = plot_iou_histograms(out / PLOT_FILE, ious)
    written = [out / PLOT_FILE] if metrics["plot"] == PLOT_FILE else []
    atomic_write_bytes(out / TABLES_MD, render_markdown(metrics).encode("utf-8"))
    atomic_write_bytes(out / TABLES_CSV, render_csv(metrics).encode("utf-8"))
    atomic_write_bytes(out / METRICS_FILE, (json.dumps(metrics, indent=1) + "\n").encode("utf-8"))
    return written + [out / TABLES_MD, out / TABLES_CSV, out / METRICS_FILE]


def _number(value: Any) -> str:
    return "–" if value is None else str(value) if isinstance(value, int) else f"{value:.4f}"


def detection_rows(metrics: dict[str, Any]) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(label, dataset, n, {variant: numbers}) for every detection line: tasks, their organs (AbdomenCT-1K) and
    the datasets combined."""
    rows = []
    for task, result in metrics["tasks"].items():
        if result["kind"] != "detection":
            continue
        for organ, organ_result in result.get("organs", {}).items():
            rows.append((f"{task} / {organ}", result["dataset"], organ_result["n"], organ_result["variants"]))
        label = f"{task} (weighted over organs)" if "organs" in result else task
        rows.append((label, result["dataset"], result["n"], result["variants"]))
    for name, combined in metrics["combined"].items():
        rows.append((name, f"{combined['dataset']} weighted", combined["n"], combined["variants"]))
    return rows


def _cell(numbers: dict[str, Any], key: str) -> str:
    return "n/a" if "skipped" in numbers else _number(numbers.get(key))


def render_markdown(metrics: dict[str, Any]) -> str:
    """The paper's tables; numbers are fractions (0-1), every column names its protocol."""
    run = metrics.get("run", {})
    lines = ["# Evaluation", "", f"Model: {run.get('model', 'not recorded')}. Prepared data: "
             f"{run.get('prepared', '?')}. Numbers are fractions (0-1); `n/a` = not defined for that protocol.", ""]
    rows = detection_rows(metrics)
    if rows:
        lines += ["## Box detection", ""]
        for key, short, title in DETECTION_TABLES:
            lines += [f"### {title}", "", "| task | dataset | n | " + " | ".join(f"{short} {v}" for v in VARIANT_NAMES)
                      + " |", "|---|---|---:|" + "---:|" * len(VARIANT_NAMES)]
            lines += [f"| {label} | {dataset} | {n} | " + " | ".join(_cell(numbers.get(v, {}), key)
                                                                      for v in VARIANT_NAMES) + " |"
                      for label, dataset, n, numbers in rows]
            lines.append("")
        lines += _balanced_table(rows)
    lines += _yes_no_table(metrics)
    lines += ["## Published numbers (for comparison)", "", "| metric | value | source |", "|---|---|---|"]
    lines += [f"| {metric} | {value} | {source} |" for metric, value, source in PUBLISHED]
    lines += ["", "The protocol behind the published numbers is not stated; arXiv v1 predates E2/E3, so most "
              "likely E1.", "", "## Notes", ""]
    lines += [f"- {note}" for note in metrics.get("notes", [])]
    if metrics.get("plot") != PLOT_FILE:
        lines.append(f"- IoU histograms: {metrics.get('plot')}")
    return "\n".join(lines) + "\n"


def _balanced_table(rows) -> list[str]:
    balanced = [row for row in rows if any(numbers.get("accuracy") is not None for numbers in row[3].values())]
    if not balanced:
        return []
    lines = ["### Balanced sets: is the structure on the slice? (present = positive)", "",
             "| task | dataset | variant | TP | TN | FP | FN | accuracy | precision | recall | F1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, dataset, _, numbers in balanced:
        for variant in VARIANT_NAMES:
            values = numbers.get(variant, {})
            if "skipped" not in values:
                lines.append(f"| {label} | {dataset} | {variant} | " + " | ".join(
                    _number(values.get(key)) for key in ("tp", "tn", "fp", "fn", "accuracy", "precision", "recall",
                                                         "f1")) + " |")
    return lines + [""]


def _yes_no_table(metrics: dict[str, Any]) -> list[str]:
    tasks = [(task, result) for task, result in metrics["tasks"].items() if result["kind"] == "yes_no"]
    if not tasks:
        return []
    lines = ["## Tumour classification (positive = yes)", "",
             "| task | dataset | rule | n | accuracy | precision | recall | F1 | unparsed | AUC of P(yes) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, result in tasks:
        for rule, report in result["rules"].items():
            lines.append(f"| {task} | {result['dataset']} | {rule} | {report['n']} | " + " | ".join(
                _number(report[key]) for key in ("accuracy", "precision", "recall", "f1", "n_unparsed"))
                + f" | {_number(result['auc']['value'])} |")
    return lines + ["", "Rules: upstream = anything but exactly 'yes' counts as 'no'; strict = case and punctuation "
                    "ignored, an answer that is neither yes nor no counts as wrong. The AUC ranks the yes "
                    "probability of the first answer token and does not depend on the rule.", ""]


def render_csv(metrics: dict[str, Any]) -> str:
    """One row per (task, subset, variant or yes/no rule); empty cells where a number does not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for label, dataset, n, numbers in detection_rows(metrics):
        task, _, subset = label.partition(" / ")
        subset = subset or ("organs weighted" if "weighted over organs" in label else
                            "datasets weighted" if task in metrics["combined"] else "all")
        task = task.replace(" (weighted over organs)", "")
        for variant in VARIANT_NAMES:
            values = numbers.get(variant, {})
            writer.writerow({**values, "section": "detection", "task": task, "dataset": dataset, "subset": subset,
                             "variant": variant, "n": n, "skipped": values.get("skipped", "")})
    for task, result in metrics["tasks"].items():
        if result["kind"] == "yes_no":
            for rule, report in result["rules"].items():
                writer.writerow({**report, "section": "tumour classification", "task": task, "subset": "all",
                                 "dataset": result["dataset"], "variant": rule, "n_missing": result["n"] -
                                 result["n_predicted"], "auc": result["auc"]["value"]})
    return buffer.getvalue()


def plot_iou_histograms(path: Path, ious: dict[str, dict[str, list[float]]]) -> str:
    """Histograms of per-answer IoU, one panel per (task, variant); returns the file name or why it was skipped."""
    if not ious:
        Path(path).unlink(missing_ok=True)
        return "skipped: no detection task was scored"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        Path(path).unlink(missing_ok=True)  # never leave a plot of an earlier scoring next to new numbers
        return "skipped: matplotlib is not installed (pip install matplotlib to get iou_histograms.png)"
    figure, axes = plt.subplots(len(ious), len(VARIANT_NAMES), figsize=(3.2 * len(VARIANT_NAMES), 2.4 * len(ious)),
                                squeeze=False, sharex=True)
    for row, (task, by_variant) in enumerate(ious.items()):
        for column, variant in enumerate(VARIANT_NAMES):
            axis = axes[row][column]
            values = by_variant.get(variant)
            if values is None:
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
            else:
                axis.hist(values, bins=20, range=(0.0, 1.0), color="tab:blue")
            axis.set_title(f"{task}\n{variant} (n={0 if values is None else len(values)})", fontsize=8)
            axis.tick_params(labelsize=7)
    for axis in axes[-1]:
        axis.set_xlabel("IoU", fontsize=8)
    figure.tight_layout()
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=90))
    finally:
        plt.close(figure)
    return PLOT_FILE
