"""The bundled demo model: the model `predict`, `serve` and `evaluate` use when no --model is given.

    backend/demo_model/
      model/          a self-contained model folder (`minigpt-pancreas-train export ... --synthetic`)
      MODEL_CARD.md   what it was trained on and how well it does
      report/         its evaluation

It is a tiny MiniGPT-v2 trained on synthetic CT (`SlicerMiniGPTPancreas.phantom`) by the cascade
`minigpt-pancreas-train cascade training/configs/demo/cascade.json`: it shows the whole pipeline working on a
laptop, not a model for patients. $MINIGPT_PANCREAS_DEMO_MODEL points the lookup at another model folder (a demo
model kept elsewhere, or the tests' tiny one).

Pure Python (no torch), so commands can name the default model before loading anything heavy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from SlicerMiniGPTPancreas.errors import UserError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
ENVIRONMENT_VARIABLE = "MINIGPT_PANCREAS_DEMO_MODEL"
BUILD_COMMAND = "minigpt-pancreas-train cascade training/configs/demo/cascade.json"
MANIFEST_FILE = "minigpt_model.json"  # backend.model_dir.MANIFEST_FILE, named again so that no torch is imported


class DemoModelError(UserError, ValueError):
    """The bundled demo model is not there (not built yet, or $MINIGPT_PANCREAS_DEMO_MODEL points elsewhere)."""


def bundled_model_dir() -> Path:
    """The demo model folder ($MINIGPT_PANCREAS_DEMO_MODEL, else DEMO_MODEL_DIR); DemoModelError when it is missing."""
    override = os.environ.get(ENVIRONMENT_VARIABLE)
    folder = Path(override) if override else DEMO_MODEL_DIR
    if not (folder / MANIFEST_FILE).is_file():
        where = f"${ENVIRONMENT_VARIABLE} points at {folder}" if override else f"{folder} is missing"
        raise DemoModelError(f"no bundled demo model: {where} (no {MANIFEST_FILE}). Build it with `{BUILD_COMMAND}`, "
                             "or give a model with --model DIR or --upstream VIT LLAMA CKPT.")
    return folder


def model_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest's card {model_id, description, synthetic, created}; a folder without one gets its folder name as
    model_id and synthetic False."""
    folder = Path(model_dir)
    try:
        card = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("card") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise DemoModelError(f"cannot read {folder / MANIFEST_FILE} ({error}); re-create the model folder.") from error
    return {"model_id": card.get("model_id") or folder.resolve().name, "description": card.get("description", ""),
            "synthetic": bool(card.get("synthetic", False)), "created": card.get("created")}


def default_model_notice(model_dir: str | os.PathLike) -> str:
    """The line a command prints first when it falls back to the bundled model."""
    card = model_card(model_dir)
    kind = " (synthetic demonstration model, not for clinical use)" if card["synthetic"] else ""
    return f"Using the bundled demo model {card['model_id']}{kind}: {model_dir}"
