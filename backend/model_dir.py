"""This project's own model format: a folder that names its frozen base files and holds the trained tensors.

    MODEL_DIR/
      minigpt_model.json      format tag, MiniGPTConfig, base files (absolute paths, sizes, optional sha256)
      trainable.safetensors   llama_proj, LoRA A/B and ln_vision, under upstream (peft 0.2.0) names, float32
      tokenizer.model         copy of the LLaMA SentencePiece model

The frozen weights (eva_vit_g.pth, ~2 GB; the LLaMA-2 folder, ~13 GB) are not copied. Loading checks that they
are still the files the model was saved with: by size always, and by sha256 with `verify_hashes=True` (reads
every byte: minutes for 13 GB). Hashes are recorded at save time unless `hash_base_files=False`, in which case
only sizes can be checked. Moved base files can be given to `load_model` explicitly.

A base path in the manifest may also be relative: it is then resolved against the model folder. That is how
`minigpt-pancreas-train export` writes a self-contained folder (the base files copied into `base/`, every path
relative), which keeps loading after the folder is moved or copied to another machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from backend.checkpoint_io import CheckpointError, FileFingerprint, fingerprint, load_torch_file, sha256_of, tensor_dict
from backend.checkpoints import BaseFiles, assemble_model
from backend.config import ConfigError, MiniGPTConfig
from backend.llm import llama_weight_files
from backend.manifest_schema import manifest_problem
from backend.model import MiniGPTv2
from backend.tokenizer import UpstreamLlamaTokenizer
from SlicerMiniGPTPancreas.atomic import atomic_write

FORMAT_NAME = "minigpt-pancreas-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "minigpt_model.json"
TENSORS_FILE = "trainable.safetensors"


def save_model_dir(model: MiniGPTv2, out_dir: str | os.PathLike, hash_base_files: bool = True,
                   overwrite: bool = False, base: BaseFiles | None = None) -> Path:
    """Write `model` as a model folder. The manifest is written last, so a folder without it is incomplete.

    `base` overrides the model's own base files (a stage that trained the base writes it into the folder first);
    base files inside the folder are recorded by relative path, so the folder can be moved."""
    from safetensors.torch import save_file

    folder = Path(out_dir)
    if (folder / MANIFEST_FILE).exists() and not overwrite:
        raise CheckpointError(f"{folder} already holds a model; choose another folder or pass overwrite=True.")
    base = base or getattr(model, "base_files", None)
    if base is None:
        raise CheckpointError("this model does not know its base files; build it with load_upstream or load_model.")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().float().cpu().contiguous()
               for name, tensor in model.adapter_state_dict().items()}
    tensors.update({f"ln_vision.{key}": value.detach().float().cpu().contiguous()
                    for key, value in model.ln_vision.state_dict().items()})
    atomic_write(folder / TENSORS_FILE, lambda temp: save_file(tensors, temp, metadata={"format": FORMAT_NAME}))
    model.tokenizer.save(folder)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "base": {
            "vit_checkpoint": {"path": _path_to_record(base.vit_checkpoint, folder),
                               **fingerprint(base.vit_checkpoint, hash_base_files).to_dict()},
            "llama_dir": {"path": _path_to_record(base.llama_dir, folder), "files": {
                file.name: fingerprint(file, hash_base_files).to_dict() for file in _llama_files(base.llama_dir)}},
        },
        "imported_from": provenance_path(base.imported_from) if base.imported_from else None,
        "tensors": {"file": TENSORS_FILE, "sha256": sha256_of(folder / TENSORS_FILE)},
    }
    text = json.dumps(manifest, indent=2)
    atomic_write(folder / MANIFEST_FILE, lambda temp: temp.write_text(text))
    return folder


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a model folder, checked against manifest_schema.MANIFEST and MiniGPTConfig's own rules."""
    folder = Path(model_dir)
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a model folder: {MANIFEST_FILE} is missing. Create one with "
                              "`minigpt-pancreas import-upstream` (or finish an interrupted save).")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # unreadable, not UTF-8, not JSON, absurdly nested
        raise CheckpointError(f"cannot read {file}: {error}. Re-create the model folder.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not a {FORMAT_NAME} manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {manifest.get('format_version')}; this program reads "
                              f"version {FORMAT_VERSION}. Re-import the model with this version.")
    problem = manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{file}: {problem}; the folder was not written by this tool or was edited. "
                              "Re-create it (minigpt-pancreas import-upstream, or minigpt-pancreas-train export).")
    try:
        MiniGPTConfig.from_dict(manifest["config"])
    except ConfigError as error:
        raise CheckpointError(f"{file}: invalid model config ({error}).") from error
    return manifest


def close_up_zoom(model_dir: str | os.PathLike) -> float | None:
    """The manifest's `inference.close_up_zoom` (a model trained for a second, closer look; `backend.close_up`),
    or None (asked once, as upstream's model is)."""
    return (read_manifest(model_dir).get("inference") or {}).get("close_up_zoom")


def check_base_files(manifest: dict[str, Any], verify_hashes: bool = False, vit_checkpoint: str | None = None,
                     llama_dir: str | None = None, *, model_dir: str | os.PathLike | None = None
                     ) -> tuple[BaseFiles, list[str]]:
    """(the base files to use, every way they differ from the recorded ones). Sizes always, sha256 optionally.
    Relative recorded paths are resolved against `model_dir`, the folder holding the manifest."""
    base = manifest["base"]
    vit = Path(vit_checkpoint or _recorded_path(base["vit_checkpoint"]["path"], model_dir))
    llama = Path(llama_dir or _recorded_path(base["llama_dir"]["path"], model_dir))
    problems = _compare(vit, base["vit_checkpoint"], verify_hashes)
    for name, recorded in base["llama_dir"]["files"].items():
        problems += _compare(llama / name, recorded, verify_hashes)
    imported_from = manifest.get("imported_from")
    return BaseFiles(vit, llama, Path(imported_from) if imported_from else None), problems


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               *, verify_hashes: bool = False, vit_checkpoint: str | None = None, llama_dir: str | None = None,
               quantization: str | None = None, allow_pickle: bool = False) -> MiniGPTv2:
    """Load a model folder written by `save_model_dir` (see the module docstring for the checks)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(model_dir)
    manifest = read_manifest(folder)
    config = MiniGPTConfig.from_dict(manifest["config"])  # read_manifest checked it
    base, problems = check_base_files(manifest, verify_hashes, vit_checkpoint, llama_dir, model_dir=folder)
    if problems:
        raise CheckpointError(f"the base files of {folder} are not the ones it was saved with:\n"
                              + "\n".join(f"  {line}" for line in problems)
                              + "\nRestore them, or pass their new location (vit_checkpoint=, llama_dir=).")
    tensors_file = folder / manifest["tensors"]["file"]
    if not tensors_file.is_file() or sha256_of(tensors_file) != manifest["tensors"]["sha256"]:
        raise CheckpointError(f"{tensors_file} is missing or not the file {MANIFEST_FILE} was written with "
                              "(sha256 differs). The model folder is damaged; re-create it.")
    try:
        trainable = load_file(tensors_file)
    except (OSError, SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"cannot read {tensors_file}: {error}. The model folder is damaged; re-create it."
                              ) from error
    vit_raw = tensor_dict(load_torch_file(base.vit_checkpoint, "EVA ViT checkpoint", allow_pickle),
                          base.vit_checkpoint, "EVA ViT checkpoint")
    tokenizer = UpstreamLlamaTokenizer.from_dir(folder)
    return assemble_model(config, vit_raw, base, trainable, tensors_file, tokenizer, dtype, torch.device(device),
                          quantization)


def _recorded_path(recorded: str, model_dir: str | os.PathLike | None) -> Path:
    path = Path(recorded)
    if path.is_absolute() or model_dir is None:
        return path
    # Absolute from here on: a model saved from this one (fit) must not record a path relative to the wrong folder.
    return (Path(model_dir) / path).resolve()


def provenance_path(path: str | os.PathLike) -> str:
    """A path recorded for provenance only (never opened again): relative to the working directory when under it,
    so a model built in a checkout records `runs/demo/...`, not the builder's home folder; else absolute."""
    resolved, here = Path(path).absolute(), Path.cwd()
    return str(resolved.relative_to(here)) if resolved.is_relative_to(here) else str(resolved)


def _path_to_record(path: Path, folder: Path) -> str:
    """Relative to the model folder when inside it (a self-contained folder), else absolute."""
    resolved, inside = Path(path).absolute(), folder.absolute()
    return str(resolved.relative_to(inside)) if resolved.is_relative_to(inside) else str(resolved)


def _llama_files(llama_dir: Path) -> list[Path]:
    return [llama_dir / "config.json", *llama_weight_files(llama_dir)]


def _compare(file: Path, recorded: dict[str, Any], verify_hashes: bool) -> list[str]:
    if not file.is_file():
        return [f"{file}: missing"]
    actual = FileFingerprint(file.stat().st_size, None)
    if actual.size != recorded["size"]:
        return [f"{file}: size {actual.size} bytes, recorded {recorded['size']}"]
    if verify_hashes:
        if recorded.get("sha256") is None:
            return [f"{file}: no sha256 was recorded (saved without hashing); cannot verify its content"]
        if sha256_of(file) != recorded["sha256"]:
            return [f"{file}: sha256 differs from the recorded one (same size, different content)"]
    return []
