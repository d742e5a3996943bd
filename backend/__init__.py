"""MiniGPT-Pancreas backend: the MiniGPT-v2 model, the inference engine, the HTTP service and the CLI.

`import backend` stays light (no torch): the model API below is imported on first attribute access, so the
CLI's `--help` is fast.

    backend.load_upstream(vit_checkpoint, llama_dir, minigpt_checkpoint, image_size=448, dtype=..., device=...)
    backend.load_model(model_dir, dtype=..., device=...)        # this project's model folder
    backend.save_model_dir(model, out_dir)
    backend.preprocess_image(pil_image, image_size=448)          # -> [3, S, S] float32
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "load_upstream": "backend.checkpoints",
    "CheckpointError": "backend.checkpoint_io",
    "load_model": "backend.model_dir",
    "save_model_dir": "backend.model_dir",
    "preprocess_image": "backend.image",
    "preprocess_images": "backend.image",
    "ImageInputError": "backend.image",
    "MiniGPTv2": "backend.model",
    "MiniGPTConfig": "backend.config",
    "VisionConfig": "backend.config",
    "ConfigError": "backend.config",
    "GenerationResult": "backend.decoding",
    "SamplingOptions": "backend.decoding",
    "QuantizationError": "backend.llm",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'backend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
