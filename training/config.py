"""The configuration of one fine-tuning stage (`minigpt-pancreas-train fit CONFIG.json`) and its output folder.

The JSON file holds `output_dir`, `model` (where the starting weights come from), `datasets` (prepared task
files with their sample ratios) and run settings whose defaults are upstream's (`minigptv2_finetune.yaml`,
docs/upstream.md section 5.1). Relative paths are relative to the config file. Unknown keys are refused by name,
so a typo never silently falls back to a default.

Output folder layout (written by `training.fit`, rank 0 only):

    config.json             the resolved config of the run (decides whether a later call is the same run)
    log.jsonl               one JSON line per step (loss, lr) and per checkpoint
    checkpoint_{epoch}.pth  upstream format {"model", "optimizer", "scaler", "epoch", "config"} + resume state
    model_epoch_{epoch}/    the same weights as this project's model folder (backend.load_model)
    latest.json             the newest complete checkpoint; written last, so it never points at a partial one
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from SlicerMiniGPTPancreas.errors import UserError
from training.augment import Augmentation

CONFIG_FILE = "config.json"
LATEST_FILE = "latest.json"
LOG_FILE = "log.jsonl"
SCRATCH_FOLDER = "initial"  # a scratch run's freshly initialised upstream files
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
# upstream's LoRA recipe; every base parameter (the demo's from-scratch stage 0); or the vision tower alone on the
# patch-grounding loss, no language model in the step (the demo's tower pre-training, standing in for EVA-CLIP's)
TRAIN_MODES = ("lora", "all", "vision")
# Settings that may change between a run and its resumption without making it another run.
_NOT_IDENTITY = ("output_dir", "max_steps", "device", "num_workers", "log_every", "description")


class FitConfigError(UserError, ValueError):
    """The fit configuration is invalid or does not match the output folder; the message names the key."""


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_{epoch}.pth"


def model_dir_name(epoch: int) -> str:
    return f"model_epoch_{epoch}"


@dataclass(frozen=True)
class DatasetSpec:
    """One prepared task file. Entries' `image` paths are relative to `images_root` (default: the prepare output
    folder, i.e. the parent of the task file's `tasks/` folder)."""

    task_file: Path
    images_root: Path
    sample_ratio: float = 1.0  # upstream MultiIterLoader: a dataset is chosen with probability ratio / sum(ratios)


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of: this project's model folder; upstream files (stage-3 MiniGPT-v2 or a MiniGPT-Pancreas
    checkpoint); the output folder of a previous stage (its latest model, or the one of `epoch`); or `scratch`:
    a fresh tiny model of these sizes (`training.base_weights.ScratchSizes` fields), for the demo's stage 0."""

    model_dir: Path | None = None
    vit_checkpoint: Path | None = None
    llama_dir: Path | None = None
    checkpoint: Path | None = None
    image_size: int = 448  # only for upstream files (a model folder records its own)
    previous_stage: Path | None = None
    epoch: int | None = None  # only with previous_stage
    scratch: dict[str, int] | None = None

    @property
    def kind(self) -> str:
        if self.model_dir is not None:
            return "model_dir"
        if self.scratch is not None:
            return "scratch"
        return "previous_stage" if self.previous_stage is not None else "upstream"


@dataclass(frozen=True)
class FitConfig:
    output_dir: Path
    model: ModelSource
    datasets: tuple[DatasetSpec, ...]
    init_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.05  # on matrices only (not biases, ln, bn), as upstream's optimizer
    betas: tuple[float, float] = (0.9, 0.999)
    iters_per_epoch: int = 1000  # an "epoch" is this many iterations, not a pass over the data (upstream)
    max_epoch: int = 50
    batch_size: int = 16  # per process
    grad_accumulation: int = 1
    precision: str = "auto"  # auto: float16 autocast + GradScaler on CUDA (upstream's amp), float32 on CPU
    seed: int = 42
    max_steps: int | None = None  # stop early (smoke runs); the LR schedule still spans max_epoch epochs
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    num_workers: int = 4  # threads decoding images
    log_every: int = 10
    gradient_checkpointing: bool = False  # recompute LLaMA activations in backward: less memory, slower
    train: str = "lora"  # "lora": llama_proj + LoRA (upstream); "all": every parameter but LoRA (stage 0);
    # "vision": ViT + ln_vision on the patch-grounding loss only (tower pre-training)
    grad_clip: float | None = None  # max gradient norm; upstream clips nothing
    patch_grounding: float = 0.0  # weight of stage 0's patch-level box loss (training.patch_grounding); 0 = off
    answer_value: float = 0.0  # weight of stage 0's answer-number regression (training.answer_value); 0 = off
    inference_layout_share: float = 0.0  # stage 0: share of rows trained on generate's prompt layout (two BOS)
    augment: Augmentation | None = None  # random zoom, shift and grey-level curve of each example (training.augment)
    hash_base_files: bool = False  # sha256 of the base files in every model folder (minutes for a 13 GB LLaMA)
    stage: str = ""  # a name for logs, e.g. "pancreas_detection"
    description: str = ""

    @property
    def total_steps(self) -> int:
        """Length of the LR schedule: max_epoch * iters_per_epoch iterations."""
        return self.max_epoch * self.iters_per_epoch

    @property
    def last_step(self) -> int:
        """The step the run stops after: total_steps, or max_steps when smaller."""
        return min(self.total_steps, self.max_steps or self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))  # Paths -> str, tuples -> lists

    def identity(self) -> dict[str, Any]:
        """The settings that make two calls the same run (not max_steps, device, workers, logging)."""
        return {key: value for key, value in self.to_dict().items() if key not in _NOT_IDENTITY}


# ----------------------------------------------------------------------------------------------- parsing

def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Read, validate and check the files of a fit config (relative paths are relative to the file).
    `overrides` (e.g. {"max_steps": 10} from the command line) replace top-level keys before validation."""
    file = Path(path)
    if not file.is_file():
        raise FitConfigError(f"config file {file} does not exist.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FitConfigError(f"cannot read {file} as JSON: {error}.") from error
    if isinstance(data, dict):
        data.update(overrides or {})
    config = parse_config(data, file.parent.absolute(), str(file))
    check_paths(config)
    return config


def parse_config(data: Any, base_dir: Path, where: str = "config") -> FitConfig:
    """Validate a config dict (keys, types, ranges) without touching the disk."""
    if not isinstance(data, dict):
        raise FitConfigError(f"{where}: the config must be a JSON object.")
    _refuse_unknown(data, {"output_dir", "model", "datasets", *_RUN_CHECKS}, where)
    for required in ("output_dir", "model", "datasets"):
        if required not in data:
            raise FitConfigError(f"{where}: '{required}' is missing.")
    settings = {key: _RUN_CHECKS[key](f"{where}: '{key}'", value) for key, value in data.items()
                if key in _RUN_CHECKS}
    config = FitConfig(output_dir=_path(base_dir, _text(f"{where}: 'output_dir'", data["output_dir"])),
                       model=_model_source(data["model"], base_dir, f"{where}: model"),
                       datasets=_datasets(data["datasets"], base_dir, f"{where}: datasets"), **settings)
    if config.patch_grounding and config.train == "lora":
        raise FitConfigError(f"{where}: 'patch_grounding' trains the vision tower, so it needs \"train\": \"all\" "
                             "or \"vision\".")
    if config.train == "vision" and (not config.patch_grounding or config.answer_value):
        raise FitConfigError(f"{where}: \"train\": \"vision\" trains the tower on the patch-grounding loss alone: set "
                             "'patch_grounding' > 0 and leave 'answer_value' at 0 (the language model is not run).")
    if config.iters_per_epoch % config.grad_accumulation or (config.max_steps or 0) % config.grad_accumulation:
        raise FitConfigError(f"{where}: 'iters_per_epoch' and 'max_steps' must be multiples of "
                             f"'grad_accumulation' ({config.grad_accumulation}) so that every checkpoint falls "
                             "after an optimizer step.")
    return config


def check_paths(config: FitConfig) -> None:
    """Every input the config names exists (the images are checked when the datasets are read)."""
    for index, spec in enumerate(config.datasets):
        if not spec.task_file.is_file():
            raise FitConfigError(f"datasets[{index}].task_file: {spec.task_file} does not exist. Run "
                                 "`minigpt-pancreas-train prepare` first, or fix the path.")
        if not spec.images_root.is_dir():
            raise FitConfigError(f"datasets[{index}].images_root: {spec.images_root} is not a folder.")
    source = config.model
    if source.kind == "previous_stage":
        resolve_previous_stage(source.previous_stage, source.epoch)
        return
    if source.kind == "scratch":
        return
    named = {"model_dir": source.model_dir} if source.kind == "model_dir" else {
        "vit_checkpoint": source.vit_checkpoint, "llama_dir": source.llama_dir, "checkpoint": source.checkpoint}
    for key, path in named.items():
        if not path.exists():
            raise FitConfigError(f"model.{key}: {path} does not exist.")


def resolve_previous_stage(stage_dir: Path, epoch: int | None) -> Path:
    """The model folder a previous stage wrote for `epoch`, or its latest one."""
    latest = stage_dir / LATEST_FILE
    if epoch is None:
        if not latest.is_file():
            raise FitConfigError(f"model.previous_stage: {stage_dir} holds no finished checkpoint ({LATEST_FILE} "
                                 "is missing); run that stage first.")
        return stage_dir / json.loads(latest.read_text(encoding="utf-8"))["model_dir"]
    folder = stage_dir / model_dir_name(epoch)
    if not folder.is_dir():
        saved = sorted(p.name for p in stage_dir.glob("model_epoch_*")) if stage_dir.is_dir() else []
        raise FitConfigError(f"model.epoch: {stage_dir} has no {folder.name} (saved: {saved or 'none'}).")
    return folder


def _model_source(data: Any, base_dir: Path, where: str) -> ModelSource:
    if not isinstance(data, dict):
        raise FitConfigError(f"{where} must be an object.")
    fields = {f.name for f in dataclasses.fields(ModelSource)}
    _refuse_unknown(data, fields, where)
    if "scratch" in data:
        return _scratch_source(data, where)
    paths = {key: _path(base_dir, _text(f"{where}.{key}", value)) for key, value in data.items()
             if key not in ("image_size", "epoch")}
    upstream = [key for key in ("vit_checkpoint", "llama_dir", "checkpoint") if key in paths]
    kinds = [key for key in ("model_dir", "previous_stage") if key in paths] + (["upstream files"] if upstream else [])
    if len(kinds) != 1 or (upstream and len(upstream) != 3):
        raise FitConfigError(f"{where}: give exactly one of 'model_dir', 'previous_stage', or all three upstream "
                             f"files 'vit_checkpoint', 'llama_dir', 'checkpoint'; got {sorted(data) or 'nothing'}.")
    if "epoch" in data and "previous_stage" not in data:
        raise FitConfigError(f"{where}.epoch: only meaningful with 'previous_stage'.")
    if "image_size" in data and not upstream:
        raise FitConfigError(f"{where}.image_size: only for upstream files (a model folder records its own).")
    return ModelSource(**paths, image_size=_positive_int(f"{where}.image_size", data.get("image_size", 448)),
                       epoch=None if data.get("epoch") is None else _non_negative_int(f"{where}.epoch", data["epoch"]))


def _scratch_source(data: dict, where: str) -> ModelSource:
    from training.base_weights import ScratchSizes

    if len(data) != 1 or not isinstance(data["scratch"], dict):
        raise FitConfigError(f"{where}: 'scratch' takes an object of model sizes and nothing beside it; got "
                             f"{sorted(data)}.")
    sizes = data["scratch"]
    _refuse_unknown(sizes, set(ScratchSizes().to_dict()), f"{where}.scratch")
    checked = {key: _positive_int(f"{where}.scratch.{key}", value) for key, value in sizes.items()}
    return ModelSource(scratch=ScratchSizes(**checked).to_dict())


def _datasets(data: Any, base_dir: Path, where: str) -> tuple[DatasetSpec, ...]:
    if not isinstance(data, list) or not data:
        raise FitConfigError(f"{where} must be a non-empty list of {{\"task_file\", \"sample_ratio\"}} objects.")
    specs = []
    for index, item in enumerate(data):
        here = f"{where}[{index}]"
        if not isinstance(item, dict) or "task_file" not in item:
            raise FitConfigError(f"{here} must be an object with 'task_file'.")
        _refuse_unknown(item, {"task_file", "images_root", "sample_ratio"}, here)
        task_file = _path(base_dir, _text(f"{here}.task_file", item["task_file"]))
        root = item.get("images_root")
        images_root = task_file.parent.parent if root is None else _path(base_dir, _text(f"{here}.images_root", root))
        ratio = _positive_float(f"{here}.sample_ratio", item.get("sample_ratio", 1.0))
        specs.append(DatasetSpec(task_file, images_root, ratio))
    return tuple(specs)


def _refuse_unknown(data: dict, known: set[str], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise FitConfigError(f"{where}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}.")


def _path(base_dir: Path, value: str) -> Path:
    return Path(os.path.normpath(Path(base_dir, os.path.expanduser(value))))


def _text(where: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise FitConfigError(f"{where} must be a {'' if allow_empty else 'non-empty '}string, got {value!r}.")
    return value


def _number(minimum: float, strict: bool = False, integer: bool = False,
            optional: bool = False) -> Callable[[str, Any], Any]:
    """A checker for a number >= minimum (> with `strict`); JSON true/false are not numbers here."""
    def check(where: str, value: Any) -> Any:
        if optional and value is None:
            return None
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < minimum or (strict and value == minimum):
            wanted = f"{'an integer' if integer else 'a number'} {'>' if strict else '>='} {minimum}"
            raise FitConfigError(f"{where} must be {wanted}, got {value!r}.")
        return value if integer else float(value)
    return check


def _betas(where: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value):
        raise FitConfigError(f"{where} must be two numbers in [0, 1) such as [0.9, 0.999], got {value!r}.")
    return float(value[0]), float(value[1])


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FitConfigError(f"{where} must be true or false, got {value!r}.")
    return value


def _fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise FitConfigError(f"{where} must be a number from 0 to 1, got {value!r}.")
    return float(value)


def _augmentation(where: str, value: Any) -> Augmentation | None:
    """null/false: off; true: the default ranges; {"zoom": [low, high], "shift": fraction, "window": fraction,
    "gamma": [low, high], "focus": share, "focus_zoom": [low, high], "focus_jitter": fraction}: these ranges (a
    key left out keeps its default)."""
    if value is None or value is False:
        return None
    if value is True:
        return Augmentation()
    if not isinstance(value, dict) or set(value) - {"zoom", "shift", "window", "gamma", "focus", "focus_zoom",
                                                                 "focus_jitter"}:
        raise FitConfigError(f"{where} must be true, false or an object with some of \"zoom\": [low, high], "
                             f"\"shift\": fraction, \"window\": fraction, \"gamma\": [low, high], \"focus\": "
                             f"share, \"focus_zoom\": [low, high], \"focus_jitter\": fraction; got {value!r}.")
    defaults = Augmentation()
    zoom = _range(f"{where}.zoom", value.get("zoom", list(defaults.zoom)), 0.25, 4)
    gamma = _range(f"{where}.gamma", value.get("gamma", list(defaults.gamma)), 0.25, 4)
    shift = _fraction(f"{where}.shift", value.get("shift", defaults.shift))
    if shift > 0.5:
        raise FitConfigError(f"{where}.shift must be at most 0.5 (half the image), got {shift!r}.")
    window = _fraction(f"{where}.window", value.get("window", defaults.window))
    if window > 0.4:
        raise FitConfigError(f"{where}.window must be at most 0.4 (the grey range would fold), got {window!r}.")
    focus = _fraction(f"{where}.focus", value.get("focus", defaults.focus))
    focus_zoom = _range(f"{where}.focus_zoom", value.get("focus_zoom", list(defaults.focus_zoom)), 1, 4)
    focus_jitter = _fraction(f"{where}.focus_jitter", value.get("focus_jitter", defaults.focus_jitter))
    if focus_jitter > 0.25:
        raise FitConfigError(f"{where}.focus_jitter must be at most 0.25 (the gland would leave a 2x close-up), "
                             f"got {focus_jitter!r}.")
    return Augmentation(zoom=zoom, shift=shift, window=window, gamma=gamma, focus=focus, focus_zoom=focus_zoom,
                        focus_jitter=focus_jitter)


def _range(where: str, value: Any, lowest: float, highest: float) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
            or not lowest <= value[0] <= value[1] <= highest):
        raise FitConfigError(f"{where} must be [low, high] with {lowest} <= low <= high <= {highest}, got {value!r}.")
    return float(value[0]), float(value[1])


def _train_mode(where: str, value: Any) -> str:
    if value not in TRAIN_MODES:
        raise FitConfigError(f"{where} must be one of {', '.join(TRAIN_MODES)}, got {value!r}.")
    return value


def _precision(where: str, value: Any) -> str:
    if value not in PRECISIONS:
        raise FitConfigError(f"{where} must be one of {', '.join(PRECISIONS)}, got {value!r}.")
    return value


_positive_int, _non_negative_int = _number(0, strict=True, integer=True), _number(0, integer=True)
_positive_float = _number(0, strict=True)
_RUN_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "init_lr": _positive_float, "min_lr": _number(0), "warmup_lr": _number(0), "warmup_steps": _non_negative_int,
    "weight_decay": _number(0), "betas": _betas, "iters_per_epoch": _positive_int, "max_epoch": _positive_int,
    "batch_size": _positive_int, "grad_accumulation": _positive_int, "precision": _precision,
    "seed": _non_negative_int, "max_steps": _number(0, True, True, optional=True), "device": _text,
    "num_workers": _non_negative_int, "log_every": _positive_int, "gradient_checkpointing": _flag,
    "hash_base_files": _flag, "stage": partial(_text, allow_empty=True), "train": _train_mode,
    "grad_clip": _number(0, strict=True, optional=True), "patch_grounding": _number(0), "answer_value": _number(0),
    "inference_layout_share": _fraction, "augment": _augmentation,
    "description": partial(_text, allow_empty=True),
}


# ------------------------------------------------------------------------------------------ output folder

def prepare_output_dir(config: FitConfig, resume: bool, force: bool) -> dict[str, Any] | None:
    """Make `output_dir` ready for this run and return the latest checkpoint's record when resuming (else None).

    A folder holding another run is refused unless `force` (which deletes that run's files, and only those).
    The same run is continued with `resume`; without it, it is refused once it has a checkpoint, so nothing is
    overwritten by accident.
    """
    if resume and force:
        raise FitConfigError("--resume continues the run in output_dir, --force starts it over; choose one.")
    out = config.output_dir
    saved = out / CONFIG_FILE
    latest = None
    if force:
        _remove_run_files(out)
    elif saved.is_file():
        previous, current = json.loads(saved.read_text(encoding="utf-8")), config.identity()
        different = sorted(key for key in set(previous) | set(current)
                           if key not in _NOT_IDENTITY and previous.get(key) != current.get(key))
        if different:
            raise FitConfigError(f"output_dir {out} holds a different run (it differs in: {', '.join(different)}). "
                                 "Choose another output_dir, or pass --force to delete that run and start over.")
        if (out / LATEST_FILE).is_file():
            latest = json.loads((out / LATEST_FILE).read_text(encoding="utf-8"))
        if latest and not resume:  # (the same run without a checkpoint yet has nothing to lose: it starts again)
            raise FitConfigError(f"output_dir {out} already holds this run (saved up to step {latest['step']}); "
                                 "pass --resume to continue it or --force to delete it and start over.")
    elif out.is_dir() and any(out.iterdir()):
        raise FitConfigError(f"output_dir {out} is not empty and holds no fit run ({CONFIG_FILE} is missing). "
                             "Choose an empty or new folder, or pass --force to write into it anyway.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(saved, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    return latest


def _remove_run_files(out: Path) -> None:
    """Delete what `fit` writes (and nothing else) from `out`."""
    if not out.is_dir():
        return
    for pattern in (CONFIG_FILE, LATEST_FILE, LOG_FILE, "checkpoint_*.pth", "model_epoch_*", ".model_epoch_*",
                    ".tmp-*", SCRATCH_FOLDER):
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
