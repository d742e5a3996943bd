"""The inference engine on a tiny MiniGPT-v2 of the real code (random weights, original file formats): batching
does not change answers, boxes land in pixels of the slice that was sent, yes/no probabilities and box
confidences equal what the model's own logits say, progress and cancel behave, bad input is refused up front."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from backend.answers import (
    BoxGrammarConstraint, asks_yes_no, complete_box, to_slice_result, viable_box_prefix, yes_no_token_ids,
)
from backend.checkpoint_io import CheckpointError
from backend.checkpoints import load_upstream
from backend.engine import EngineCancelled, EngineError, InferenceEngine
from backend.image import preprocess_image
from backend.model_dir import save_model_dir
from SlicerMiniGPTPancreas import grammar, preprocess
from tiny_upstream_models import build_tiny_upstream

REFER = "[refer] give me the location of the pancreas"
TUMOUR_YES_NO = "[vqa] Based on the image, respond to this question with yes or no: Is a pancreatic tumor visible?"
PROMPTS = [REFER, "[vqa] is there a tumor?", "[refer] pancreas", TUMOUR_YES_NO, "[refer] where is the liver ?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def model(files):
    return load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                         image_size=files.sizes.image_size)


@pytest.fixture(scope="module")
def slices():
    """Five HU slices of two sizes (384 x 512 and 200 x 300), int16 like CT."""
    rng = np.random.default_rng(7)
    shapes = [(384, 512), (200, 300), (384, 512), (200, 300), (384, 512)]
    return [rng.normal(40, 120, shape).clip(-1024, 2000).astype(np.int16) for shape in shapes]


def model_input(slices_hu, image_size):
    """[B, 3, S, S] model input built the documented way, independently of the engine."""
    return torch.stack([preprocess_image(preprocess.hu_slice_to_rgb(s), image_size) for s in slices_hu])


def pieces_of(tokenizer, ids):
    return [tokenizer.id_to_piece(i) for i in ids]


# ------------------------------------------------------------------------------------------------ batching

def assert_same_results(expected, actual):
    assert [r.answer for r in actual] == [r.answer for r in expected]
    assert [r.kind for r in actual] == [r.kind for r in expected]
    for one, other in zip(expected, actual):
        assert len(one.boxes) == len(other.boxes)
        for box, same in zip(one.boxes, other.boxes):
            assert same.box == box.box and same.label == box.label
            assert same.confidence == pytest.approx(box.confidence, rel=1e-4)
        if one.yes_probability is None:
            assert other.yes_probability is None
        else:
            assert other.yes_probability == pytest.approx(one.yes_probability, abs=1e-5)


@pytest.mark.parametrize("constrain_boxes", [False, True])
def test_batch_size_does_not_change_answers(model, slices, constrain_boxes):
    runs = [InferenceEngine(model, batch_size=size).run(slices, PROMPTS, max_new_tokens=20,
                                                        constrain_boxes=constrain_boxes) for size in (1, 3, 8)]
    assert_same_results(runs[0], runs[1])
    assert_same_results(runs[0], runs[2])
    if constrain_boxes:  # every answer is one box, mapped onto its own slice
        assert all(r.kind == "boxes" and (len(r.boxes) == 1 or r.absent) for r in runs[0])
    assert all(r.inference_ms > 0 for r in runs[0])


# ------------------------------------------------------------------------------------------- box pixels

def test_rendered_truth_box_decodes_in_pixels_of_a_512_by_384_slice(model):
    tokenizer = model.tokenizer
    truth = (100, 50, 300, 200)  # x_min, y_min, x_max, y_max on a 512 wide, 384 high slice
    answer = grammar.render_box(truth, 512, 384)
    assert answer == "{<19><13><58><52>}"  # int(100/512*100), int(50/384*100), int(300/512*100), int(200/384*100)
    ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    result = to_slice_result(answer, ids, [-0.5] * len(ids), tokenizer, 512, 384)
    assert result.kind == "boxes" and not result.absent and len(result.boxes) == 1
    assert result.boxes[0].box == grammar.grid_to_pixels((19, 13, 58, 52), 512, 384)
    # centre of each cell, by hand: x 19 -> pixels 98..102, y 13 -> 50..53, x 58 -> 297..302, y 52 -> 200..203
    assert result.boxes[0].box == (100.0, 51.5, 299.5, 201.5)
    floor = to_slice_result(answer, ids, [-0.5] * len(ids), tokenizer, 512, 384, box_decoding="floor")
    assert floor.boxes[0].box == pytest.approx((19 * 5.12, 13 * 3.84, 58 * 5.12, 52 * 3.84))


def test_engine_maps_boxes_with_the_size_of_each_sent_slice(model):
    rng = np.random.default_rng(3)
    sent = [rng.normal(0, 100, (384, 512)), rng.normal(0, 100, (60, 100))]
    results = InferenceEngine(model, batch_size=2).run(sent, REFER, constrain_boxes=True)
    for slice_hu, result in zip(sent, results):
        parsed = grammar.parse_answer(result.answer)
        height, width = slice_hu.shape
        assert [b.box for b in result.boxes] == [grammar.grid_to_pixels(g, width, height) for g in parsed.grid_boxes]
        assert all(0 <= v <= max(width, height) for b in result.boxes for v in b.box)


def test_absent_answer_has_no_boxes(model):
    tokenizer = model.tokenizer
    ids = tokenizer.encode(grammar.ABSENT_ANSWER) + [tokenizer.eos_id]
    result = to_slice_result(grammar.ABSENT_ANSWER, ids, [-0.1] * len(ids), tokenizer, 512, 512)
    assert (result.kind, result.absent, result.boxes, result.yes_probability) == ("boxes", True, (), None)


# -------------------------------------------------------------------------------------- yes/no probability

def test_yes_probability_is_the_softmax_of_the_yes_and_no_logits(model, slices):
    questions = [TUMOUR_YES_NO, "[vqa] is there a tumor?", REFER]
    results = InferenceEngine(model, batch_size=2).run(slices[:3], questions)
    logits = model.first_token_logits(model_input(slices[:3], model.config.vision.image_size), questions)  # [3, V]
    yes_ids, no_ids = yes_no_token_ids(model.tokenizer)  # every single-token spelling of each word
    assert pieces_of(model.tokenizer, model.tokenizer.encode("yes")[:1]) == ["▁yes"]  # one piece, as in LLaMA-2
    for row in range(2):
        yes, no = (math.log(sum(math.exp(logits[row, i]) for i in ids)) for ids in (yes_ids, no_ids))
        expected = math.exp(yes) / (math.exp(yes) + math.exp(no))
        assert results[row].yes_probability == pytest.approx(expected, abs=1e-5)
        assert 0 < results[row].yes_probability < 1
    assert results[2].yes_probability is None  # a refer prompt is no yes/no question
    assert results[2].kind != "yes_no"


def test_yes_no_questions_are_recognised():
    assert asks_yes_no(TUMOUR_YES_NO) and asks_yes_no("[vqa] Does the image show a tumor in the pancreas?")
    assert asks_yes_no("[vqa] Based on the image, respond to this question with a short answer: does the pancreas "
                       "contain a tumor?")  # the fixed tumour-classification evaluation prompt
    assert not asks_yes_no(REFER) and not asks_yes_no("[vqa] what organ is this?")
    assert not asks_yes_no("[refer] island")  # "is" only as a whole first word


# ------------------------------------------------------------------------------------------ confidence

def test_box_confidence_is_the_geometric_mean_of_the_generated_number_tokens(model, slices):
    engine = InferenceEngine(model, batch_size=2)
    results = engine.run(slices[:2], REFER, constrain_boxes=True)
    generation = model.generate(model_input(slices[:2], model.config.vision.image_size), [REFER, REFER],
                                logits_processor=BoxGrammarConstraint(model.tokenizer))
    for row, result in enumerate(results):
        ids, logprobs = generation.token_ids[row], generation.token_logprobs[row]
        assert ids[-1] == model.tokenizer.eos_id  # the answer is exactly one box, then EOS
        pieces = pieces_of(model.tokenizer, ids[:-1])
        numbers = [lp for lp, piece in zip(logprobs, pieces) if piece.strip("▁").isdigit()]
        assert len(numbers) >= 4  # split digits: one piece per digit, not the braces or brackets
        expected = math.exp(sum(numbers) / len(numbers))
        assert result.boxes[0].confidence == pytest.approx(expected, rel=1e-5)
        assert 0 < result.boxes[0].confidence <= 1


def test_each_labelled_box_is_scored_by_its_own_tokens(model):
    tokenizer = model.tokenizer
    answer = "<p>pancreas</p> {<12><34><56><78>}<delim>{<1><2><3><4>}"
    ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    logprobs = [-0.05 * (index + 1) for index in range(len(ids))]
    # Character spans from the pieces themselves ("▁" is a space; the first piece's leading space is dropped).
    texts = [piece.replace("▁", " ") for piece in pieces_of(tokenizer, ids[:-1])]
    texts[0] = texts[0][1:]
    assert "".join(texts) == answer
    ends = np.cumsum([len(text) for text in texts])
    starts = ends - [len(text) for text in texts]
    expected = []
    for box_text in ("{<12><34><56><78>}", "{<1><2><3><4>}"):
        begin = answer.index(box_text)
        digits = [(begin + m.start(), begin + m.end()) for m in re.finditer(r"\d+", box_text)]
        chosen = [lp for lp, s, e in zip(logprobs, starts, ends) if any(s < b and e > a for a, b in digits)]
        expected.append(math.exp(sum(chosen) / len(chosen)))
    result = to_slice_result(answer, ids, logprobs, tokenizer, 200, 100)
    assert [b.label for b in result.boxes] == ["pancreas", "pancreas"]
    assert [b.confidence for b in result.boxes] == pytest.approx(expected, rel=1e-12)
    assert expected[0] != pytest.approx(expected[1])  # the two boxes really use different tokens
    assert result.boxes[1].box == grammar.grid_to_pixels((1, 2, 3, 4), 200, 100)


def test_box_grammar_constraint_allows_only_boxes_that_parse():
    assert viable_box_prefix("") and viable_box_prefix(" {<12><3") and viable_box_prefix("{<100><0><100")
    assert not viable_box_prefix("{<101") and not viable_box_prefix("{<05>") and not viable_box_prefix("  {")
    assert not viable_box_prefix("{<50><0><4")  # x2 >= 50 cannot start with 4 (40..49 are too small)
    assert viable_box_prefix("{<50><0><1")  # ... but 100 starts with 1
    assert complete_box(" {<0><0><0><0>}") and not complete_box("{<1><2><3><4>") and not complete_box("{<2><0><1><4>}")


# ----------------------------------------------------------------------------------- progress and cancel

def test_progress_is_reported_after_each_batch(model, slices):
    calls = []
    InferenceEngine(model, batch_size=2).run(slices, REFER, max_new_tokens=3,
                                             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_cancel_between_batches_runs_no_further_batch(model, slices):
    calls, checks = [], []

    def cancel_after_first_batch():
        checks.append(len(calls))
        return len(calls) >= 1

    engine = InferenceEngine(model, batch_size=2)
    with pytest.raises(EngineCancelled, match="after 2 of 5") as cancelled:
        engine.run(slices, REFER, max_new_tokens=3, progress=lambda *args: calls.append(args),
                   should_cancel=cancel_after_first_batch)
    assert calls == [(2, 5)] and checks == [0, 1]
    assert len(cancelled.value.completed) == 2
    with pytest.raises(EngineCancelled) as at_once:
        engine.run(slices, REFER, progress=lambda *args: calls.append(args), should_cancel=lambda: True)
    assert at_once.value.completed == [] and calls == [(2, 5)]


# -------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("slices_hu, prompts, message", [
    ([np.zeros((2, 64, 64))], REFER, r"slices_hu\[0\]: expected one 2D slice .* shape \(2, 64, 64\)"),
    (np.zeros((2, 64, 64)), REFER, "list of 2D slices.*list\\(volume\\)"),
    ([np.zeros((8, 8)), np.full((8, 8), np.nan)], REFER, r"slices_hu\[1\]: 64 NaN or infinite"),
    ([np.zeros((8, 8), dtype=bool)], REFER, "real HU numbers"),
    ([np.zeros((8, 8))], "   ", "the prompt is empty"),
    ([np.zeros((8, 8))] * 2, [REFER, ""], "prompt 1 is empty"),
    ([np.zeros((8, 8))] * 3, [REFER, REFER], "2 prompts for 3 slices"),
    ([np.zeros((8, 8))], "[refer] <ImageHere>", "must not contain '<ImageHere>'"),
])
def test_bad_input_is_refused_before_any_batch(model, slices_hu, prompts, message):
    calls = []
    with pytest.raises(EngineError, match=message):
        InferenceEngine(model).run(slices_hu, prompts, progress=lambda *args: calls.append(args))
    assert calls == []


def test_bad_settings_are_refused(model, slices):
    for settings, message in [(dict(batch_size=0), "batch_size must be"), (dict(batch_size=True), "batch_size"),
                              (dict(box_decoding="round"), "box_decoding"), (dict(image_variant="hist"), "variant")]:
        with pytest.raises(EngineError, match=message):
            InferenceEngine(model, **settings)
    engine = InferenceEngine(model)
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.run(slices[:1], REFER, max_new_tokens=0)
    with pytest.raises(EngineError, match="uint8"):
        engine.run_rgb([np.zeros((8, 8, 3), dtype=np.float32)], REFER)
    with pytest.raises(EngineError, match="messages must be"):
        engine.chat(slices[0], [])
    with pytest.raises(EngineError, match="expected one 2D slice"):
        engine.chat(np.zeros((8, 8, 3)), [REFER])


# ---------------------------------------------------------------------------------- other entry points

def test_rgb_images_and_one_turn_chat_answer_like_run(model, slices):
    engine = InferenceEngine(model, batch_size=4)
    from_hu = engine.run(slices[:2], [REFER, TUMOUR_YES_NO])
    from_rgb = engine.run_rgb([preprocess.hu_slice_to_rgb(s) for s in slices[:2]], [REFER, TUMOUR_YES_NO])
    assert_same_results(from_hu, from_rgb)
    chat = engine.chat(slices[1], [TUMOUR_YES_NO], max_new_tokens=20)
    assert_same_results(from_hu[1:], [chat])


def test_engine_from_model_dir_round_trip(model, slices, tmp_path):
    folder = save_model_dir(model, tmp_path / "pancreas-tiny")
    loaded = InferenceEngine.from_model_dir(folder, batch_size=2)
    assert (loaded.model_id, loaded.device, loaded.precision, loaded.image_size) == (
        "pancreas-tiny", "cpu", "float32", model.config.vision.image_size)
    direct = InferenceEngine(model, batch_size=2)
    assert_same_results(direct.run(slices, PROMPTS, constrain_boxes=True),
                        loaded.run(slices, PROMPTS, constrain_boxes=True))
    with pytest.raises(EngineError, match="dtype must be one of"):
        InferenceEngine.from_model_dir(folder, dtype="float8")
    with pytest.raises(CheckpointError, match="not a model folder"):
        InferenceEngine.from_model_dir(tmp_path)
