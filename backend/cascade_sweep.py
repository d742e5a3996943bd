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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backend import prompts

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

    @property
    def tumour_said(self) -> bool:
        return bool(self.tumour_yes_no.yes)


def sweep_cascade(engine, slices_hu: Sequence[np.ndarray], *, max_new_tokens: int = 20,
                  progress: Callable[[int, int], None] | None = None) -> list[CascadeAnswers]:
    """Ask the cascade's questions of every model-view HU slice; `progress(done, total)` counts answers."""
    slices = list(slices_hu)
    total = 2 * len(slices)

    def step(offset: int) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, _: progress(offset + done, total))

    pancreas = engine.run(slices, PANCREAS_QUESTION, max_new_tokens=max_new_tokens, progress=step(0))
    yes_no = engine.run(slices, TUMOUR_QUESTION, max_new_tokens=max_new_tokens, progress=step(len(slices)))
    positive = [index for index, result in enumerate(yes_no) if result.yes]
    total += len(positive)
    tumours = engine.run([slices[i] for i in positive], TUMOUR_BOX_QUESTION, max_new_tokens=max_new_tokens,
                         progress=step(2 * len(slices))) if positive else []
    tumour_of = dict(zip(positive, tumours))
    return [CascadeAnswers(p, q, tumour_of.get(index)) for index, (p, q) in enumerate(zip(pancreas, yes_no))]
