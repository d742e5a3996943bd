"""What an evaluation task set is and how its entries are asked: `TaskSet`, the prompts, and `EvaluateError`.

The rest of the evaluation builds on this module (evaluate reads and answers the task sets, evaluate_scoring,
evaluate_baseline and evaluate_figures score and draw them), so it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend import prompts
from backend.cascade_sweep import TUMOUR_QUESTION
from SlicerMiniGPTPancreas.errors import UserError

TRAINING_PROMPT_SUFFIX = "@training_prompt"  # a yes/no task asked with a training prompt


class EvaluateError(UserError, ValueError):
    """The evaluation cannot run as asked (unknown task, missing images, predictions of another run...)."""


@dataclass(frozen=True)
class TaskSet:
    """The test entries of one task (in file order, optionally the first `limit`) and how they are asked."""

    name: str
    kind: str  # "detection" (entries carry phrase + bbox) or "yes_no"
    entries: list[dict[str, Any]]

    @property
    def source(self) -> str:
        """The prepared task whose files hold the entries."""
        return self.name.removesuffix(TRAINING_PROMPT_SUFFIX)


def prompts_used() -> dict[str, str]:
    """Upstream's fixed evaluation prompts (the refer one is formatted with each entry's phrase), and the
    training prompt yes/no tasks are asked with too."""
    return {"refer": prompts.REFER_EVAL_TEMPLATE, "yes_no": prompts.TC_EVAL_PROMPT,
            "yes_no_training": TUMOUR_QUESTION}


def entry_prompt(task: TaskSet, entry: dict[str, Any]) -> str:
    """The question asked about one entry."""
    templates = prompts_used()
    if task.kind == "detection":
        return templates["refer"].format(entry["phrase"])
    return templates["yes_no_training"] if task.name != task.source else templates["yes_no"]


def with_training_prompts(tasks: list[TaskSet]) -> list[TaskSet]:
    """`tasks`, each yes/no task followed by itself asked with the training prompt (once)."""
    names = {task.name for task in tasks}
    extended = []
    for task in tasks:
        extended.append(task)
        twin = task.source + TRAINING_PROMPT_SUFFIX
        if task.kind == "yes_no" and twin not in names:
            extended.append(TaskSet(twin, task.kind, task.entries))
            names.add(twin)
    return extended


