"""Engine results -> protocol messages (QueryResponse, ChatResponse)."""

from __future__ import annotations

from typing import Any

from SlicerMiniGPTPancreas import protocol as p


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
