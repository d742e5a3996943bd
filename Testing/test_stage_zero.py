"""The pieces of the demo cascade's stage 0: a base initialised from scratch in upstream's file formats, training
on generate's prompt layout, and the patch-grounding objective."""

from __future__ import annotations

import torch

from backend import prompts
from backend.checkpoints import load_upstream
from training.base_weights import ScratchSizes, write_initial_base
from training.patch_grounding import PatchGroundingLoss

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


def test_the_box_mask_covers_the_patches_of_the_answer_box(tmp_path):
    grounding = PatchGroundingLoss(scratch_model(tmp_path))  # a 4 x 4 patch grid
    mask = grounding.box_mask("{<0><0><49><49>}").reshape(4, 4)
    assert mask[:2, :2].all() and mask.sum() == 4
    assert grounding.box_mask("{<0><0><0><0>}") is None and grounding.box_mask("yes") is None


def test_the_grounding_loss_trains_the_vision_tower(tmp_path):
    model = scratch_model(tmp_path)
    model.requires_grad_(True)
    grounding = PatchGroundingLoss(model)
    pixels = torch.randn(2, 3, SIZES.image_size, SIZES.image_size)
    model.training_loss(pixels, [QUESTION, "[vqa] is there a tumor?"], [ANSWER, "no"])
    loss = grounding(["pancreas", None], [ANSWER, "no"])
    loss.backward()
    assert loss.item() > 0 and model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
