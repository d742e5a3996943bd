"""The pieces of the demo cascade's stage 0: a base initialised from scratch in upstream's file formats, training
on generate's prompt layout, the patch-grounding and answer-value objectives, and the geometric augmentation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend import prompts
from backend.checkpoint_io import CheckpointError
from backend.checkpoints import load_upstream
from training.base_weights import ScratchSizes, write_initial_base
from SlicerMiniGPTPancreas import grammar
from training.answer_value import AnswerValueLoss
from training.augment import Augmentation, adjust_intensity, augment_example
from training.patch_grounding import PHRASES, PatchGroundingLoss, grounding_targets

SIZES = ScratchSizes(image_size=32, patch_size=8, vit_width=88, vit_depth=1, vit_mlp_hidden=128, llm_hidden=32,
                     llm_layers=1, llm_heads=2, llm_intermediate=64, lora_r=4)
QUESTION = "[refer] give me the location of the pancreas"
ANSWER = "{<10><20><60><70>}"


def scratch_model(tmp_path):
    files = write_initial_base(tmp_path, SIZES, seed=5)
    return load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                         image_size=SIZES.image_size).eval()


def test_the_initial_base_is_seeded_and_lora_starts_without_effect(tmp_path):
    first, second = write_initial_base(tmp_path / "a", SIZES, 5), write_initial_base(tmp_path / "b", SIZES, 5)
    assert first.vit_checkpoint.read_bytes() == second.vit_checkpoint.read_bytes()
    model = scratch_model(tmp_path / "c")
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)


def test_the_initial_base_writes_its_vit_head_count_beside_the_vit(tmp_path):
    files = write_initial_base(tmp_path, ScratchSizes(**{**SIZES.to_dict(), "vit_width": 264}), seed=5)
    assert json.loads(files.vit_checkpoint.with_suffix(".json").read_text()) == {"num_heads": 3}
    model = load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint, image_size=SIZES.image_size)
    assert (model.config.vision.width, model.config.vision.num_heads) == (264, 3)
    files.vit_checkpoint.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"264 wide.*vit_num_heads=N"):
        load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint, image_size=SIZES.image_size)


def test_a_row_trained_on_the_inference_layout_scores_what_generate_sees(tmp_path):
    model = scratch_model(tmp_path)
    pixels = torch.randn(1, 3, SIZES.image_size, SIZES.image_size)
    with torch.no_grad():
        loss = model.training_loss(pixels, [QUESTION], [ANSWER], inference_layout=[True])
        embeds, _ = model.inference_batch(model.encode_images(pixels), [prompts.inference_prompt(QUESTION)])
        answer = model.tokenizer.encode(prompts.training_answer(ANSWER))
        logits = model.llama_model(inputs_embeds=torch.cat([embeds[0], model.embed_ids(answer)])[None]).logits[0]
        start = embeds.shape[1] - 1
        expected = torch.nn.functional.cross_entropy(logits[start:start + len(answer)], torch.tensor(answer))
        usual = model.training_loss(pixels, [QUESTION], [ANSWER])
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.allclose(loss, usual)  # the two layouts really differ (two BOS, one space)


def test_the_box_mask_covers_the_parts_of_the_patches_inside_the_answer_box(tmp_path):
    grounding = PatchGroundingLoss(scratch_model(tmp_path))  # a 4 x 4 patch grid, each patch cut 4 x 4
    mask = grounding.box_mask("{<0><0><49><49>}").reshape(4, 4, 4, 4)  # [patch row, patch col, sub row, sub col]
    assert mask[:2, :2].all() and mask.sum() == 4 * 16
    mask = grounding.box_mask("{<30><0><49><9>}").reshape(4, 4, 4, 4)  # 16 cells a side: columns 4..7, row 0..1
    assert mask[0, 1, :2, :].all() and mask.sum() == 8
    assert grounding.box_mask("{<0><0><0><0>}").sum() == 0 and grounding.box_mask("yes") is None  # absent: empty


def test_the_grounding_loss_trains_the_vision_tower(tmp_path):
    model = scratch_model(tmp_path)
    model.requires_grad_(True)
    grounding = PatchGroundingLoss(model)
    pixels = torch.randn(2, 3, SIZES.image_size, SIZES.image_size)
    model.training_loss(pixels, [QUESTION, "[vqa] is there a tumor?"], [ANSWER, "no"])
    loss = grounding([{"pancreas": ANSWER}, {}])
    loss.backward()
    assert loss.item() > 0 and model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_slice_without_a_tumour_teaches_the_tumour_channel_that_there_is_none(tmp_path):
    """Before, only tumour boxes reached the tumour channel: it never learnt to say 'no tumour here'."""
    model = scratch_model(tmp_path)
    grounding = PatchGroundingLoss(model)
    model.encode_images(torch.randn(1, 3, SIZES.image_size, SIZES.image_size))
    grounding([{prompts.TUMOR_PHRASE: grammar.ABSENT_ANSWER}]).backward()
    per_phrase = grounding.head.weight.grad.view(len(PHRASES), grounding.outputs, -1).abs().sum(dim=2)
    tumour = PHRASES.index(prompts.TUMOR_PHRASE)
    assert per_phrase[tumour, :-4].sum() > 0  # the inside-the-box logits learn "nowhere"
    assert per_phrase[tumour, -4:].sum() == 0 and per_phrase[:tumour].sum() == 0  # no box, no other structure


def test_the_grounding_targets_are_every_box_the_slice_record_knows():
    msd = {"width": 200, "height": 100, "pixels_pancreas": 50, "bbox_pancreas": [60, 30, 99, 59], "pixels_tumor": 0,
           "bbox_tumor": [0, 0, 0, 0]}
    detection = {**msd, "phrase": "pancreas", "answer": grammar.render_box((60, 30, 99, 59), 200, 100)}
    assert grounding_targets(detection) == {"pancreas": detection["answer"],
                                            prompts.TUMOR_PHRASE: grammar.ABSENT_ANSWER}
    with_tumour = {**msd, "pixels_tumor": 4, "bbox_tumor": [70, 40, 71, 41], "answer": "yes"}  # a yes/no entry
    assert grounding_targets(with_tumour) == {"pancreas": detection["answer"],
                                              prompts.TUMOR_PHRASE: grammar.render_box((70, 40, 71, 41), 200, 100)}
    organ = {"width": 200, "height": 100, "phrase": "spleen", "answer": "{<1><2><3><4>}"}  # AbdomenCT-1K: the asked one
    assert grounding_targets(organ) == {"spleen": "{<1><2><3><4>}"}
    assert grounding_targets({"answer": "no"}) == {}


def test_the_answer_value_loss_reads_each_number_at_the_states_that_write_its_digits(tmp_path):
    model = scratch_model(tmp_path)
    model.requires_grad_(True)
    value_loss = AnswerValueLoss(model)
    pixels = torch.randn(2, 3, SIZES.image_size, SIZES.image_size)
    output = model.training_forward(pixels, [QUESTION, "[vqa] is there a tumor?"], ["{<7><20><60><100>}", "no"],
                                    keep_hidden=True)
    positions, targets = value_loss.number_positions(output.labels)
    assert targets == [0.07, 0.2, 0.2, 0.6, 0.6, 1.0, 1.0, 1.0]  # one state per digit; the yes/no row adds none
    assert {row for row, _ in positions} == {0}
    # the state before each digit is the one whose next label is that digit
    labels = output.labels[0].tolist()
    digits = [model.tokenizer.sp.id_to_piece(labels[column + 1]) for _, column in positions]
    assert "".join(digits) == "72060100"
    loss = value_loss(output)
    loss.backward()
    assert loss.item() > 0 and model.llama_proj.weight.grad.abs().sum() > 0


def test_augmentation_moves_the_boxes_with_the_image():
    image = Image.new("RGB", (200, 100))
    ImageDraw.Draw(image).rectangle((60, 30, 99, 59), fill=(255, 255, 255))  # inclusive pixel box
    answer = grammar.render_box((60, 30, 99, 59), 200, 100)
    moved_any = False
    for seed in range(20):
        moved, (new_answer,) = augment_example(image, [answer], Augmentation(), random.Random(seed))
        box = grammar.grid_to_pixels(grammar.parse_answer(new_answer).grid_boxes[0], 200, 100)
        columns, rows = np.nonzero(np.asarray(moved)[..., 0].T > 127)
        truth = (columns.min(), rows.min(), columns.max(), rows.max())
        assert np.abs(np.subtract(box, truth)).max() <= 3  # within a grid cell (2 px by 1 px) plus resampling
        moved_any |= new_answer != answer
    assert moved_any
    assert augment_example(image, ["yes"], Augmentation(), random.Random(0))[1] == ["yes"]
    # a box that no zoom/shift keeps inside the frame leaves the example as it was
    edge = grammar.render_box((0, 0, 199, 99), 200, 100)
    assert augment_example(image, [edge], Augmentation(zoom=(1.5, 2.0)), random.Random(0)) == (image, [edge])


def test_the_grounding_boxes_move_under_the_same_draw_as_the_answer():
    image = Image.new("RGB", (200, 100))
    pancreas, tumour = (60, 30, 99, 59), (70, 40, 79, 49)
    answers = ["yes", grammar.render_box(pancreas, 200, 100), grammar.render_box(tumour, 200, 100),
               grammar.ABSENT_ANSWER]
    for seed in range(10):
        _, moved = augment_example(image, answers, Augmentation(), random.Random(seed))
        assert moved[0] == "yes" and moved[3] == grammar.ABSENT_ANSWER
        boxes = [grammar.grid_to_pixels(grammar.parse_answer(a).grid_boxes[0], 200, 100) for a in moved[1:3]]
        offset = np.subtract(boxes[1][:2], boxes[0][:2])  # the tumour stays where it was inside the pancreas
        scale = (boxes[0][2] - boxes[0][0]) / (pancreas[2] - pancreas[0])
        assert np.abs(offset - scale * np.subtract(tumour[:2], pancreas[:2])).max() <= 3


def test_grey_level_augmentation_varies_contrast_and_keeps_the_order_of_tissues():
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))).convert("RGB")  # black to white
    curves = [np.asarray(adjust_intensity(ramp, Augmentation(), random.Random(seed)))[0, :, 0].astype(int)
              for seed in range(20)]
    for curve in curves:
        assert (np.diff(curve) >= 0).all()  # darker stays darker: a hypo-dense tumour stays visible
        assert curve[-1] - curve[0] >= 128  # the curve squeezes contrast, it never erases it
    assert len({tuple(curve) for curve in curves}) == 20
    mid_greys = [curve[128] for curve in curves]
    assert min(mid_greys) < 110 and max(mid_greys) > 150  # darker and brighter soft tissue, as scans differ
    # the same seed draws the same curve; no window and gamma 1 leaves the image as it is
    again = np.asarray(adjust_intensity(ramp, Augmentation(), random.Random(7)))[0, :, 0]
    assert (again == curves[7]).all()
    assert adjust_intensity(ramp, Augmentation(window=0.0, gamma=(1.0, 1.0)), random.Random(0)) is ramp
