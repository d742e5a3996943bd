"""Upstream prompt strings, chat rendering, answer post-processing and the blip_caption text processor.

Expected literals are copied from docs/upstream.md (sections 1.4, 1.5, 4.6, 6.1, 6.3, 7, 9).
"""

from __future__ import annotations

import random

import pytest

from backend import prompts
from backend.prompts import PromptError


def test_inference_prompt_matches_the_spec():
    assert prompts.inference_prompt("[refer] give me the location of the pancreas") == (
        "<s>[INST] <Img><ImageHere></Img> [refer] give me the location of the pancreas [/INST]"
    )


def test_training_instruction_has_two_spaces_before_inst_close():
    assert prompts.training_instruction("[refer] where is the liver ?") == (
        "[INST] <Img><ImageHere></Img> [refer] where is the liver ?  [/INST]"
    )
    assert prompts.training_answer("{<12><34><56><78>}") == "{<12><34><56><78>}</s>"


def test_chat_with_one_turn_is_the_inference_prompt():
    assert prompts.chat_prompt(["q1"]) == "<s>[INST] <Img><ImageHere></Img> q1 [/INST]"


def test_chat_with_two_and_three_turns_hides_previous_answers():
    assert prompts.chat_prompt(["q1", "q2"]) == "<s>[INST] <Img><ImageHere></Img> q1 [/INST]</s><s>[INST] q2 [/INST]"
    assert prompts.chat_prompt(["q1", "q2", "q3"]) == (
        "<s>[INST] <Img><ImageHere></Img> q1 [/INST]</s><s>[INST] q2 [/INST]</s><s>[INST] q3 [/INST]"
    )


def test_chat_and_prompts_refuse_bad_questions():
    with pytest.raises(PromptError, match="at least one"):
        prompts.chat_prompt([])
    with pytest.raises(PromptError, match="<ImageHere>"):
        prompts.inference_prompt("look at <ImageHere>")
    with pytest.raises(PromptError, match="<ImageHere>"):
        prompts.chat_prompt(["q1", "and <ImageHere> again"])


def test_split_on_image():
    assert prompts.split_on_image(prompts.inference_prompt("q")) == ("<s>[INST] <Img>", "</Img> q [/INST]")
    assert prompts.split_on_image(prompts.training_instruction("q")) == ("[INST] <Img>", "</Img> q  [/INST]")
    with pytest.raises(PromptError, match="found 0 times"):
        prompts.split_on_image("[INST] no image [/INST]")
    with pytest.raises(PromptError, match="found 2 times"):
        prompts.split_on_image("<ImageHere> and <ImageHere>")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{<12><34><56><78>}</s>{<1><2><3><4>}", "{<12><34><56><78>}"),
        ("<s>[INST] <Img></Img> where? [/INST] {<1><2><3><4>}", "{<1><2><3><4>}"),
        ("  yes  </s>", "yes"),
        ("a [/INST] b [/INST]  no ", "no"),
        ("<s><s>", ""),
        ("", ""),
    ],
)
def test_postprocess_answer(raw, expected):
    assert prompts.postprocess_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Pancreas", "pancreas"),
        ("Pancreatic Tumor.", "pancreatic tumor"),
        ("Yes", "yes"),
        ('"Liver" (left): big!!', "liver left big"),
        ("a*b#c~d;e", "a b c d e"),
        ("a\n\n\tb", "a b"),
        ("kidney\n", "kidney"),
        ("it's a left-kidney, ok?", "it's a left-kidney, ok?"),
    ],
)
def test_caption_text(raw, expected):
    assert prompts.caption_text(raw) == expected


def test_caption_text_keeps_fifty_words():
    words = [f"w{i}" for i in range(60)]
    assert prompts.caption_text(" ".join(words)) == " ".join(words[:50])


def test_refer_pool_matches_the_spec():
    assert prompts.REFER_TEMPLATES == (
        "[refer] give me the location of the {}",
        "[refer] {}",
        "[refer] give me the position of the {}",
        "[refer] where is the {} ?",
        "[refer] from this image, tell me the location of the {}",
        "[refer] could you tell me the location for the {}?",
        "[refer] where can I locate the {}?",
    )
    assert prompts.refer_eval_instruction("pancreatic tumor") == "[refer] give me the location of the pancreatic tumor"
    assert (prompts.PANCREAS_PHRASE, prompts.TUMOR_PHRASE) == ("pancreas", "pancreatic tumor")
    assert prompts.ABD_ORGANS == ("liver", "kidney", "spleen", "pancreas")


def test_tc_pools_and_eval_prompt_match_the_spec():
    assert prompts.TC_INSTRUCTION_TEMPLATES == (
        "[vqa] Based on the image, respond to this question with yes or no: {}",
        "[vqa] Based on the image, answer to the following question with yes or no: {}",
    )
    assert prompts.TC_QUESTIONS == (
        "Does the pancreas in the image present a tumor?",
        "Is there a tumor in the pancreas shown in the image?",
        "Can you see a tumor in the pancreas in this picture?",
        "Does the image show a tumor in the pancreas?",
        "Is a pancreatic tumor visible in the image?",
        "Is the pancreas in this image showing signs of a tumor?",
        "Is the pancreas in the image affected by a tumor?",
        "Does the pancreas in the picture have a tumor?",
    )
    assert prompts.TC_EVAL_PROMPT == (
        "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"
    )


def test_sampled_instructions_cover_the_pools():
    rng = random.Random(0)
    refer = {prompts.sample_refer_instruction(rng, "Pancreatic Tumor.") for _ in range(300)}
    assert refer == {template.format("pancreatic tumor") for template in prompts.REFER_TEMPLATES}
    tc = {prompts.sample_tc_instruction(rng) for _ in range(600)}
    assert tc == {t.format(q) for t in prompts.TC_INSTRUCTION_TEMPLATES for q in prompts.TC_QUESTIONS}


def test_eval_prompt_of_the_spec_checklist():
    # Section 9: the eval prompt of pancreas detection.
    assert prompts.inference_prompt(prompts.refer_eval_instruction(prompts.PANCREAS_PHRASE)) == (
        "<s>[INST] <Img><ImageHere></Img> [refer] give me the location of the pancreas [/INST]"
    )
