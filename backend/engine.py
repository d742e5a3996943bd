"""The inference engine: model-view HU slices + prompts -> parsed, scored answers, many slices per model call.

Each slice goes through the one preprocessing of the project (`SlicerMiniGPTPancreas.preprocess.hu_slice_to_rgb`,
then `backend.preprocess_image` to the model's square input); slices are answered in batches of `batch_size`
(one left-padded, KV-cached greedy decoding per batch, `MiniGPTv2.decode_batch`); every answer is parsed with the
shared grammar, its boxes are mapped to pixels of the slice that was sent and scored (`backend.answers`). All input
is checked before the first batch runs, so a bad slice costs no model time.

Fewer model calls than one `generate` per question, with the same answers:
  * the vision tower encodes a slice once, however many questions it is asked (a cascade sweep asks up to three):
    image embeddings are kept, keyed by the slice's bytes, up to `image_cache_bytes` (least recently used first out);
  * box answers are decoded with jump-forward (`backend.decoding.BoxDrafter`): the pieces between the numbers
    ride along with the next model call and are kept only where greedy decoding would have written them.

The engine holds no files and no HTTP; it is not thread-safe (the service runs it from one GPU queue).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from backend import prompts as prompt_text
from backend.answers import (
    BoxGrammarConstraint, DetectedBox, SliceResult, asks_yes_no, to_slice_result, yes_no_token_ids,
    yes_probability,
)
from backend.batching import auto_batch_size
from backend.decoding import BoxDrafter, SamplingOptions
from backend.image import preprocess_image
from backend.image_cache import EmbeddingCache, image_key
from SlicerMiniGPTPancreas import preprocess
from SlicerMiniGPTPancreas.errors import UserError

__all__ = ["DetectedBox", "SliceResult", "EngineError", "EngineCancelled", "InferenceEngine"]

BOX_DECODINGS = ("center", "floor")
ProgressCallback = Callable[[int, int], None]  # (slices done, slices in total)


class EngineError(UserError, ValueError):
    """Bad input to the engine (wrong shape, NaN slice, empty prompt, ...); the message says what to fix."""


class EngineCancelled(RuntimeError):
    """`should_cancel()` returned True before a batch; `completed` holds the results of the batches already run."""

    def __init__(self, message: str, completed: list[SliceResult]) -> None:
        super().__init__(message)
        self.completed = completed


class InferenceEngine:
    """Batched question answering on CT slices with one loaded `MiniGPTv2`."""

    def __init__(self, model, *, batch_size: int | str = 8, box_decoding: str = "center", image_variant: str = "window",
                 model_id: str | None = None, precision: str | None = None, synthetic: bool = False,
                 image_cache_bytes: int = 1 << 30, close_up_zoom: float | None = None) -> None:
        """model: a loaded `backend.model.MiniGPTv2` (put in eval mode here). batch_size: slices per model call, or
        "auto": sized to memory (`backend.batching.auto_batch_size`). box_decoding, image_variant: the defaults
        of `run` and `chat`, which take either per call: box_decoding "center" (the middle of the grid cell) or
        "floor" (upstream's evaluation); image_variant the intensity rule of `SlicerMiniGPTPancreas.preprocess`
        ("window" = upstream HEAD, "paper"). precision: how the weights are
        held, for reports (default: the model's compute dtype, e.g. "float32"). synthetic: the model was trained
        on synthetic data only (a demonstration model; the service reports it). image_cache_bytes: how much
        memory (host RAM) the kept image embeddings may use; 0 encodes every slice again for every question.
        close_up_zoom: the model's second, closer look (`backend.close_up`), which the cascade sweep and
        `evaluate` use; None: the model is asked once."""
        if batch_size == "auto":
            batch_size = auto_batch_size(model)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EngineError(f"batch_size must be a whole number >= 1 or 'auto', got {batch_size!r}.")
        if isinstance(image_cache_bytes, bool) or not isinstance(image_cache_bytes, int) or image_cache_bytes < 0:
            raise EngineError(f"image_cache_bytes must be a whole number >= 0, got {image_cache_bytes!r}.")
        self.model = model.eval()  # the LoRA dropout must be off for reproducible answers
        self.batch_size = batch_size
        self.box_decoding = _checked_box_decoding(box_decoding)
        self.image_variant = _checked_image_variant(image_variant)
        self.model_id: str = model_id or "minigpt-v2"
        self.synthetic = synthetic
        self.close_up_zoom = close_up_zoom
        self.device: str = str(model.device)
        self.precision: str = precision or str(model.compute_dtype).removeprefix("torch.")
        self.image_size: int = model.config.vision.image_size
        self._yes_id, self._no_id = yes_no_token_ids(model.tokenizer)
        self._box_constraint: BoxGrammarConstraint | None = None  # built on first use (scans the vocabulary)
        self._drafter = BoxDrafter(model.tokenizer)
        self._images = EmbeddingCache(image_cache_bytes)
        self.images_encoded = 0  # slices the vision tower has encoded (benchmarks and tests read it)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                       quantization: str | None = None, batch_size: int | str = 8, box_decoding: str = "center",
                       image_variant: str = "window", model_id: str | None = None) -> "InferenceEngine":
        """Load a model folder (`backend.load_model`) and wrap it. dtype: None = float32 on the CPU, bfloat16 on
        a GPU that supports it, else float16; or "float32" / "float16" / "bfloat16" / a torch dtype.
        quantization: None, "8bit" or "4bit" (CUDA only). The model id defaults to the one on the folder's card
        (`minigpt-pancreas-train export`), else the folder's name.
        Loading errors (`backend.CheckpointError`, `QuantizationError`) say what is wrong with the files."""
        from backend.demo_model import model_card
        from backend.model_dir import close_up_zoom, load_model

        torch_dtype = resolve_dtype(dtype, device)
        model = load_model(path, dtype=torch_dtype, device=device, quantization=quantization)
        precision = str(torch_dtype).removeprefix("torch.")
        if quantization:
            precision = f"{quantization} weights, {precision} compute"
        card = model_card(path)
        return cls(model, batch_size=batch_size, box_decoding=box_decoding, image_variant=image_variant,
                   model_id=model_id or card["model_id"], precision=precision, synthetic=card["synthetic"],
                   close_up_zoom=close_up_zoom(path))

    # ---------------------------------------------------------------------------------------------- running

    def run(self, slices_hu: Sequence[np.ndarray], prompts: str | Sequence[str], *, max_new_tokens: int = 20,
            progress: ProgressCallback | None = None, should_cancel: Callable[[], bool] | None = None,
            constrain_boxes: bool = False, box_decoding: str | None = None,
            image_variant: str | None = None) -> list[SliceResult]:
        """Answer one prompt per model-view HU slice [R, C] (any real dtype); `prompts` is one string for all
        slices or one per slice. Batches of `batch_size`; `progress(done, total)` after each batch;
        `should_cancel()` before each batch (True -> EngineCancelled). constrain_boxes: let the model write
        only one box "{<x1><y1><x2><y2>}" (detection prompts; see `backend.answers.BoxGrammarConstraint`).
        box_decoding, image_variant: this call's (None: the engine's defaults)."""
        slices = _checked_arrays(slices_hu, "slices_hu", _check_hu_slice)
        variant = self.image_variant if image_variant is None else _checked_image_variant(image_variant)
        return self._run(slices, lambda hu: preprocess.hu_slice_to_rgb(hu, variant), prompts, max_new_tokens,
                         progress, should_cancel, constrain_boxes, f"hu/{variant}", box_decoding)

    def run_rgb(self, images_rgb: Sequence[np.ndarray], prompts: str | Sequence[str], *, max_new_tokens: int = 20,
                progress: ProgressCallback | None = None, should_cancel: Callable[[], bool] | None = None,
                constrain_boxes: bool = False, box_decoding: str | None = None) -> list[SliceResult]:
        """`run` for ready 8-bit images (e.g. PNGs): uint8 [R, C, 3] (also [R, C] or RGBA [R, C, 4], whose alpha
        is dropped as upstream's `convert('RGB')` does). Boxes are in pixels of these images."""
        images = _checked_arrays(images_rgb, "images_rgb", _check_rgb_image)
        return self._run(images, lambda image: image, prompts, max_new_tokens, progress, should_cancel,
                         constrain_boxes, "rgb", box_decoding)

    def chat(self, slice_hu: np.ndarray, messages: Sequence[str], *, max_new_tokens: int = 300,
             sampling: SamplingOptions | None = None, box_decoding: str | None = None,
             image_variant: str | None = None) -> SliceResult:
        """Answer the last of the user's `messages` about one HU slice, with upstream's chat template (earlier
        answers replaced by "</s>"). Greedy unless `sampling` (upstream's demo samples; see SamplingOptions).
        box_decoding, image_variant: this call's (None: the engine's defaults)."""
        slice_hu = np.asarray(slice_hu)
        _check_hu_slice(slice_hu, "slice_hu")
        if isinstance(messages, str) or not isinstance(messages, Sequence) or not messages:
            raise EngineError("messages must be a non-empty list of the user's texts, oldest first.")
        turns = [_checked_prompt(message, f"message {index}") for index, message in enumerate(messages)]
        _check_max_new_tokens(max_new_tokens)
        variant = self.image_variant if image_variant is None else _checked_image_variant(image_variant)
        decoding = self.box_decoding if box_decoding is None else _checked_box_decoding(box_decoding)
        started = time.perf_counter()
        pixels = preprocess_image(preprocess.hu_slice_to_rgb(slice_hu, variant), self.image_size)
        generation = self.model.chat(pixels[None], turns, max_new_tokens=max_new_tokens, sampling=sampling)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return self._result(generation, 0, turns[-1], slice_hu.shape, elapsed_ms, decoding)

    # -------------------------------------------------------------------------------------------- internals

    def _run(self, images: list[np.ndarray], to_rgb: Callable[[np.ndarray], np.ndarray],
             prompts: str | Sequence[str], max_new_tokens: int, progress: ProgressCallback | None,
             should_cancel: Callable[[], bool] | None, constrain_boxes: bool, kind: str,
             box_decoding: str | None) -> list[SliceResult]:
        questions = _checked_prompts(prompts, len(images))
        _check_max_new_tokens(max_new_tokens)
        decoding = self.box_decoding if box_decoding is None else _checked_box_decoding(box_decoding)
        processor = self._constraint() if constrain_boxes else None
        results: list[SliceResult] = []
        total = len(images)
        for begin in range(0, total, self.batch_size):
            if should_cancel is not None and should_cancel():
                raise EngineCancelled(f"cancelled after {begin} of {total} slices", results)
            batch = range(begin, min(begin + self.batch_size, total))
            started = time.perf_counter()
            image_embeds = self._image_embeddings([images[i] for i in batch], to_rgb, kind)  # [B, T, H]
            embeds, mask = self.model.inference_batch(
                image_embeds, [prompt_text.inference_prompt(questions[i]) for i in batch])
            generation = self.model.decode_batch(embeds, mask, max_new_tokens, logits_processor=processor,
                                                 drafter=self._drafter)
            share_ms = (time.perf_counter() - started) * 1000.0 / len(batch)
            results += [self._result(generation, row, questions[i], images[i].shape, share_ms, decoding)
                        for row, i in enumerate(batch)]
            if progress is not None:
                progress(len(results), total)
        return results

    def _image_embeddings(self, images: list[np.ndarray], to_rgb: Callable[[np.ndarray], np.ndarray],
                          kind: str) -> torch.Tensor:
        """[B, T, H] LLM embeddings of the images; each distinct image not kept yet goes through the vision tower
        once, all of them in one call."""
        keys = [image_key(image, kind) for image in images]
        missing = {key: image for key, image in zip(keys, images) if key not in self._images}
        fresh = {}
        if missing:
            pixels = torch.stack([preprocess_image(to_rgb(image), self.image_size) for image in missing.values()])
            fresh = dict(zip(missing, self.model.encode_images(pixels)))  # key -> [T, H]
            self.images_encoded += len(missing)
            for key, embedding in fresh.items():
                self._images.put(key, embedding)
        return torch.stack([fresh[key] if key in fresh else self._images.get(key).to(self.model.device)
                            for key in keys])

    def _result(self, generation, row: int, question: str, shape: tuple[int, ...], share_ms: float,
                box_decoding: str) -> SliceResult:
        """The SliceResult of row `row` of a `GenerationResult`, for a slice of `shape` [R, C, ...]."""
        height, width = shape[0], shape[1]
        return to_slice_result(generation.texts[row], generation.token_ids[row], generation.token_logprobs[row],
                               self.model.tokenizer, width, height, box_decoding=box_decoding,
                               yes_prob=yes_probability(generation.first_logits[row], self._yes_id, self._no_id),
                               prompt_asks_yes_no=asks_yes_no(question), inference_ms=share_ms)

    def _constraint(self) -> BoxGrammarConstraint:
        if self._box_constraint is None:
            self._box_constraint = BoxGrammarConstraint(self.model.tokenizer)
        return self._box_constraint


def load_engine(*, model_dir: str | os.PathLike | None = None, upstream: Sequence[str | os.PathLike] | None = None,
                image_size: int = 448, device: str = "cpu", dtype: str | torch.dtype | None = None,
                quantization: str | None = None, batch_size: int | str = 8) -> "InferenceEngine":
    """An engine from our model folder, or from upstream's (eva_vit_g.pth, LLaMA folder, MiniGPT .pth); the one
    loader behind `predict`, `serve` and `evaluate`. `device` "auto" picks CUDA when PyTorch sees a GPU."""
    if (model_dir is None) == (upstream is None):
        raise EngineError("give exactly one model: a model folder or the three upstream files.")
    device = resolve_device(device)
    if model_dir is not None:
        return InferenceEngine.from_model_dir(model_dir, device=device, dtype=dtype, quantization=quantization,
                                              batch_size=batch_size)
    from backend.checkpoints import load_upstream

    vit, llama, checkpoint = (Path(path) for path in upstream)
    model = load_upstream(vit, llama, checkpoint, image_size=image_size, dtype=resolve_dtype(dtype, device),
                          device=device, quantization=quantization)
    return InferenceEngine(model, batch_size=batch_size, model_id=checkpoint.stem)


def resolve_device(device: str) -> str:
    """A torch device name: "auto" = "cuda" when PyTorch sees a GPU, else "cpu"; EngineError for a CUDA device
    without CUDA, or a name torch does not know."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        name = str(torch.device(device))
    except RuntimeError as error:
        raise EngineError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:N).") from error
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {device}: PyTorch sees no CUDA GPU here; use the CPU (--device cpu).")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """A dtype by name; None = automatic: float32 on the CPU, bfloat16 on a GPU that supports it, else float16."""
    if dtype is None:
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise EngineError(f"dtype must be one of {sorted(names)} or None (automatic), got {dtype!r}.")
    return names[dtype]


# ------------------------------------------------------------------------------------------- input checks

def _checked_arrays(items: Sequence[np.ndarray], name: str,
                    check: Callable[[np.ndarray, str], None]) -> list[np.ndarray]:
    """The items as numpy arrays, each checked; a bare array is refused (a volume must be split explicitly)."""
    if isinstance(items, np.ndarray) or not isinstance(items, Sequence):
        raise EngineError(f"{name} must be a list of 2D slices, got {type(items).__name__}; "
                          "for a volume [S, R, C] pass list(volume).")
    arrays = [np.asarray(item) for item in items]
    for index, array in enumerate(arrays):
        check(array, f"{name}[{index}]")
    return arrays


def _check_hu_slice(array: np.ndarray, where: str) -> None:
    if array.ndim != 2 or array.size == 0:
        raise EngineError(f"{where}: expected one 2D slice [rows, columns] of HU values, got shape {array.shape}. "
                          "Pass model-view slices one by one (volume[k]), not volumes or RGB images.")
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                       or np.issubdtype(array.dtype, np.floating)):
        raise EngineError(f"{where}: expected real HU numbers, got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise EngineError(f"{where}: {bad} NaN or infinite value(s); fill them (e.g. with -1024 HU, air) first.")


def _check_rgb_image(array: np.ndarray, where: str) -> None:
    if array.dtype != np.uint8:
        raise EngineError(f"{where}: expected an 8-bit image (uint8), got dtype {array.dtype}. For CT values in "
                          "HU use run(), which applies the model's intensity window.")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or array.size == 0:
        raise EngineError(f"{where}: expected an image [rows, columns, 3] (or [R, C] / [R, C, 4]), "
                          f"got shape {array.shape}.")


def _checked_box_decoding(box_decoding: object) -> str:
    if box_decoding not in BOX_DECODINGS:
        raise EngineError(f"box_decoding must be one of {BOX_DECODINGS}, got {box_decoding!r}.")
    return box_decoding


def _checked_image_variant(image_variant: object) -> str:
    if image_variant not in preprocess.VARIANTS:
        raise EngineError(f"image_variant must be one of {preprocess.VARIANTS}, got {image_variant!r}.")
    return image_variant


def _checked_prompt(prompt: object, where: str) -> str:
    try:
        return prompt_text.check_question(prompt, where)
    except prompt_text.PromptError as error:
        raise EngineError(str(error)) from error


def _checked_prompts(prompts: str | Sequence[str], count: int) -> list[str]:
    """One prompt per slice: a single string is used for every slice."""
    if isinstance(prompts, str):
        return [_checked_prompt(prompts, "the prompt")] * count
    if not isinstance(prompts, Sequence):
        raise EngineError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}.")
    if len(prompts) != count:
        raise EngineError(f"{len(prompts)} prompts for {count} slices; give one prompt for all slices or exactly "
                          "one per slice.")
    return [_checked_prompt(prompt, f"prompt {index}") for index, prompt in enumerate(prompts)]


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
