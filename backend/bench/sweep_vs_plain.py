"""The engine as a cascade sweep uses it against upstream's way of answering: one slice, one question, one
`generate` call at a time.

Both answer the same model-view slices of a synthetic CT (`SlicerMiniGPTPancreas.phantom`) with the cascade's
questions (`backend.cascade_sweep`: pancreas box, tumour yes/no, tumour box where the answer was yes). The plain loop
is what upstream's evaluation does per question: preprocess the slice, encode it, decode greedily step by step
(`MiniGPTv2.generate`, batch of one, no cache shared between questions). A warm-up runs first on both paths.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backend.cascade_sweep import PANCREAS_QUESTION, TUMOUR_BOX_QUESTION, TUMOUR_QUESTION, sweep_cascade
from backend.image import preprocess_image
from SlicerMiniGPTPancreas import grammar, phantom, preprocess

Answers = tuple[str, str, str | None]  # pancreas box, tumour yes/no, tumour box (None: not asked)


@dataclass(frozen=True)
class PathTiming:
    seconds: float
    slices_per_second: float
    language_model_calls: int
    vision_encodings: int


@dataclass(frozen=True)
class SweepBench:
    slices: int
    questions: int
    engine: PathTiming
    plain_loop: PathTiming
    speedup_vs_plain_loop: float
    first_answer_seconds: float  # one slice, one question, through the engine (warm model, image not seen before)
    peak_memory_bytes: int
    peak_memory_kind: str  # "rss" (CPU) or "cuda max_memory_allocated"
    answers_equal_to_plain_loop: bool
    answers_differing: int
    differing_plain_well_formed: int  # of those, where the plain loop's answer parses (the only ones that matter)

    def to_dict(self) -> dict:
        return asdict(self)


def bench_slices(count: int, seed: int = 3) -> list[np.ndarray]:
    """`count` model-view HU slices of one synthetic CT with a pancreatic tumour (LPS storage is the model view),
    the volume's axial spacing chosen so that it has at least `count` slices, centred on the pancreas."""
    ct = phantom.make_phantom(seed, tumour=True, spacing=(1.5, 1.5, min(5.0, 200.0 / count)))
    rows = np.nonzero((ct.labels > 0).any(axis=(1, 2)))[0]
    first = int(np.clip((rows.min() + rows.max()) // 2 - count // 2, 0, ct.hu.shape[0] - count))
    return [ct.hu[k] for k in range(first, first + count)]


def run_sweep_bench(engine, slices: Sequence[np.ndarray], max_new_tokens: int = 20) -> SweepBench:
    from backend.engine import InferenceEngine

    model = engine.model
    fresh = InferenceEngine(model, batch_size=engine.batch_size, image_variant=engine.image_variant)
    sweep_cascade(fresh, slices[:1], max_new_tokens=max_new_tokens)  # warm-up: first calls allocate and dispatch
    _plain_loop(model, slices[:1], engine.image_variant, max_new_tokens)
    _reset_peak(engine.device)
    first = InferenceEngine(model, batch_size=1, image_variant=engine.image_variant)
    started = _now(engine.device)
    first.run([slices[-1]], PANCREAS_QUESTION, max_new_tokens=max_new_tokens)
    first_answer = _now(engine.device) - started

    sweeping = InferenceEngine(model, batch_size=engine.batch_size, image_variant=engine.image_variant)
    with _counted(model.llama_model) as engine_calls:
        started = _now(engine.device)
        swept = sweep_cascade(sweeping, slices, max_new_tokens=max_new_tokens)
        engine_seconds = _now(engine.device) - started
    engine_answers = [(a.pancreas.answer, a.tumour_yes_no.answer, a.tumour.answer if a.tumour else None)
                      for a in swept]
    with _counted(model.llama_model) as plain_calls, _counted(model.visual_encoder, per_image=True) as plain_encodings:
        started = _now(engine.device)
        plain_answers = _plain_loop(model, slices, engine.image_variant, max_new_tokens)
        plain_seconds = _now(engine.device) - started

    differing = [(mine, plain) for mine, plain in zip(engine_answers, plain_answers) if mine != plain]
    return SweepBench(
        slices=len(slices), questions=sum(2 + (plain[2] is not None) for plain in plain_answers),
        engine=PathTiming(engine_seconds, len(slices) / engine_seconds, engine_calls[0], sweeping.images_encoded),
        plain_loop=PathTiming(plain_seconds, len(slices) / plain_seconds, plain_calls[0], plain_encodings[0]),
        speedup_vs_plain_loop=plain_seconds / engine_seconds, first_answer_seconds=first_answer,
        peak_memory_bytes=_peak_memory(engine.device),
        peak_memory_kind="cuda max_memory_allocated" if engine.device.startswith("cuda") else "rss",
        answers_equal_to_plain_loop=not differing, answers_differing=len(differing),
        differing_plain_well_formed=sum(_well_formed(plain) for _, plain in differing))


def _plain_loop(model, slices: Sequence[np.ndarray], image_variant: str, max_new_tokens: int) -> list[Answers]:
    """Upstream's loop: for each slice and each question, one `generate` call on one image."""
    answers = []
    for slice_hu in slices:
        def ask(question: str) -> str:
            rgb = preprocess.hu_slice_to_rgb(slice_hu, image_variant)
            pixels = preprocess_image(rgb, model.config.vision.image_size)
            return model.generate(pixels[None], [question], max_new_tokens=max_new_tokens).texts[0]

        pancreas, yes_no = ask(PANCREAS_QUESTION), ask(TUMOUR_QUESTION)
        tumour = ask(TUMOUR_BOX_QUESTION) if grammar.parse_answer(yes_no).yes else None
        answers.append((pancreas, yes_no, tumour))
    return answers


def _well_formed(answers: Answers) -> bool:
    return all(grammar.parse_answer(text).kind != "invalid" for text in answers if text is not None)


@contextlib.contextmanager
def _counted(module: torch.nn.Module, per_image: bool = False) -> Iterator[list[int]]:
    """Count the module's forward calls, or with `per_image` the images they take ([B, 3, S, S] first argument)."""
    count = [0]

    def hook(_module, inputs) -> None:
        count[0] += inputs[0].shape[0] if per_image else 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
