"""What a model folder's minigpt_model.json must hold, and the first way a manifest falls short of it.

A model folder states its config in full: every MiniGPTConfig and VisionConfig field, no defaults. Those defaults
are EVA ViT-g's and LLaMA-2-7B's sizes; filled into a tiny model's manifest they would turn one missing key into
hundreds of "missing tensor" lines that blame eva_vit_g.pth. Every version of this tool has written every field
(format_version 1 since the first commit), so no older folder lacks one. The config schema is derived from the
dataclasses, so a new config field is required here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from backend.config import MiniGPTConfig


@dataclass(frozen=True)
class Leaf:
    """A value: what it must be, in words, and the test."""

    expected: str
    accepts: Callable[[Any], bool]


@dataclass(frozen=True)
class Maybe:
    """May be absent or null; else must match `spec`."""

    spec: Any


@dataclass(frozen=True)
class Named:
    """An object keyed by names (file names), each value matching `spec`."""

    spec: Any


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


COUNT = Leaf("a whole number >= 1", lambda value: _whole(value) and value >= 1)
BYTES = Leaf("a byte count", lambda value: _whole(value) and value >= 0)
NUMBER = Leaf("a finite number", lambda value: (_whole(value) or isinstance(value, float)) and math.isfinite(value))
TEXT = Leaf("a non-empty string", lambda value: isinstance(value, str) and value != "")
ANY_TEXT = Leaf("a string", lambda value: isinstance(value, str))
TEXTS = Leaf("a list of strings", lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value))
BOOL = Leaf("true or false", lambda value: isinstance(value, bool))
SHA256 = Leaf("64 hex digits (a sha256)", lambda value: isinstance(value, str)
              and re.fullmatch(r"[0-9a-f]{64}", value) is not None)
MODEL_ID = Leaf("1-200 printable characters", lambda value: isinstance(value, str) and 0 < len(value) <= 200
                and value.isprintable())
ZOOM = Leaf("a number from 1 to 4", lambda value: (_whole(value) or isinstance(value, float)) and 1 <= value <= 4)
_LEAF_OF_TYPE = {int: COUNT, float: NUMBER, str: TEXT, tuple[str, ...]: TEXTS}


def config_schema(config_class: type) -> dict[str, Any]:
    """Every field of a config dataclass, required, nested dataclasses as objects."""
    hints = get_type_hints(config_class)
    return {field.name: _LEAF_OF_TYPE.get(hints[field.name]) or config_schema(hints[field.name])
            for field in dataclasses.fields(config_class)}


_FILE = {"size": BYTES, "sha256": Maybe(SHA256)}  # sha256 null: saved without hashing
MANIFEST = {
    "config": config_schema(MiniGPTConfig),
    "base": {"vit_checkpoint": {"path": TEXT, **_FILE}, "llama_dir": {"path": TEXT, "files": Named(_FILE)}},
    "imported_from": Maybe(TEXT),
    "tensors": {"file": TEXT, "sha256": SHA256, "size": Maybe(BYTES)},
    "tokenizer": Maybe({"file": TEXT, **_FILE}),  # written by export
    "card": Maybe({"model_id": Maybe(MODEL_ID), "description": Maybe(ANY_TEXT), "synthetic": Maybe(BOOL),
                   "created": Maybe(ANY_TEXT)}),
    "inference": Maybe({"close_up_zoom": Maybe(ZOOM)}),  # how the model is meant to be asked (backend.close_up)
}


def manifest_problem(manifest: Any) -> str | None:
    """The first way `manifest` differs from MANIFEST ("config.vision.depth is missing"), or None."""
    return _problem(manifest, MANIFEST, "")


def _problem(value: Any, spec: Any, path: str) -> str | None:
    if isinstance(spec, Maybe):
        return None if value is None else _problem(value, spec.spec, path)
    if isinstance(spec, Leaf):
        return None if spec.accepts(value) else f"{path} is {_shown(value)}, expected {spec.expected}"
    if not isinstance(value, dict):
        return f"{path or 'the manifest'} is {_shown(value)}, expected an object"
    if isinstance(spec, Named):
        items = [(value[name], spec.spec, f"{path}[{json.dumps(name)}]") for name in value]
    else:
        missing = [key for key, sub in spec.items() if key not in value and not isinstance(sub, Maybe)]
        if missing:
            return f"{_join(path, missing[0])} is missing"
        items = [(value.get(key), sub, _join(path, key)) for key, sub in spec.items()]
    for item in items:
        if found := _problem(*item):
            return found
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value)  # null, "sixteen", NaN: as the file has it
    return text if len(text) <= 40 else text[:37] + "..."
