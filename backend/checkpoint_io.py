"""Low-level checkpoint handling: reading `.pth` files safely, checking tensors against expectations, the
explicit map between upstream state-dict names and this model's names, and file fingerprints.

Name map (docs/upstream.md §2.3 and §9.1). Upstream trained with peft 0.2.0 and saved MiniGPT-level names:
  `llama_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`   (peft 0.2.0)
  `llama_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight`   (peft >= 0.3)
This model wraps the LLaMA with current peft under the same attribute names, so its own names differ only in
`lora_X.default.weight`, `<target>.base_layer.weight` (LoRA-wrapped frozen Linear) and `lm_head.weight`
(peft 0.2.0's `prepare_model_for_int8_training` made it `lm_head.0.weight`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from SlicerMiniGPTPancreas.errors import UserError


class CheckpointError(UserError, ValueError):
    """A model file or folder is missing, unreadable or does not hold the expected tensors.

    The message names the file, lists what is wrong (every missing or mis-shaped tensor) and says what to do.
    """


LLM_PREFIX = "llama_model.base_model.model."
_LORA_OLD = re.compile(r"\.(lora_[AB])\.weight$")  # peft 0.2.0: ...q_proj.lora_A.weight
_LORA_NEW = re.compile(r"\.(lora_[AB])\.default\.weight$")  # peft >= 0.3: ...q_proj.lora_A.default.weight
ROTARY_INV_FREQ = re.compile(r"\.rotary_emb\.inv_freq$")  # persistent buffer in transformers 4.30 (spec §9.1)


def load_torch_file(path: str | os.PathLike, what: str, allow_pickle: bool = False) -> dict[str, Any]:
    """`torch.load` a checkpoint on CPU and return its top-level dict, or raise CheckpointError saying why.

    By default only tensors and plain containers are unpickled (`weights_only=True`): a `.pth` can run code
    when loaded. `allow_pickle=True` lifts that for files you trust.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{what} not found: {file} does not exist or is not a file. Check the path.")
    try:
        data = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if not allow_pickle and "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{what} {file} holds Python objects besides tensors ({_blocked_global(error)}); they are not "
                "loaded by default because unpickling can run code. If you trust the file, pass "
                "allow_pickle=True (command line: --allow-pickle)."
            ) from error
        raise _damaged(file, what, error) from error
    except Exception as error:  # truncated or foreign files fail in many ways (OSError, RuntimeError, KeyError...)
        raise _damaged(file, what, error) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {file} holds a {type(data).__name__}, not a state dict (a dict of tensors).")
    return data


def _damaged(file: Path, what: str, error: Exception) -> CheckpointError:
    first_line = (str(error).splitlines() or [""])[0]
    return CheckpointError(
        f"cannot read {what} {file} ({file.stat().st_size} bytes; {type(error).__name__}: {first_line}). "
        "The file is damaged, incomplete (an interrupted download or copy?) or not a PyTorch checkpoint; "
        "download or copy it again."
    )


def _blocked_global(error: Exception) -> str:
    for line in str(error).splitlines():
        if "Unsupported global" in line:
            return line.strip()
    return "non-tensor objects"


def tensor_dict(data: dict[str, Any], file: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Keep the tensors of a state dict; non-tensor entries are an error (they mean a different file layout)."""
    not_tensors = sorted(key for key, value in data.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{what} {file} is not a flat state dict: entries {not_tensors[:5]} are not tensors. "
            "Pass the original file (eva_vit_g.pth is a raw state dict; MiniGPT checkpoints hold {'model': ...})."
        )
    return data


@dataclass(frozen=True)
class TensorProblem:
    """One expected tensor that is absent or has the wrong shape."""

    name: str
    expected_shape: tuple[int, ...]
    found_shape: tuple[int, ...] | None  # None: missing

    def describe(self) -> str:
        if self.found_shape is None:
            return f"  missing    {self.name}  (expected shape {list(self.expected_shape)})"
        return f"  mis-shaped {self.name}  (expected {list(self.expected_shape)}, found {list(self.found_shape)})"


def find_problems(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]) -> list[TensorProblem]:
    """Every expected tensor that `found` lacks or holds with another shape, in `expected`'s order."""
    problems = []
    for name, shape in expected.items():
        tensor = found.get(name)
        if tensor is None:
            problems.append(TensorProblem(name, tuple(shape), None))
        elif tuple(tensor.shape) != tuple(shape):
            problems.append(TensorProblem(name, tuple(shape), tuple(tensor.shape)))
    return problems


def refuse(file: str | os.PathLike, what: str, problems: list[TensorProblem], advice: str) -> None:
    """Raise CheckpointError listing every problem, if there is any."""
    if problems:
        lines = "\n".join(problem.describe() for problem in problems)
        raise CheckpointError(
            f"{what} {file} does not match the model: {len(problems)} expected tensor(s) missing or mis-shaped:\n"
            f"{lines}\n{advice}"
        )


def to_internal_name(upstream_name: str, lora_targets: tuple[str, ...] = ()) -> str:
    """Upstream MiniGPT state-dict name (peft 0.2.0 or newer) -> this model's `state_dict` name."""
    name = upstream_name
    if not _LORA_NEW.search(name):
        name = _LORA_OLD.sub(r".\1.default.weight", name)
    if name == LLM_PREFIX + "lm_head.0.weight":
        return LLM_PREFIX + "lm_head.weight"
    for target in lora_targets:  # the frozen Linear inside a LoRA layer moved under `base_layer`
        suffix = f".self_attn.{target}."
        for kind in ("weight", "bias"):
            if name.startswith(LLM_PREFIX) and name.endswith(suffix + kind):
                return name[: -len(kind)] + "base_layer." + kind
    return name


def to_upstream_name(internal_name: str) -> str:
    """This model's name -> the upstream (peft 0.2.0) name, as upstream's `_save_checkpoint` would write it."""
    name = _LORA_NEW.sub(r".\1.weight", internal_name)
    name = name.replace(".base_layer.", ".")
    if name == LLM_PREFIX + "lm_head.weight":
        return LLM_PREFIX + "lm_head.0.weight"
    return name


def lora_key(layer: int, target: str, matrix: str) -> str:
    """Upstream (peft 0.2.0) name of one LoRA matrix; `matrix` is "A" or "B"."""
    return f"{LLM_PREFIX}model.layers.{layer}.self_attn.{target}.lora_{matrix}.weight"


def normalize_lora_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename peft >= 0.3 LoRA keys (`lora_A.default.weight`) to the 0.2.0 form used as the canonical name."""
    return {_LORA_NEW.sub(r".\1.weight", name): tensor for name, tensor in state.items()}


@dataclass(frozen=True)
class FileFingerprint:
    """Size (always) and sha256 (optional: hashing a 13 GB LLaMA folder takes minutes) of one file."""

    size: int
    sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def fingerprint(path: str | os.PathLike, with_hash: bool) -> FileFingerprint:
    file = Path(path)
    return FileFingerprint(file.stat().st_size, sha256_of(file) if with_hash else None)


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
