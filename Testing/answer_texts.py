"""Model answers with several boxes or labelled groups, written as upstream's grammar does, for the parser tests.

The product writes one box per answer (`grammar.render_box`: training targets, augmentation); the parser must also
read the multi-box and grounding answers the model can give, so the tests write those here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from SlicerMiniGPTPancreas.grammar import ABSENT_ANSWER, GrammarError, render_box

DELIM = "<delim>"


def render_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> str:
    """Render several boxes joined by "<delim>"; an empty list renders the absent answer."""
    if not boxes:
        return ABSENT_ANSWER
    return DELIM.join(render_box(box, width, height) for box in boxes)


def render_phrase_boxes(boxes_by_label: Mapping[str, Sequence[Sequence[float]]], width: int, height: int) -> str:
    """Render "<p>label</p> {..}<delim>{..}" groups joined by a space (grounding/detection style).

    A label with an empty box list renders "<p>label</p> {<0><0><0><0>}" (that structure is absent); an empty
    mapping renders the plain absent answer.
    """
    if not boxes_by_label:
        return ABSENT_ANSWER
    groups = []
    for label, boxes in boxes_by_label.items():
        clean = str(label).strip()
        if not clean or any(ch in clean for ch in "<>{}"):
            raise GrammarError(f"phrase label {label!r} must be non-empty text without '<', '>', '{{' or '}}'")
        groups.append(f"<p>{clean}</p> {render_boxes(boxes, width, height)}")
    return " ".join(groups)
