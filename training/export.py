"""`minigpt-pancreas-train export`: a self-contained model folder from a fit run or from a model folder.

    OUT/
      minigpt_model.json      the manifest: config, every file by path RELATIVE to OUT with size and sha256, and a
                              card {model_id, description, synthetic, created}
      trainable.safetensors   the trained tensors (llama_proj, LoRA, ln_vision)
      tokenizer.model
      base/eva_vit.pth        a copy of the EVA ViT file
      base/llama/             a copy of what loading reads from the LLaMA folder: config.json and the weights

Relative paths let the folder load wherever it is moved or copied (`backend.load_model(OUT)`). The base files are
always copied, never hard-linked: a later change to the original cannot reach the copy, and the folder can be moved
to another file system. For the real model that is about 15 GB. Optimizer state, checkpoints and logs stay behind.

The source is checked first (manifest, base files by size, tokenizer present), then everything is written into a
staging folder beside OUT and renamed into place, so a failure (a file that changed, a full disk) leaves no
half-written OUT. Every file is hashed while it is copied and compared with the sha256 recorded at save time.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.checkpoint_io import sha256_of
from backend.checkpoints import BaseFiles
from backend.commands.model_options import ModelSourceError
from backend.model_dir import MANIFEST_FILE, TENSORS_FILE, check_base_files, provenance_path, read_manifest
from backend.tokenizer import MODEL_FILE_NAME
from SlicerMiniGPTPancreas.atomic import staged_folder
from SlicerMiniGPTPancreas.errors import UserError
from training.config import LATEST_FILE, model_dir_name

VIT_FILE = "base/eva_vit.pth"
LLAMA_DIR = "base/llama"
_CHUNK_BYTES = 16 << 20
_MAX_MODEL_ID = 200  # the protocol's limit on model ids


class ExportError(UserError, ValueError):
    """The export cannot run as asked (a broken source, an occupied --out, a bad --model-id)."""


def model_folder_of(path: Path, epoch: int | None = None) -> Path:
    """The model folder `path` names: itself, or a fit output folder's latest model (`model_epoch_<epoch>` when
    `epoch` is given)."""
    if not path.is_dir():
        raise ModelSourceError(f"model folder not found: {path}. Give a model folder (import-upstream, export, fit's "
                               "model_epoch_N) or a fit output folder.")
    is_model_folder = (path / MANIFEST_FILE).is_file()
    if epoch is not None:
        if is_model_folder:
            raise ModelSourceError(f"--epoch {epoch}: {path} is a model folder, not a fit output folder; leave "
                                   "--epoch out.")
        folder = path / model_dir_name(epoch)
        if not folder.is_dir():
            saved = sorted(p.name for p in path.glob("model_epoch_*"))
            raise ModelSourceError(f"--epoch {epoch}: {path} has no {folder.name} (saved: {saved or 'none'}).")
        return folder
    latest = path / LATEST_FILE
    if is_model_folder or not latest.is_file():
        return path  # read_manifest then says what is missing
    try:
        return path / json.loads(latest.read_text(encoding="utf-8"))["model_dir"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelSourceError(f"{latest} is damaged ({error}); pass one of its model_epoch_N folders.") from error


def export_model(source: Path, out: Path, *, epoch: int | None = None, model_id: str | None = None,
                 description: str | None = None, synthetic: bool = False, force: bool = False,
                 half_base: bool = False, close_up_zoom: float | None = None) -> dict[str, Any]:
    """Export the model `source` names (see `model_folder_of`) into the new folder `out`; return its manifest.
    force: replace an `out` that holds files (only once the new folder is complete). half_base: store the base
    weights in float16, as upstream ships eva_vit_g.pth and LLaMA-2 (half the size; the trained tensors stay
    float32). The copies then differ from the source's base, so evaluate the exported folder, not the source.
    close_up_zoom: the manifest's `inference.close_up_zoom` (`backend.close_up`; 0 removes it, None keeps the
    source's)."""
    folder = model_folder_of(Path(source), epoch)
    manifest = read_manifest(folder)
    base = _checked_source(folder, manifest)
    out = Path(out).absolute()
    _check_target(out, [folder, base.vit_checkpoint, base.llama_dir], force)
    card = _card(folder, manifest, model_id, description, synthetic)
    with staged_folder(out) as staging:
        staging.chmod(0o755)  # a temporary folder is private (0700); a model folder is meant to be shared
        exported = {**manifest, **_copy_files(folder, manifest, base, staging, half_base), "card": card,
                    "exported_from": provenance_path(folder)}
        if close_up_zoom is not None:
            exported["inference"] = {**(manifest.get("inference") or {}), "close_up_zoom": close_up_zoom or None}
        (staging / MANIFEST_FILE).write_text(json.dumps(exported, indent=2) + "\n")
    return exported


def _checked_source(folder: Path, manifest: dict[str, Any]) -> BaseFiles:
    base, problems = check_base_files(manifest, model_dir=folder)
    for file in (folder / manifest["tensors"]["file"], folder / MODEL_FILE_NAME):
        if not file.is_file():
            problems.append(f"{file}: missing")
    if problems:
        raise ExportError(f"cannot export {folder}: {'; '.join(problems)}. Restore the files the model was saved "
                          "with, then export again.")
    return base


def _check_target(out: Path, sources: list[Path], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give the path of a new folder.")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} already holds files; choose a new folder, or pass --force to replace it.")
    for source in sources:
        a, b = out.resolve(), source.resolve()
        if a == b or a in b.parents or b in a.parents:  # --force would delete the source, or copy into itself
            raise ExportError(f"--out {out} overlaps {source}, which the export reads; choose a folder outside it.")


def _card(folder: Path, manifest: dict[str, Any], model_id: str | None, description: str | None,
          synthetic: bool) -> dict[str, Any]:
    """The new card; what is not given comes from the source's card (re-exporting keeps it), else defaults."""
    earlier = manifest.get("card") or {}
    model_id = model_id or earlier.get("model_id") or f"{_run_name(folder)}-{manifest['tensors']['sha256'][:8]}"
    if not model_id.strip() or len(model_id) > _MAX_MODEL_ID or not model_id.isprintable():
        raise ExportError(f"--model-id must be 1-{_MAX_MODEL_ID} printable characters, got {model_id!r}.")
    return {"model_id": model_id,
            "description": description if description is not None else earlier.get("description", ""),
            "synthetic": synthetic or bool(earlier.get("synthetic", False)),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _run_name(folder: Path) -> str:
    """The fit run's name for its model_epoch_N folders, else the folder's own name."""
    folder = folder.absolute()
    return folder.parent.name if folder.name.startswith("model_epoch_") else folder.name


def _copy_files(folder: Path, manifest: dict[str, Any], base: BaseFiles, staging: Path,
                half_base: bool) -> dict[str, Any]:
    """Copy every file loading needs into `staging`; return the manifest entries that describe the copies."""
    recorded = manifest["base"]
    tensors = _copy(folder / manifest["tensors"]["file"], staging / TENSORS_FILE, manifest["tensors"]["sha256"])
    tokenizer = _copy(folder / MODEL_FILE_NAME, staging / MODEL_FILE_NAME, None)
    vit = _copy(base.vit_checkpoint, staging / VIT_FILE, recorded["vit_checkpoint"].get("sha256"))
    llama = {name: _copy(base.llama_dir / name, staging / LLAMA_DIR / name, entry.get("sha256"))
             for name, entry in recorded["llama_dir"]["files"].items()}
    if half_base:
        vit = _to_float16(staging / VIT_FILE)
        llama = {name: _to_float16(staging / LLAMA_DIR / name) if name != "config.json" else entry
                 for name, entry in llama.items()}
    return {"base": {"vit_checkpoint": {"path": VIT_FILE, **vit}, "llama_dir": {"path": LLAMA_DIR, "files": llama}},
            "tensors": {"file": TENSORS_FILE, **tensors},
            "tokenizer": {"file": MODEL_FILE_NAME, **tokenizer}}


def _copy(source: Path, target: Path, recorded_sha256: str | None) -> dict[str, Any]:
    """Copy `source` to `target`, hashing the bytes on the way (one read of a multi-GB file, not two)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    sha256 = digest.hexdigest()
    if recorded_sha256 is not None and sha256 != recorded_sha256:
        raise ExportError(f"{source} is not the file the model was saved with (sha256 differs); restore it, then "
                          "export again.")
    return {"size": target.stat().st_size, "sha256": sha256}


def _to_float16(path: Path) -> dict[str, Any]:
    """Rewrite a weight file (.pth, .bin or .safetensors) with its float tensors in float16; its new fingerprint."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        save_file({k: _half(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({k: _half(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}, path)
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def _half(tensor):
    return tensor.half().contiguous() if tensor.is_floating_point() else tensor
