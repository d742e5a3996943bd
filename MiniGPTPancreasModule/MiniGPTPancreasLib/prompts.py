"""The questions the module offers, as upstream MiniGPT-Pancreas was trained and evaluated to answer them.

The strings are copies of backend/prompts.py (docs/upstream.md 4.6 and 6.3): the Slicer module must not import the
backend (torch). Testing/test_slicer_module.py checks that the copies still equal the backend's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# backend.prompts.refer_eval_instruction(phrase) == REFER_EVAL_TEMPLATE.format(phrase)
REFER_EVAL_TEMPLATE = "[refer] give me the location of the {}"
# backend.prompts.TC_EVAL_PROMPT: the fixed tumour-classification question of upstream's evaluation
TC_EVAL_PROMPT = (
    "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"
)
PANCREAS_PHRASE = "pancreas"
TUMOR_PHRASE = "pancreatic tumor"


@dataclass(frozen=True)
class PromptPreset:
    """One entry of the question menu: the title shown, the exact prompt sent, the name given to its boxes."""

    key: str
    title: str
    prompt: str
    box_label: str  # ROI names read "<box_label> s<slice> (<confidence>)"


PRESETS: tuple[PromptPreset, ...] = (
    PromptPreset("pancreas", "Pancreas: where is it? (box)", REFER_EVAL_TEMPLATE.format(PANCREAS_PHRASE), "pancreas"),
    PromptPreset("tumour_yes_no", "Pancreatic tumour: is there one? (yes/no)", TC_EVAL_PROMPT, "tumour"),
    PromptPreset("tumour", "Pancreatic tumour: where is it? (box)", REFER_EVAL_TEMPLATE.format(TUMOR_PHRASE), "tumour"),
    PromptPreset("liver", "Liver: where is it? (box; multi-organ model)", REFER_EVAL_TEMPLATE.format("liver"), "liver"),
    PromptPreset("kidney", "Kidney: where is it? (box; multi-organ model)", REFER_EVAL_TEMPLATE.format("kidney"),
                 "kidney"),
    PromptPreset("spleen", "Spleen: where is it? (box; multi-organ model)", REFER_EVAL_TEMPLATE.format("spleen"),
                 "spleen"),
)

# "[refer] give me the location of the X", "[refer] where is the X ?", "[refer] X", ... -> X
_REFER_PHRASE = re.compile(
    r"^\s*\[refer\]\s*(?:give me the (?:location|position) of the|from this image, tell me the location of the|"
    r"could you tell me the location for the|where can i locate the|where is the)?\s*(?P<phrase>.*?)\s*\??\s*$",
    re.IGNORECASE,
)


def box_label_for_prompt(prompt: str) -> str:
    """The name for boxes answering `prompt`: a preset's label, the phrase of a "[refer]" prompt, else "box"."""
    for preset in PRESETS:
        if prompt.strip() == preset.prompt:
            return preset.box_label
    match = _REFER_PHRASE.match(prompt)
    phrase = match.group("phrase").strip() if match else ""
    return phrase[:40] if phrase else "box"
