"""Evaluate as `predict --cascade` asks: pancreas, tumour and tumour yes/no of a close-up (`backend.close_up`).

Each entry of such a question is answered in two looks: the pancreas box of the whole slice, then the entry's own
question of the window round that box. The saved `answer` is the second look's box written on the whole slice's
0-100 grid (so every protocol scores it as it scores any answer; the rounding to that grid costs what it costs a
one-look answer), beside the model's own words about the window (`window_answer`), the window and the first
look's answer. Entries whose slice is already a crop round the pancreas (`*_crops` tasks) and other organs are
asked once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backend.close_up import PANCREAS_QUESTION, asked_closer, close_ups, in_slices
from SlicerMiniGPTPancreas import grammar


def answer_looking_closer(ask: Callable, task, entries: Sequence[dict[str, Any]], images: Sequence[np.ndarray],
                          questions: Sequence[str], zoom: float) -> list[dict[str, Any]]:
    """Per entry {"answer", "result" (the answering SliceResult, boxes in slice pixels), and for close-ups
    "window", "window_answer", "first_answer"}; `ask(images, questions)` is the engine's run_rgb."""
    closer = [k for k, entry in enumerate(entries) if _looks_closer(task, entry)]
    looks: list[dict[str, Any] | None] = [None] * len(entries)
    plain = [k for k in range(len(entries)) if k not in closer]
    for k, result in zip(plain, ask([images[k] for k in plain], [questions[k] for k in plain]) if plain else []):
        looks[k] = {"answer": result.answer, "result": result}
    if closer:
        first = ask([images[k] for k in closer], PANCREAS_QUESTION)
        windows, crops = close_ups(first, [images[k] for k in closer], zoom)
        closer_looks = ask(crops, [questions[k] for k in closer])
        for k, window, first_result, result, moved in zip(closer, windows, first, closer_looks,
                                                          in_slices(windows, closer_looks)):
            looks[k] = {"answer": _on_slice(moved, entries[k]), "result": moved,
                        "window": window.as_list() if window else None,
                        "window_answer": result.answer, "first_answer": first_result.answer}
    return looks


def _looks_closer(task, entry: dict[str, Any]) -> bool:
    return not task.name.removesuffix("@training_prompt").endswith("_crops") and asked_closer(entry.get("phrase"))


def _on_slice(result, entry: dict[str, Any]) -> str:
    """The answer as a box on the whole slice's grid; answers without a box (absent, yes/no, invalid) as given."""
    if result.kind != "boxes" or not result.boxes:
        return result.answer
    x1, y1, x2, y2 = (int(round(v)) for v in result.boxes[0].box)
    return grammar.render_box((x1, y1, x2, y2), entry["width"], entry["height"])
