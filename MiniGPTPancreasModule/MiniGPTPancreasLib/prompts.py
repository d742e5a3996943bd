"""The questions the module offers come from the server (`/api/v1/info`, `example_prompts`): the model that
answers decides what it can be asked. Here: titles for the menu and names for the boxes, read from the prompt text.
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


def presets_from_info(info: p.ModelInfo) -> tuple[PromptPreset, ...]:
    """The server's example prompts as menu entries, in the server's order."""
    return tuple(PromptPreset(preset_title(prompt), prompt, box_label_for_prompt(prompt))
                 for prompt in info.example_prompts)


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
