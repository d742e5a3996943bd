"""The language model: LLaMA-2 from a local Hugging Face folder (transformers), wrapped with LoRA (peft).

Upstream (spec §1.3) loads `LlamaForCausalLM.from_pretrained(path, torch_dtype=float16)`, optionally in 8-bit, and
adds LoRA with peft 0.2.0 (r 64, alpha 16, dropout 0.05, q_proj and v_proj, A/B in float32, un-merged). The same
graph is built here with current transformers and peft; the LoRA A/B stay float32 when the base is half
precision (peft's `autocast_adapter_dtype`), as upstream's are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.checkpoint_io import CheckpointError
from SlicerMiniGPTPancreas.errors import UserError

QUANTIZATION_MODES = ("8bit", "4bit")
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")
_LEGACY_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


class QuantizationError(UserError, ValueError):
    """8-bit / 4-bit loading was asked for but cannot run here (no CUDA or no bitsandbytes)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def read_llama_config(llama_dir: str | os.PathLike):
    """The `LlamaConfig` of a LLaMA Hugging Face folder, or CheckpointError saying what is wrong.

    Every size and `rms_norm_eps` come from the folder's own config.json (spec [U]: the eps differs between HF
    revisions of Llama-2; upstream, too, used whatever the folder said).
    """
    from transformers import LlamaConfig

    folder = Path(llama_dir)
    advice = (
        "Point llama_dir at a LLaMA-2 Hugging Face folder (e.g. Llama-2-7b-chat-hf) that holds config.json, "
        "the weight files and tokenizer.model."
    )
    if not folder.is_dir():
        raise CheckpointError(f"LLaMA folder {folder} does not exist or is not a folder. {advice}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in the LLaMA folder {folder}. {advice}")
    try:
        config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {error}. {advice}") from error
    if config.model_type != "llama":
        raise CheckpointError(f"{folder / 'config.json'} describes a {config.model_type!r} model, not LLaMA. {advice}")
    return config


def llama_weight_files(llama_dir: str | os.PathLike) -> list[Path]:
    """The weight files `from_pretrained` reads: the safetensors shards when present, else the legacy `.bin`."""
    folder = Path(llama_dir)
    for patterns in (_WEIGHT_PATTERNS, _LEGACY_WEIGHT_PATTERNS):
        files = sorted({file for pattern in patterns for file in folder.glob(pattern) if file.is_file()})
        if files:
            return files
    raise CheckpointError(
        f"no LLaMA weight files in {folder} (looked for model*.safetensors and pytorch_model*.bin). "
        "Download the complete Hugging Face folder."
    )


def load_llm(
    llama_dir: str | os.PathLike,
    lora: LoraSettings,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load the LLaMA weights (every tensor must be present and well-shaped), freeze them and add LoRA.

    Returns a peft `PeftModelForCausalLM` on `device`; the LoRA matrices hold peft's fresh initialisation
    until the caller copies checkpoint tensors into them. Without quantization the weights are streamed one tensor
    at a time (`_streamed_llama`), so a 13 GB float16 folder loads into bfloat16 without holding a second copy.
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(llama_dir)
    config = read_llama_config(folder)
    files = llama_weight_files(folder)
    if quantization is None:
        llm = _streamed_llama(config, files, dtype, attn_implementation).to(device)
    else:
        llm = _quantized_llama(folder, dtype, device, quantization, attn_implementation)
    llm.requires_grad_(False)
    lora_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers method that 5.x deprecates; not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        return get_peft_model(llm, lora_config)


def _streamed_llama(config, files: list[Path], dtype: torch.dtype, attn_implementation: str):
    """`LlamaForCausalLM` built without weights, then filled tensor by tensor from the files, each cast to `dtype`
    as it arrives: peak memory is the loaded model plus one tensor. Extra tensors (4.30's `rotary_emb.inv_freq`)
    are ignored, as `from_pretrained` ignores them."""
    from transformers import LlamaForCausalLM

    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    expected = dict(llm.state_dict())
    seen: set[str] = set()
    mismatched = []
    for file in (file for file in files if file.suffix != ".json"):  # the shard index only names the shards
        for name, tensor in _file_tensors(file):
            target = expected.get(name)
            if target is None:
                continue
            if tuple(tensor.shape) != tuple(target.shape):
                mismatched.append((name, tuple(tensor.shape), tuple(target.shape)))
                continue
            module_name, _, leaf = name.rpartition(".")
            module = llm.get_submodule(module_name)
            module._parameters[leaf] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
            seen.add(name)
    _refuse_llama_problems(files[0].parent, sorted(set(expected) - seen), mismatched)
    # Non-persistent buffers (the rotary frequencies) are computed, not loaded: rebuild them off the meta device.
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=config)
    return llm.eval()


def _file_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, one at a time. safetensors are read with plain reads (an mmap would count
    the whole file in the process's memory while it loads); legacy `.bin` files are memory-mapped when their
    format allows it (zip files, torch >= 1.6)."""
    try:
        if file.suffix == ".safetensors":
            yield from _safetensors_tensors(file)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)).items()
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"cannot read the LLaMA weight file {file}: {str(error).splitlines()[0] if str(error) else error!r}. "
            "It is damaged or incomplete; download the folder again."
        ) from error


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _safetensors_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The safetensors layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data."""
    with open(file, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
        base = 8 + header_length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            data = bytearray(end - begin)
            handle.seek(base + begin)
            if handle.readinto(data) != len(data):
                raise ValueError(f"{name} is cut short (the file ends early)")
            tensor = torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[entry["dtype"]]) if data else torch.empty(0)
            yield name, tensor.reshape(entry["shape"])


def _quantized_llama(folder: Path, dtype: torch.dtype, device: torch.device, quantization: str,
                     attn_implementation: str):
    """8-bit / 4-bit weights need bitsandbytes' own loading, through `from_pretrained`."""
    from transformers import LlamaForCausalLM

    quantization_config = _quantization_config(quantization, dtype, device)
    # Mis-shaped tensors are collected (not raised one by one) so that all of them can be listed.
    try:
        llm, info = LlamaForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
            attn_implementation=attn_implementation, quantization_config=quantization_config,
            device_map={"": device.index if device.index is not None else torch.cuda.current_device()})
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"cannot load the LLaMA weights from {folder}: {str(error).splitlines()[0]} "
            "The folder's weight files do not match its config.json or are damaged; download the folder again."
        ) from error
    _refuse_llama_problems(folder, sorted(info.get("missing_keys", ())),
                           [(name, found, wanted) for name, found, wanted in info.get("mismatched_keys", ())])
    return llm


def _refuse_llama_problems(folder: Path, missing: list[str], mismatched: list[tuple]) -> None:
    problems = [f"  missing    {name}" for name in missing]
    problems += [f"  mis-shaped {name}  (config.json needs {list(wanted)}, file has {list(found)})"
                 for name, found, wanted in sorted(mismatched)]
    if problems:
        listing = "\n".join(problems)
        raise CheckpointError(
            f"the LLaMA weights in {folder} do not match its config.json: {len(problems)} tensor(s) missing or "
            f"mis-shaped:\n{listing}\nDownload the complete folder again (all weight shards and the matching "
            "config.json)."
        )


def _quantization_config(mode: str, dtype: torch.dtype, device: torch.device):
    """transformers' BitsAndBytesConfig for 8-bit or 4-bit (NF4) weights; bitsandbytes is imported lazily."""
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(f"quantization must be one of {QUANTIZATION_MODES} or None, got {mode!r}.")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationError(
            f"{mode} loading needs a CUDA GPU (device is {device}, CUDA available: {torch.cuda.is_available()}). "
            "Use dtype float16/bfloat16 on a GPU or float32 on the CPU instead."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"{mode} loading needs the bitsandbytes package, which is not installed: pip install bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
