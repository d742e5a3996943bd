"""The questions the module offers come from the server (`/api/v1/info`): the model that answers decides what it can
be asked, task by task (servers before API 1.2 list only example prompts). Here: the menu entries, grouped by task,
with titles and names for the boxes read from the prompt text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from SlicerMiniGPTPancreas import protocol as p

# "[refer] give me the location of the X", "[refer] where is the X ?", "[refer] X", ... -> X
_REFER_PHRASE = re.compile(
    r"^\s*\[refer\]\s*(?:give me the (?:location|position) of the|from this image, tell me the location of the|"
    r"could you tell me the location for the|where can i locate the|where is the)?\s*(?P<phrase>.*?)\s*\??\s*$",
    re.IGNORECASE,
)
# "[vqa] Based on the image, respond to this question with a short answer: does ... ?" -> "does ... ?"
_VQA_QUESTION = re.compile(r"^\s*\[vqa\]\s*(?:.*:\s*)?(?P<question>[^:]+?)\s*$", re.IGNORECASE)
_YES_NO_START = ("is ", "are ", "does ", "do ", "can ", "has ", "have ")


@dataclass(frozen=True)
class PromptPreset:
    """One entry of the question menu: the title shown, the exact prompt sent, the name given to its boxes."""

    title: str
    prompt: str
    box_label: str  # ROI names read "<box_label> s<slice> (<confidence>)"
    task: str = ""  # the title of the model's task it belongs to ("" from a server that lists no tasks)


def presets_from_info(info: p.ModelInfo) -> tuple[PromptPreset, ...]:
    """The prompts of the server's tasks as menu entries, task after task in the server's order; from a server
    without a task list, its example prompts."""
    prompts_and_tasks = ([(prompt, task.title) for task in info.tasks for prompt in task.prompts] if info.tasks
                         else [(prompt, "") for prompt in info.example_prompts])
    return tuple(PromptPreset(preset_title(prompt), prompt, box_label_for_prompt(prompt), task)
                 for prompt, task in prompts_and_tasks)


def menu_entries(presets: tuple[PromptPreset, ...]) -> list[PromptPreset | None]:
    """The presets with None (a separator) between two tasks."""
    entries: list[PromptPreset | None] = []
    for index, preset in enumerate(presets):
        if index and preset.task != presets[index - 1].task:
            entries.append(None)
        entries.append(preset)
    return entries


def preset_title(prompt: str) -> str:
    """'Pancreas: where is it? (box)', 'Does the pancreas contain a tumor? (yes/no)', else the prompt itself."""
    refer = _REFER_PHRASE.match(prompt)
    if refer and refer.group("phrase"):
        return f"{refer.group('phrase')[:1].upper()}{refer.group('phrase')[1:]}: where is it? (box)"
    vqa = _VQA_QUESTION.match(prompt)
    if vqa:
        question = vqa.group("question")
        kind = " (yes/no)" if question.lower().startswith(_YES_NO_START) else ""
        return f"{question[:1].upper()}{question[1:]}{kind}"
    return prompt


def box_label_for_prompt(prompt: str) -> str:
    """The name for boxes answering `prompt`: the phrase of a "[refer]" prompt, else "box"."""
    match = _REFER_PHRASE.match(prompt)
    phrase = match.group("phrase").strip() if match else ""
    return phrase[:40] if phrase else "box"
