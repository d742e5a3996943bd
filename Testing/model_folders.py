"""Model folders for the error-path tests: a copy of the bundled demo model, its manifest edited as a user (or a
broken disk) might have left it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.demo_model import DEMO_MODEL_DIR, MANIFEST_FILE


def bundled_model_copy(target: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The bundled model at `target` (its 14 MB of base weights linked, not copied), after `edit(manifest)`."""
    shutil.copytree(DEMO_MODEL_DIR, target, ignore=shutil.ignore_patterns("base"))
    (target / "base").symlink_to(DEMO_MODEL_DIR / "base", target_is_directory=True)
    if edit is not None:
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        edit(manifest)
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target
