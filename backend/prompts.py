"""Every prompt string of upstream MiniGPT-v2 / MiniGPT-Pancreas, in one place (docs/upstream.md sections 1.4-1.5,
4.6, 6.1, 6.3 and 7).

The markup ("[INST]", "<Img>", "[refer]", box strings) is plain text for the tokenizer; only "<s>" and "</s>" are
special tokens, and "<ImageHere>" is cut out before tokenization and replaced by the 256 image embeddings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from SlicerMiniGPTPancreas.errors import UserError

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_BLOCK = "<Img><ImageHere></Img>"
PROMPT_TEMPLATE = "[INST] {} [/INST]"  # MiniGPT-v2 `prompt_template`, applied in training (`chat_template: True`)
END_SYMBOL = "</s>"  # `end_sym` of every finetune config: appended to training answers
# `CONV_VISION_minigptv2`: roles ("<s>[INST] ", " [/INST]"), system "" and separator "".
USER_ROLE = "<s>[INST] "
ASSISTANT_ROLE = " [/INST]"

# Detection datasets (MSD pancreas / tumour, NIH, ABD, TD_MSD): one of these, uniformly, formatted with the phrase.
REFER_TEMPLATES: tuple[str, ...] = (
    "[refer] give me the location of the {}",
    "[refer] {}",
    "[refer] give me the position of the {}",
    "[refer] where is the {} ?",
    "[refer] from this image, tell me the location of the {}",
    "[refer] could you tell me the location for the {}?",
    "[refer] where can I locate the {}?",
)
# Phrases of the detection tasks (after `caption_text`); ABD uses the organ names.
PANCREAS_PHRASE = "pancreas"
TUMOR_PHRASE = "pancreatic tumor"
ABD_ORGANS: tuple[str, ...] = ("liver", "kidney", "spleen", "pancreas")

# Tumour classification (TC) training: an instruction template formatted with a question, both chosen uniformly.
TC_INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "[vqa] Based on the image, respond to this question with yes or no: {}",
    "[vqa] Based on the image, answer to the following question with yes or no: {}",
)
TC_QUESTIONS: tuple[str, ...] = (
    "Does the pancreas in the image present a tumor?",
    "Is there a tumor in the pancreas shown in the image?",
    "Can you see a tumor in the pancreas in this picture?",
    "Does the image show a tumor in the pancreas?",
    "Is a pancreatic tumor visible in the image?",
    "Is the pancreas in this image showing signs of a tumor?",
    "Is the pancreas in the image affected by a tumor?",
    "Does the pancreas in the picture have a tumor?",
)

# Evaluation (E3 drivers): the fixed refer prompt and the fixed TC prompt (not one of the TC training prompts).
REFER_EVAL_TEMPLATE = "[refer] give me the location of the {}"
TC_EVAL_PROMPT = (
    "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"
)

# The questions a model trained for a closer look (backend.close_up) is asked of a close-up round its pancreas box:
# the pancreas and tumour refer prompts of the evaluation, and every tumour yes/no prompt.
CLOSE_UP_QUESTIONS: frozenset[str] = frozenset((
    REFER_EVAL_TEMPLATE.format(PANCREAS_PHRASE), REFER_EVAL_TEMPLATE.format(TUMOR_PHRASE), TC_EVAL_PROMPT,
    *(template.format(question) for template in TC_INSTRUCTION_TEMPLATES for question in TC_QUESTIONS)))

# `blip_caption` text processor (LAVIS `BlipCaptionProcessor.pre_caption`, max_words 50).
_CAPTION_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_CAPTION_SPACES = re.compile(r"\s{2,}")
CAPTION_MAX_WORDS = 50


class PromptError(UserError, ValueError):
    """A prompt or question cannot be rendered the upstream way."""


def check_question(question: object, where: str | None = None) -> str:
    """The one content rule for what is asked of the model: non-blank text without the image marker (the template
    places the image itself). The protocol checks only a prompt's wire form (a string within MAX_PROMPT_CHARS); the
    engine applies this rule to every question, and `predict` and the service's sweep route apply it early, before
    minutes of work. Returns the question; PromptError otherwise, naming `where` (the field or option holding it)."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError(f"{where or 'the question'} is empty or not text ({question!r}); ask a question, e.g. "
                          f"{refer_eval_instruction(PANCREAS_PHRASE)!r}.")
    if IMAGE_PLACEHOLDER in question:
        raise PromptError(f"{where + ': ' if where else ''}the question must not contain {IMAGE_PLACEHOLDER!r}: that "
                          "marker is where the image goes. Remove it from the question.")
    return question


def inference_prompt(question: str) -> str:
    """Single-turn evaluation prompt: "<s>[INST] <Img><ImageHere></Img> {question} [/INST]"."""
    return chat_prompt([question])


def chat_prompt(turns: Sequence[str]) -> str:
    """Render a chat as upstream `Conversation.get_prompt()` (SINGLE style, roles "<s>[INST] " / " [/INST]").

    `turns` are the user's messages, oldest first; the last one awaits its answer. The image block goes into the
    first message ("<Img><ImageHere></Img>" + " " + text, as `Chat.ask` merges it), and every earlier answer is
    replaced by "</s>" as the demo does, so the model never sees its own previous answers:
    ["q1", "q2"] -> "<s>[INST] <Img><ImageHere></Img> q1 [/INST]</s><s>[INST] q2 [/INST]".
    """
    if not turns:
        raise PromptError("a chat needs at least one user message")
    for question in turns:
        check_question(question)
    messages = [f"{IMAGE_BLOCK} {turns[0]}", *turns[1:]]
    prompt = ""
    for index, message in enumerate(messages):
        answer = END_SYMBOL if index < len(messages) - 1 else ""
        prompt += USER_ROLE + message + ASSISTANT_ROLE + answer
    return prompt


def split_on_image(prompt: str) -> tuple[str, str]:
    """(text before, text after) the single "<ImageHere>" marker, where the image embeddings go."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise PromptError(
            f"a prompt must contain {IMAGE_PLACEHOLDER!r} exactly once (found {count} times) in {prompt!r}; "
            "build it with inference_prompt / chat_prompt / training_instruction."
        )
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return before, after


def training_instruction(instruction: str) -> str:
    """Training prompt: "[INST] <Img><ImageHere></Img> {instruction}  [/INST]" (two spaces before "[/INST]").

    The dataset writes "<Img><ImageHere></Img> {instruction} " (trailing space), then `PROMPT_TEMPLATE` adds
    its own space. The BOS is not part of the text: training prepends it as an embedding.
    """
    check_question(instruction)
    return PROMPT_TEMPLATE.format(f"{IMAGE_BLOCK} {instruction} ")


def training_answer(answer: str) -> str:
    """Training target text: the answer followed by "</s>" (tokenized as the EOS id)."""
    return answer + END_SYMBOL


def postprocess_answer(text: str) -> str:
    """Upstream's clean-up of decoded output: up to the first "</s>", no "<s>", after the last "[/INST]", stripped."""
    return text.split(END_SYMBOL)[0].replace("<s>", "").split("[/INST]")[-1].strip()


def caption_text(text: str) -> str:
    """The `blip_caption` processor: lowercase, punctuation .!"()*#:;~ -> space, collapse runs of whitespace,
    strip, keep the first 50 words. Upstream applies it to refer phrases and to the TC answers."""
    caption = _CAPTION_PUNCTUATION.sub(" ", text.lower())
    caption = _CAPTION_SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > CAPTION_MAX_WORDS:
        caption = " ".join(words[:CAPTION_MAX_WORDS])
    return caption


def refer_eval_instruction(phrase: str) -> str:
    """The E3 evaluation instruction for a phrase, e.g. "[refer] give me the location of the pancreas"."""
    return REFER_EVAL_TEMPLATE.format(phrase)


def sample_refer_instruction(rng: random.Random, phrase: str) -> str:
    """A training refer instruction: a uniform choice from `REFER_TEMPLATES`, formatted with `caption_text(phrase)`."""
    return rng.choice(REFER_TEMPLATES).format(caption_text(phrase))


def sample_tc_instruction(rng: random.Random) -> str:
    """A training TC instruction: a uniform instruction template formatted with a uniform question."""
    template = rng.choice(TC_INSTRUCTION_TEMPLATES)
    return template.format(rng.choice(TC_QUESTIONS))
