"""The questions of the MiniGPT-Pancreas cascade, asked of every slice of a volume.

The paper's cascade is three models in a row; a fine-tuned model of this project answers all three questions,
so a sweep asks them in order:
  1. where is the pancreas?            (every slice; upstream's evaluation refer prompt)
  2. is there a tumour in the pancreas? (every slice; the answer comes with P(yes) from the first-token logits)
  3. where is the pancreatic tumor?     (only the slices answered "yes" in 2; upstream's refer prompt)
Question 2 uses one of upstream's tumour-classification TRAINING prompts, not its evaluation prompt ("... with a
short answer: ..."), which no training example ever showed: a model fine-tuned on the training prompts answers
them more reliably, and the bundled demo model, which has no pre-trained language model, only answers those.
`minigpt-pancreas predict --cascade` and `minigpt-pancreas demo` both use it.

With a close-up zoom (a model trained for it says so, `backend.close_up`), question 1 is asked twice: first of
the whole slice, then of a close-up round that first box, and questions 2 and 3 are asked of the same close-up
(a tumour of a few pixels at the model's input is several times larger there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backend import prompts
from backend.close_up import close_ups, in_slices

PANCREAS_QUESTION = prompts.refer_eval_instruction(prompts.PANCREAS_PHRASE)
TUMOUR_QUESTION = prompts.TC_INSTRUCTION_TEMPLATES[0].format(prompts.TC_QUESTIONS[1])
TUMOUR_BOX_QUESTION = prompts.refer_eval_instruction(prompts.TUMOR_PHRASE)
QUESTIONS = {"pancreas": PANCREAS_QUESTION, "tumour_yes_no": TUMOUR_QUESTION, "tumour": TUMOUR_BOX_QUESTION}


@dataclass(frozen=True)
class CascadeAnswers:
    """The answers about one slice (`backend.answers.SliceResult` each)."""

    pancreas: object
    tumour_yes_no: object
    tumour: object | None  # None where the yes/no answer was not "yes"
    first_look: object | None = None  # the pancreas answer about the whole slice, where a close-up followed
    window: object | None = None  # backend.close_up.Window the last answers were asked of; None: the whole slice

    @property
    def tumour_said(self) -> bool:
        return bool(self.tumour_yes_no.yes)


def sweep_cascade(engine, slices_hu: Sequence[np.ndarray], *, max_new_tokens: int = 20,
                  progress: Callable[[int, int], None] | None = None,
                  close_up_zoom: float | None = None) -> list[CascadeAnswers]:
    """Ask the cascade's questions of every model-view HU slice; `progress(done, total)` counts answers.
    close_up_zoom: ask again of a close-up this many times closer round the first pancreas box (None: once)."""
    slices = list(slices_hu)
    looks = 3 if close_up_zoom else 2
    total = looks * len(slices)

    def step(offset: int) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    first = engine.run(slices, PANCREAS_QUESTION, max_new_tokens=max_new_tokens, progress=step(0))
    windows: list = [None] * len(slices)
    if close_up_zoom:
        windows, slices = close_ups(first, slices, close_up_zoom)
    pancreas = first if not close_up_zoom else in_slices(windows, engine.run(
        slices, PANCREAS_QUESTION, max_new_tokens=max_new_tokens, progress=step(len(slices))))
    yes_no = engine.run(slices, TUMOUR_QUESTION, max_new_tokens=max_new_tokens,
                        progress=step((looks - 1) * len(slices)))
    positive = [index for index, result in enumerate(yes_no) if result.yes]
    total += len(positive)
    tumours = engine.run([slices[i] for i in positive], TUMOUR_BOX_QUESTION, max_new_tokens=max_new_tokens,
                         progress=step(looks * len(slices))) if positive else []
    tumour_of = dict(zip(positive, in_slices([windows[i] for i in positive], tumours)))
    return [CascadeAnswers(p, q, tumour_of.get(index), first[index] if close_up_zoom else None, windows[index])
            for index, (p, q) in enumerate(zip(pancreas, yes_no))]
