"""Fewer model calls, same answers: the engine (vision tower once per slice, jump-forward box decoding, one
left-padded batch of mixed questions) answers exactly as upstream's plain loop (one slice, one question, one greedy
`generate`), on a tiny random model of the real code and on the bundled demo model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from backend.answers import BoxGrammarConstraint
from backend.cascade_sweep import PANCREAS_QUESTION, TUMOUR_BOX_QUESTION, TUMOUR_QUESTION, sweep_cascade
from backend.decoding import BoxDrafter
from backend.demo_model import DEMO_MODEL_DIR
from backend.engine import InferenceEngine
from backend.image import preprocess_image
from backend.model_dir import load_model
from SlicerMiniGPTPancreas import phantom, preprocess
from tiny_upstream_models import load_tiny_upstream

VQA = "[vqa] what organ is this?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def ct_slices():
    """Six model-view slices of a synthetic CT around its pancreas (the demo model answers these sensibly)."""
    ct = phantom.make_phantom(11, tumour=True)
    rows = np.nonzero((ct.labels > 0).any(axis=(1, 2)))[0]
    return [ct.hu[k] for k in np.linspace(rows.min(), rows.max(), 6).round().astype(int)]


def plain_answer(model, slice_hu, question, **options):
    """Upstream's evaluation: one slice, one question, one greedy generate."""
    pixels = preprocess_image(preprocess.hu_slice_to_rgb(slice_hu), model.config.vision.image_size)
    return model.generate(pixels[None], [question], **options)


def count_images(model):
    """A forward pre-hook on the vision tower counting the images it encodes."""
    counted = [0]
    handle = model.visual_encoder.register_forward_pre_hook(lambda _, inputs: counted.__setitem__(
        0, counted[0] + inputs[0].shape[0]))
    return counted, handle


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_a_mixed_batch_answers_like_the_plain_loop(which, request, ct_slices):
    model = request.getfixturevalue(which)
    # several questions per slice, of different lengths (left padding), box and yes/no and free text, in one batch
    slices = [ct_slices[2], ct_slices[2], ct_slices[3], ct_slices[2], ct_slices[4], ct_slices[3]]
    questions = [PANCREAS_QUESTION, TUMOUR_QUESTION, PANCREAS_QUESTION, TUMOUR_BOX_QUESTION, VQA, TUMOUR_QUESTION]
    engine = InferenceEngine(model, batch_size=len(slices))
    results = engine.run(slices, questions)
    expected = [plain_answer(model, s, q) for s, q in zip(slices, questions)]
    assert [r.answer for r in results] == [e.texts[0] for e in expected]
    assert engine.images_encoded == 3  # three distinct slices
    if which == "demo":  # the trained model really answers: boxes for the box questions, yes/no for the others
        assert [r.kind for r in results[:3]] == ["boxes", "yes_no", "boxes"]


def test_the_vision_tower_encodes_each_slice_once_in_a_cascade_sweep(demo, ct_slices):
    engine = InferenceEngine(demo, batch_size=4)
    counted, handle = count_images(demo)
    try:
        answers = sweep_cascade(engine, ct_slices)
    finally:
        handle.remove()
    assert counted[0] == len(ct_slices) == engine.images_encoded
    asked = sum(2 + (a.tumour is not None) for a in answers)
    assert asked > len(ct_slices)  # every slice was asked at least twice
    for slice_hu, answer in zip(ct_slices, answers):
        assert answer.pancreas.answer == plain_answer(demo, slice_hu, PANCREAS_QUESTION).texts[0]
        assert answer.tumour_yes_no.answer == plain_answer(demo, slice_hu, TUMOUR_QUESTION).texts[0]


def test_an_empty_image_cache_encodes_every_question_again(demo, ct_slices):
    engine = InferenceEngine(demo, batch_size=4, image_cache_bytes=0)
    sweep_cascade(engine, ct_slices[:2])
    assert engine.images_encoded >= 4


@pytest.mark.parametrize("which", ["tiny", "demo"])
@pytest.mark.parametrize("constrained", [False, True])
def test_jump_forward_gives_the_boxes_of_step_by_step_decoding_in_fewer_calls(which, constrained, request,
                                                                             ct_slices):
    model = request.getfixturevalue(which)
    pixels = torch.stack([preprocess_image(preprocess.hu_slice_to_rgb(s), model.config.vision.image_size)
                          for s in ct_slices])
    embeds, mask = model.inference_batch(model.encode_images(pixels), [
        f"<s>[INST] <Img><ImageHere></Img> {q} [/INST]" for q in [PANCREAS_QUESTION] * 5 + [TUMOUR_BOX_QUESTION]])
    processor = BoxGrammarConstraint(model.tokenizer) if constrained else None
    step_by_step = model.decode_batch(embeds, mask, 20, logits_processor=processor)
    jumping = model.decode_batch(embeds, mask, 20, logits_processor=processor,
                                 drafter=BoxDrafter(model.tokenizer))
    assert jumping.token_ids == step_by_step.token_ids
    assert jumping.texts == step_by_step.texts
    for fast, slow in zip(jumping.token_logprobs, step_by_step.token_logprobs):
        assert fast == pytest.approx(slow, abs=1e-4)
    assert torch.allclose(jumping.first_logits, step_by_step.first_logits)
    if which == "demo" or constrained:  # real boxes were written: their fixed pieces cost no call of their own
        assert all(text.startswith("{<") and text.endswith(">}") for text in jumping.texts)
        assert jumping.model_calls < step_by_step.model_calls


def test_box_drafter_proposes_only_the_fixed_pieces(demo):
    tokenizer = demo.tokenizer
    drafter = BoxDrafter(tokenizer)

    def drafted(text):
        return [tokenizer.id_to_piece(token_id) for token_id in drafter(tokenizer.encode(text))]

    assert drafted("{<12") == drafted("{<0") == drafted("{<100") == ["><"]
    assert drafted("{<1") == drafted("{<10") == []  # 1 -> 1x / 100, 10 -> 100: the model decides
    assert drafted("{<12><34><56><7") == [] and drafted("{<12><34><56><78") == [">}", "</s>"]
    assert drafted("yes") == drafted("{<12><34><56><78>}") == []


def test_decoding_uses_cache_objects_not_deprecated_past_key_values(tiny, ct_slices):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecation of `past_key_values`
        result = plain_answer(tiny, ct_slices[0], PANCREAS_QUESTION, max_new_tokens=4)
    assert len(result.token_ids[0]) >= 1


def test_auto_batch_size_fits_the_model_in_memory(demo, tiny):
    assert InferenceEngine(demo, batch_size="auto").batch_size == 64  # a tiny model: the limit, not the memory
    assert InferenceEngine(tiny, batch_size="auto").batch_size == 64
    with pytest.raises(ValueError, match="or 'auto'"):
        InferenceEngine(demo, batch_size="many")
