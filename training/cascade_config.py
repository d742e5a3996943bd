"""The cascade file of `minigpt-pancreas-train cascade`: data, stages in order, final evaluation and export.

    {
      "description": "free text",
      "output_dir": "../runs/demo",                       (relative paths are relative to this file)
      "data": {"prepared": "../prepared"}                 an existing `prepare` output (with a val split), or
      "data": {"phantoms": {"msd": 30, "nih": 20, "abdomenct1k": 30, "seed": 0, "coarsen": 1},
               "prepare": {"val_ratio": 0.15, "threshold": 0.0, ...}}     synthetic datasets, prepared here,
      "fit": {shared fit settings: init_lr, batch_size, iters_per_epoch, max_epoch, ...},
      "stages": [
        {"name": "pancreas_detection",
         "start": {"vit_checkpoint": ..., "llama_dir": ..., "checkpoint": ...} | "<earlier stage name>",
         "datasets": [{"task": "pancreas_detection_msd", "sample_ratio": 1}, ...],   (its `_train.json` files)
         "fit": {this stage's settings over the shared ones},
         "select": {"tasks": ["pancreas_detection_msd"], "limit": 64}},             (its `_val.json` files)
        ...
      ],
      "final": "tumor_detection",                         the stage whose chosen model is evaluated and exported
      "evaluate": {"tasks": [...], "limit": null, "batch_size": 16},   (the `_test.json` files; default all)
      "export": {"out": "...", "model_id": "...", "description": "...", "synthetic": true,
                 "half_base": true, "close_up_zoom": 2.0} (optional; see `training.export.export_model`)
    }

With `export`, the final model is exported first and the EXPORTED folder is what `evaluate` scores, so the
report beside it (report/, MODEL_CARD.md) describes exactly those weights; the exported model id is
`<model_id>-<first 8 hex of the trained tensors' sha256>`.

A stage that starts from an earlier stage starts from that stage's CHOSEN epoch: the one whose model scores best
on the stage's `select` tasks of the validation split (held-out training volumes, never the test split). The
score of a task is its STRICT mean IoU (detection) or its strict balanced accuracy (yes/no); tasks are averaged.
A stage without `select` (e.g. the tower pre-training, `"train": "vision"`, whose language model cannot answer
yet) keeps its last epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import FitConfigError, _refuse_unknown, parse_config
from training.demo_data import DATASET_ORDER, PhantomDatasets
from training.prepare.command import typed_option
from training.prepare.files import PrepareError


class CascadeConfigError(FitConfigError):
    """The cascade file is invalid; the message names the key."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    start: str | dict[str, Any]  # an earlier stage's name, or a fit `model` object
    datasets: tuple[dict[str, Any], ...]  # {"task", "sample_ratio"}
    fit: dict[str, Any]  # fit settings (shared ones merged under this stage's)
    select_tasks: tuple[str, ...]
    select_limit: int | None


@dataclass(frozen=True)
class CascadeConfig:
    file: Path
    output_dir: Path
    prepared: Path  # where the prepared data is (or will be written)
    phantoms: PhantomDatasets | None
    prepare: dict[str, Any]
    stages: tuple[StageSpec, ...]
    final: str
    evaluate: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] | None = None

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / "stages" / name

    def fit_config(self, stage: StageSpec, start_model: dict[str, Any]):
        """The `FitConfig` of one stage, starting from `start_model` (a fit `model` object)."""
        datasets = [{"task_file": str(self.prepared / "tasks" / f"{d['task']}_train.json"),
                     "sample_ratio": d.get("sample_ratio", 1)} for d in stage.datasets]
        data = {**stage.fit, "stage": stage.name, "output_dir": str(self.stage_dir(stage.name)),
                "model": start_model, "datasets": datasets}
        return parse_config(data, self.file.parent, f"{self.file}: stage {stage.name}")


# `prepare` options a synthetic cascade may set (training/prepare/command.py documents them)
PREPARE_KEYS = ("seed", "test_ratio", "val_ratio", "threshold", "test_threshold", "duplicates", "organ_balance",
                "workers")
_TOP_KEYS = {"description", "output_dir", "data", "fit", "stages", "final", "evaluate", "export"}
_STAGE_KEYS = {"name", "start", "datasets", "fit", "select"}


def load_cascade(path: str | os.PathLike) -> CascadeConfig:
    """Read and check a cascade file (every stage's fit settings are validated now, before any work)."""
    file = Path(path).absolute()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CascadeConfigError(f"cascade file {file} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CascadeConfigError(f"cannot read {file} as JSON: {error}.") from None
    if not isinstance(data, dict):
        raise CascadeConfigError(f"{file}: the cascade must be a JSON object.")
    _refuse_unknown(data, _TOP_KEYS, str(file))
    for key in ("output_dir", "data", "stages", "final"):
        if key not in data:
            raise CascadeConfigError(f"{file}: '{key}' is missing.")
    base = file.parent
    output_dir = _path(base, data["output_dir"], f"{file}: output_dir")
    prepared, phantoms, prepare = _data(data["data"], base, output_dir, file)
    shared = _object(data.get("fit", {}), f"{file}: fit")
    stages = _stages(data["stages"], shared, file)
    names = [stage.name for stage in stages]
    if data["final"] not in names:
        raise CascadeConfigError(f"{file}: 'final' is {data['final']!r}, not one of the stages {names}.")
    export = _object(data["export"], f"{file}: export") if data.get("export") else None
    if export is not None:
        _refuse_unknown(export, {"out", "model_id", "description", "synthetic", "half_base", "close_up_zoom"},
                        f"{file}: export")
        export = {**export, "out": str(_path(base, export.get("out"), f"{file}: export.out"))}
    evaluate = _object(data.get("evaluate", {}), f"{file}: evaluate")
    config = CascadeConfig(file, output_dir, prepared, phantoms, prepare, stages, data["final"], evaluate, export)
    for stage in stages:  # validate every stage's fit settings now (the start model is checked when it runs)
        config.fit_config(stage, {"scratch": {}} if isinstance(stage.start, str) else stage.start)
    return config


def _data(data: Any, base: Path, output_dir: Path, file: Path) -> tuple[Path, PhantomDatasets | None, dict[str, Any]]:
    data = _object(data, f"{file}: data")
    _refuse_unknown(data, {"prepared", "phantoms", "prepare"}, f"{file}: data")
    if ("prepared" in data) == ("phantoms" in data):
        raise CascadeConfigError(f"{file}: data needs exactly one of 'prepared' (an existing prepare output) or "
                                 "'phantoms' (synthetic datasets written and prepared by the cascade).")
    if "prepared" in data:
        return _path(base, data["prepared"], f"{file}: data.prepared"), None, {}
    counts = _object(data["phantoms"], f"{file}: data.phantoms")
    _refuse_unknown(counts, {*DATASET_ORDER, "seed", "coarsen"}, f"{file}: data.phantoms")
    coarsen = counts.get("coarsen", 1.0)
    counts = {key: value for key, value in counts.items() if key != "coarsen"}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
        raise CascadeConfigError(f"{file}: data.phantoms counts and seed must be whole numbers >= 0, got {counts}.")
    if isinstance(coarsen, bool) or not isinstance(coarsen, (int, float)) or not 1 <= coarsen <= 8:
        raise CascadeConfigError(f"{file}: data.phantoms.coarsen must be a number from 1 to 8, got {coarsen!r}.")
    counts["coarsen"] = float(coarsen)
    prepare = _object(data.get("prepare", {}), f"{file}: data.prepare")
    _refuse_unknown(prepare, set(PREPARE_KEYS), f"{file}: data.prepare")
    try:  # typed as `prepare` types its own config file, so a wrong type fails here, before any phantom is drawn
        prepare = {key: typed_option(key, value) for key, value in prepare.items()}
    except PrepareError as error:
        raise CascadeConfigError(f"{file}: data.prepare.{error}") from None
    return output_dir / "prepared", PhantomDatasets(**counts), prepare


def _stages(data: Any, shared: dict[str, Any], file: Path) -> tuple[StageSpec, ...]:
    if not isinstance(data, list) or not data:
        raise CascadeConfigError(f"{file}: 'stages' must be a non-empty list.")
    stages: list[StageSpec] = []
    for index, item in enumerate(data):
        where = f"{file}: stages[{index}]"
        item = _object(item, where)
        _refuse_unknown(item, _STAGE_KEYS, where)
        name, start = item.get("name"), item.get("start")
        if not isinstance(name, str) or not name or name in [s.name for s in stages] or "/" in name:
            raise CascadeConfigError(f"{where}: 'name' must be a new, non-empty name without '/', got {name!r}.")
        if isinstance(start, str) and start not in [s.name for s in stages]:
            raise CascadeConfigError(f"{where}: 'start' names {start!r}, which is not an EARLIER stage.")
        if not isinstance(start, (str, dict)):
            raise CascadeConfigError(f"{where}: 'start' must be an earlier stage's name or a fit 'model' object.")
        datasets = item.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(
                isinstance(d, dict) and isinstance(d.get("task"), str) and set(d) <= {"task", "sample_ratio"}
                for d in datasets):
            raise CascadeConfigError(f"{where}: 'datasets' must list {{\"task\", \"sample_ratio\"}} objects.")
        tasks, limit = _selection(item, where) if "select" in item else ((), None)  # none: the last epoch
        stages.append(StageSpec(name, start, tuple(datasets), {**shared, **_object(item.get("fit", {}), where)},
                                tuple(tasks), limit))
    return tuple(stages)


def _selection(item: dict[str, Any], where: str) -> tuple[list[str], int | None]:
    select = _object(item["select"], f"{where}: select")
    tasks = select.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise CascadeConfigError(f"{where}: select.tasks must list the validation tasks that choose the epoch.")
    limit = select.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise CascadeConfigError(f"{where}: select.limit must be a whole number >= 1 or absent.")
    return tasks, limit


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CascadeConfigError(f"{where} must be a JSON object, got {value!r}.")
    return value


def _path(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise CascadeConfigError(f"{where} must be a non-empty path string, got {value!r}.")
    return Path(os.path.normpath(base / Path(value).expanduser()))
