"""Between the protocol and the engine: a request's AnswerOptions -> an engine call, its result -> the reply.

Called on the engine thread (the calls) and by the handlers (the checks). A request's `box_decoding` and
`image_variant` go with its engine call, as its answer length does. Slice queries and sweeps decode greedily, as
upstream evaluates; chat may sample. Results become QueryResponse / ChatResponse with boxes in
pixel indices of the sent slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.close_up import answer_closer
from backend.decoding import SamplingOptions
from backend.engine import InferenceEngine
from SlicerMiniGPTPancreas import protocol as p

from .errors import ApiError

DETECTION_TAG = "[refer]"
MIN_TEMPERATURE = 0.01


def check_greedy(options: p.AnswerOptions, what: str) -> None:
    """Slice queries and sweeps have no sampling: refuse temperature > 0 instead of silently ignoring it."""
    if options.temperature > 0:
        raise ApiError(p.ErrorCode.VALIDATION,
                       f"{what} are answered greedily, as upstream evaluates them; send options.temperature 0 "
                       f"(got {options.temperature:g}). Chat can sample.")


def check_temperature(options: p.AnswerOptions) -> None:
    """Sampling divides the logits by the temperature: below MIN_TEMPERATURE they overflow and sampling fails on
    NaN. Such a temperature means "almost greedy": say to send 0."""
    if 0 < options.temperature < MIN_TEMPERATURE:
        raise ApiError(p.ErrorCode.VALIDATION,
                       f"AnswerOptions.temperature: {options.temperature:g} is too small to sample with; send 0 "
                       f"for greedy answers or at least {MIN_TEMPERATURE:g}")


class EngineCalls:
    """The service's calls of its engine. constrain_boxes: let the model write only one box "{<x1><y1><x2><y2>}"
    for detection prompts ("[refer] ..."), so an undertrained model still answers in the grammar (multi-box
    answers then become impossible)."""

    def __init__(self, constrain_boxes: bool = False) -> None:
        self.constrain_boxes = constrain_boxes

    def run(self, engine: InferenceEngine, slices_hu: Sequence[np.ndarray], prompt: str,
            options: p.AnswerOptions) -> list[Any]:
        """Greedy answers (engine SliceResults) to `prompt` on each slice. A model trained for a closer look
        (`backend.close_up`) is asked the cascade's pancreas and tumour questions of a close-up round its own
        pancreas box, as `predict --cascade` asks them."""
        def ask(slices: Sequence[np.ndarray], question: str) -> list[Any]:
            constrain = self.constrain_boxes and question.lstrip().lower().startswith(DETECTION_TAG)
            return engine.run(list(slices), question, max_new_tokens=options.max_new_tokens,
                              constrain_boxes=constrain, box_decoding=options.box_decoding,
                              image_variant=options.image_variant)

        return answer_closer(ask, slices_hu, prompt, engine.close_up_zoom)

    def chat(self, engine: InferenceEngine, request: p.ChatRequest) -> Any:
        """The engine's answer to the last user turn (upstream's chat template drops earlier answers)."""
        options = request.options
        sampling = SamplingOptions(temperature=options.temperature) if options.temperature > 0 else None
        user_turns = [message.text for message in request.messages if message.role == "user"]
        return engine.chat(request.slice_hu, user_turns, max_new_tokens=options.max_new_tokens, sampling=sampling,
                           box_decoding=options.box_decoding, image_variant=options.image_variant)


# --- engine results -> replies --------------------------------------------------------------------------------

def box_results(result: Any) -> tuple[p.BoxResult, ...]:
    """The DetectedBoxes of an engine SliceResult as protocol BoxResults (pixel indices of the sent slice)."""
    return tuple(p.BoxResult(tuple(float(v) for v in detected.box), detected.label or None,
                             _unit(detected.confidence))
                 for detected in result.boxes)


def query_response(result: Any, model_id: str, *, slice_index: int | None, queue_ms: float) -> p.QueryResponse:
    """An engine SliceResult as the answer to a slice query (or one slice of a sweep)."""
    return p.QueryResponse(
        answer=result.answer, kind=result.kind, model_id=model_id, boxes=box_results(result), yes=result.yes,
        yes_probability=None if result.yes_probability is None else _unit(result.yes_probability),
        reason=result.reason or None, slice_index=slice_index, queue_ms=max(0.0, queue_ms),
        inference_ms=max(0.0, float(result.inference_ms)))


def chat_response(result: Any, model_id: str) -> p.ChatResponse:
    return p.ChatResponse(answer=result.answer, model_id=model_id, boxes=box_results(result),
                          inference_ms=max(0.0, float(result.inference_ms)))


def _unit(value: float | None) -> float | None:
    """A probability, clipped to [0, 1] against float rounding (a softmax may give 1.0000001)."""
    return None if value is None else min(1.0, max(0.0, float(value)))
