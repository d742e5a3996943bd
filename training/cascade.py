"""`minigpt-pancreas-train cascade CASCADE.json`: the whole cascaded fine-tune, from data to an exported model.

Steps, each resumable (a stopped run continues with the same command):
  1. data: for a synthetic cascade, write the phantom datasets in the public layouts and `prepare` them (with a
     validation split of held-out training volumes); otherwise check the given prepared folder;
  2. the stages in order: `fit` (resumed at the step it stopped), then every saved epoch's model answers the
     stage's validation tasks, and the best-scoring epoch is chosen; a stage that starts from another starts from
     that stage's chosen epoch (never from a test-split score);
  3. `evaluate` the final stage's chosen model on the test split;
  4. `export` it as a self-contained model folder, with the evaluation report beside it.
`OUTPUT_DIR/cascade_state.json` records what is finished: validation scores per epoch, chosen epochs.
The layout of a stage is a fit run folder (`OUTPUT_DIR/stages/<name>/`), validation answers under its
`validation/epoch_<N>/`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from training.cascade_config import CascadeConfig, CascadeConfigError, StageSpec
from training.config import model_dir_name

STATE_FILE = "cascade_state.json"
EVALUATION_FOLDER = "evaluation"
Say = Callable[[str], None]


class CascadeState:
    """What a cascade run has finished, saved after every change (so a crash loses at most the step in flight),
    with the minutes of every call together up to the last save (so a resumed build reports its whole time,
    including calls that ended in a crash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}
        self._started, self._earlier_minutes = time.monotonic(), self.data.get("minutes", 0.0)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"scores": {}})

    def save(self) -> None:
        self.data["minutes"] = round(self._earlier_minutes + (time.monotonic() - self._started) / 60, 1)
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


def run_cascade(config: CascadeConfig, device: str = "auto", say: Say = print) -> dict[str, Any]:
    """Run (or resume) the cascade; return the final state."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    state = CascadeState(config.output_dir / STATE_FILE)
    _prepare_data(config, say)
    for number, stage in enumerate(config.stages, 1):
        say(f"[cascade] stage {number}/{len(config.stages)} {stage.name}: "
            f"{'done' if state.stage(stage.name).get('chosen_epoch') is not None else 'running'}")
        _run_stage(config, stage, state, device, say)
    final = state.stage(config.final)
    chosen = config.stage_dir(config.final) / model_dir_name(final["chosen_epoch"])
    model_dir = _export(config, chosen, state, say) if config.export else chosen
    metrics = _evaluate_final(config, model_dir, state, device, say)
    state.data["final_model"] = str(model_dir)
    state.save()
    if config.export:
        _publish_report(config, model_dir, state.data, metrics, say)
    say(f"[cascade] finished: final model {model_dir}")
    return {**state.data, "metrics": metrics}


# ---------------------------------------------------------------------------------------------------- data

def _prepare_data(config: CascadeConfig, say: Say) -> None:
    if config.phantoms is None:
        if not (config.prepared / "tasks").is_dir():
            raise CascadeConfigError(f"data.prepared {config.prepared} holds no tasks/ folder: run "
                                     "`minigpt-pancreas-train prepare` (with --val-ratio) first.")
        return
    from training.demo_data import write_phantom_datasets
    from training.prepare.pipeline import PrepareOptions, run_prepare

    spec = config.phantoms
    say(f"[cascade] data: {spec.msd} MSD, {spec.nih} NIH and {spec.abdomenct1k} AbdomenCT-1K synthetic volumes "
        f"(seed {spec.seed}) -> {config.output_dir / 'raw'}")
    roots = write_phantom_datasets(config.output_dir / "raw", spec)
    options = PrepareOptions(roots={k: str(v) for k, v in roots.items()}, out=str(config.prepared), **config.prepare)
    report = run_prepare(options, echo=lambda line: None if line.startswith("note:") else say(line))
    if report.problems:  # our own writer's files: any problem is a bug, not bad data
        raise RuntimeError(f"prepare could not read {len(report.problems)} synthetic volume(s): {report.problems[:2]}")


# -------------------------------------------------------------------------------------------------- stages

def _run_stage(config: CascadeConfig, stage: StageSpec, state: CascadeState, device: str, say: Say) -> None:
    from training.fit import fit

    record = state.stage(stage.name)
    if record.get("chosen_epoch") is not None:
        return
    start = stage.start
    if isinstance(start, str):
        start = {"previous_stage": str(config.stage_dir(start)), "epoch": state.stage(start)["chosen_epoch"]}
    fit_config = config.fit_config(stage, start)
    if device != "auto":
        fit_config = replace(fit_config, device=device)
    latest = _latest(config.stage_dir(stage.name))
    if latest is None or latest["step"] < fit_config.last_step:
        fit(fit_config, resume=True)
    epochs = -(-fit_config.last_step // fit_config.iters_per_epoch)  # the last one may be partial (max_steps)
    if not stage.select_tasks:
        record["chosen_epoch"] = epochs - 1
        state.save()
        say(f"[cascade] {stage.name}: no 'select' tasks, kept the last epoch ({epochs - 1})")
        return
    for epoch in range(epochs):
        if str(epoch) not in record["scores"]:
            record["scores"][str(epoch)] = _validate(config, stage, epoch, device)
            state.save()
            say(f"[cascade] {stage.name} epoch {epoch}: validation score {record['scores'][str(epoch)]:.4f}")
    best = max(record["scores"], key=lambda epoch: (record["scores"][epoch], -int(epoch)))  # ties: the earliest
    record["chosen_epoch"] = int(best)
    state.save()
    say(f"[cascade] {stage.name}: chose epoch {best} (validation score {record['scores'][best]:.4f})")


def _validate(config: CascadeConfig, stage: StageSpec, epoch: int, device: str) -> float:
    """Mean over the stage's select tasks of STRICT mean IoU (detection) / strict balanced accuracy (yes/no),
    on the validation split, answered by the model of `epoch`."""
    from backend.cascade_sweep import TUMOUR_QUESTION
    from training.evaluate import checked_predictions, load_task, predict_task
    from training.evaluate_scoring import score_all

    stage_dir = config.stage_dir(stage.name)
    engine = _engine(stage_dir / model_dir_name(epoch), device, config.evaluate.get("batch_size", 16))
    out = stage_dir / "validation" / f"epoch_{epoch}"
    tasks = [load_task(config.prepared, name, stage.select_limit, split="val") for name in stage.select_tasks]
    close_up_zoom = (config.export or {}).get("close_up_zoom")  # asked as the exported model will be
    for task in tasks:  # yes/no with a training prompt: the model is mid-training, not under upstream's test
        predict_task(engine, config.prepared, out, task, yes_no_prompt=TUMOUR_QUESTION, close_up_zoom=close_up_zoom)
    predictions = {task.name: checked_predictions(out, task) for task in tasks}
    metrics, _ = score_all(tasks, predictions)
    return sum(_task_score(metrics["tasks"][task.name]) for task in tasks) / len(tasks)


def _task_score(result: dict[str, Any]) -> float:
    if result.get("kind") == "yes_no":
        return float(result["rules"]["strict"]["balanced_accuracy"] or 0.0)
    return float(result["variants"]["STRICT"]["mean_iou"] or 0.0)


def _latest(stage_dir: Path) -> dict[str, Any] | None:
    latest = stage_dir / "latest.json"
    return json.loads(latest.read_text(encoding="utf-8")) if latest.is_file() else None


def _engine(model_dir: Path, device: str, batch_size: int):
    from backend.engine import InferenceEngine

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return InferenceEngine.from_model_dir(model_dir, device=device, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ evaluate, export

def _evaluate_final(config: CascadeConfig, model_dir: Path, state: CascadeState, device: str,
                    say: Say) -> dict[str, Any]:
    """Evaluate the final model on the test split; again only when the model changed (its manifest's hash)."""
    from backend.model_dir import close_up_zoom, provenance_path, read_manifest
    from training.evaluate import evaluate, rescore, run_settings

    out = config.output_dir / EVALUATION_FOLDER
    manifest = read_manifest(model_dir)
    # the weights and how they are asked, not the card
    identity = json.loads(json.dumps({key: manifest.get(key) for key in ("tensors", "base", "inference")}))
    if state.data.get("evaluated") == identity and (out / "metrics.json").is_file():
        return rescore(out, config.prepared, config.evaluate.get("tasks"), config.evaluate.get("limit"))
    settings = run_settings(f"sha256:{manifest['tensors']['sha256']}", provenance_path(model_dir), config.prepared,
                            close_up_zoom=close_up_zoom(model_dir))
    engine = _engine(model_dir, device, config.evaluate.get("batch_size", 16))
    settings.update(device=engine.device, precision=engine.precision)
    say(f"[cascade] evaluate {model_dir} on the test split -> {out}")
    metrics = evaluate(engine, config.prepared, out, settings, config.evaluate.get("tasks"),
                       limit=config.evaluate.get("limit"), force=True)
    state.data["evaluated"] = identity
    state.save()
    return metrics


def _export(config: CascadeConfig, chosen: Path, state: CascadeState, say: Say) -> Path:
    """The final stage's chosen model as a self-contained folder at export.out (once: copying a real base takes
    minutes); return that folder."""
    from backend.model_dir import MANIFEST_FILE, read_manifest
    from training.export import export_model

    target = Path(config.export["out"])
    options = {key: config.export[key] for key in ("description", "synthetic", "half_base", "close_up_zoom")
               if key in config.export}
    if "model_id" in config.export:  # the weights' hash tells two builds apart
        sha = read_manifest(chosen)["tensors"]["sha256"]
        options["model_id"] = f"{config.export['model_id']}-{sha[:8]}"
    record = {"from": str(chosen), "to": str(target), **options}
    if state.data.get("exported") != record or not (target / MANIFEST_FILE).is_file():
        export_model(chosen, target, force=True, **options)
        state.data["exported"] = record
        state.save()
        say(f"[cascade] exported {chosen.parent.name}/{chosen.name} -> {target}")
    return target


def _publish_report(config: CascadeConfig, model_dir: Path, state: dict[str, Any], metrics: dict[str, Any],
                    say: Say) -> None:
    """The evaluation (without the raw answers) in report/ and MODEL_CARD.md, beside the exported model."""
    from backend.demo_model import model_card
    from training.model_card import write_model_card

    report = model_dir.parent / "report"
    staging = report.with_name(".report-staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(config.output_dir / EVALUATION_FOLDER, staging, ignore=shutil.ignore_patterns("predictions"))
    _record_prepared_for_provenance(staging)
    shutil.rmtree(report, ignore_errors=True)
    staging.rename(report)
    write_model_card(model_dir.parent / "MODEL_CARD.md", config, state, metrics, model_card(model_dir)["model_id"])
    say(f"[cascade] report and MODEL_CARD.md beside {model_dir}")


def _record_prepared_for_provenance(report: Path) -> None:
    """The published report names the test data as `provenance_path` does (`runs/demo/prepared` in a checkout),
    not the builder's absolute path; the evaluation folder keeps the absolute one, which `rescore` opens."""
    from backend.model_dir import provenance_path
    from training.evaluate import RUN_FILE
    from training.evaluate_report import METRICS_FILE

    for name in (RUN_FILE, METRICS_FILE):
        data = json.loads((report / name).read_text(encoding="utf-8"))
        settings = data if name == RUN_FILE else data["run"]  # metrics.json holds the run's settings under "run"
        settings["prepared"] = provenance_path(settings["prepared"])
        atomic_write_bytes(report / name, (json.dumps(data, indent=1) + "\n").encode())
