"""Structural facts of MiniGPT-v2 on a tiny random model in the original file formats, each checked against an
independent computation: a plain-torch re-implementation of upstream's math (EVA ViT, ln_vision, 4-token merge,
llama_proj, transformers-4.30 LLaMA with peft-0.2.0 LoRA) written from the spec, reading the raw files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend import prompts
from backend.checkpoints import load_upstream
from backend.image import CLIP_MEAN, CLIP_STD, preprocess_image
from tiny_upstream_models import build_tiny_upstream

QUESTIONS = ["[refer] give me the location of the pancreas", "[vqa] is the liver visible?",
             "[refer] where is the pancreatic tumor ?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("tiny_upstream"))


@pytest.fixture(scope="module")
def model(files):
    return load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                         image_size=files.sizes.image_size)


@pytest.fixture(scope="module")
def raw(files):
    """The three files as plain float32 tensors: (vit, llama, minigpt)."""
    vit = {k: v.float() for k, v in torch.load(files.vit_checkpoint).items()}
    llama = {k: v.float() for k, v in torch.load(files.llama_dir / "pytorch_model.bin").items()}
    minigpt = torch.load(files.minigpt_checkpoint)["model"]
    return vit, llama, minigpt


@pytest.fixture(scope="module")
def pixels(files):
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    return torch.stack([preprocess_image(image, files.sizes.image_size) for image in images])


# ------------------------------------------------------------------------------------ reference implementation

def ref_pos_embed(vit, sizes):
    grid = vit["pos_embed"][0, 1:].reshape(sizes.checkpoint_grid, sizes.checkpoint_grid, -1).permute(2, 0, 1)
    new = sizes.image_size // sizes.patch_size
    grid = F.interpolate(grid[None], size=(new, new), mode="bicubic", align_corners=False)[0]
    return torch.cat([vit["pos_embed"][0, :1], grid.permute(1, 2, 0).reshape(new * new, -1)])[None]


def ref_vit(vit, sizes, pixels):
    """EVA ViT as upstream's eva_vit.py computes it: explicit softmax(q * scale @ k^T) attention."""
    heads = sizes.vit_width // 88
    x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=sizes.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vit["cls_token"].expand(len(x), -1, -1), x], dim=1) + ref_pos_embed(vit, sizes)
    for b in range(sizes.vit_depth):
        p = lambda name: vit[f"blocks.{b}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (sizes.vit_width,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        qkv = (h @ p("attn.qkv.weight").T + bias).reshape(len(x), x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (sizes.vit_width // heads) ** -0.5, qkv[1], qkv[2]
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(x.shape)
        x = x + out @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (sizes.vit_width,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return x


def ref_image_tokens(vit, minigpt, sizes, pixels):
    """ln_vision (identity init, eps 1e-5) on all tokens, drop CLS, then token (r, k) = patches (r, 4k..4k+3)."""
    features = F.layer_norm(ref_vit(vit, sizes, pixels), (sizes.vit_width,), eps=1e-5)
    grid = sizes.image_size // sizes.patch_size
    merged = []
    for row in range(grid):
        for k in range(grid // 4):
            merged.append(torch.cat([features[:, 1 + row * grid + 4 * k + i] for i in range(4)], dim=-1))
    merged = torch.stack(merged, dim=1)
    return merged @ minigpt["llama_proj.weight"].T + minigpt["llama_proj.bias"]


def ref_llama_logits(llama, minigpt, sizes, embeds):
    """transformers-4.30 LLaMA (eager, fp32) with LoRA W x + B(A x) * alpha / r, one unpadded sequence [L, H]."""
    length, hidden, heads = embeds.shape[0], sizes.llm_hidden, sizes.llm_heads
    head_dim = hidden // heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rotate(x):  # [heads, L, d]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def proj(h, layer, name):
        out = h @ llama[f"model.layers.{layer}.self_attn.{name}.weight"].T
        key = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{name}.lora_"
        if key + "A.weight" in minigpt:
            out = out + (h @ minigpt[key + "A.weight"].T) @ minigpt[key + "B.weight"].T * (16 / sizes.lora_r)
        return out

    causal = torch.full((length, length), float("-inf")).triu(1)
    x = embeds
    for layer in range(sizes.llm_layers):
        h = rms(x, llama[f"model.layers.{layer}.input_layernorm.weight"])
        q, k, v = (proj(h, layer, name).reshape(length, heads, head_dim).transpose(0, 1)
                   for name in ("q_proj", "k_proj", "v_proj"))
        attention = ((rotate(q) @ rotate(k).transpose(-1, -2)) / head_dim ** 0.5 + causal).softmax(-1)
        x = x + proj((attention @ v).transpose(0, 1).reshape(length, hidden), layer, "o_proj")
        h = rms(x, llama[f"model.layers.{layer}.post_attention_layernorm.weight"])
        mlp = lambda n: llama[f"model.layers.{layer}.mlp.{n}.weight"]  # noqa: E731
        x = x + (F.silu(h @ mlp("gate_proj").T) * (h @ mlp("up_proj").T)) @ mlp("down_proj").T
    return rms(x, llama["model.norm.weight"]) @ llama["lm_head.weight"].T


def ref_prompt_embeds(model, llama, image_tokens, before_ids, after_ids):
    table = llama["model.embed_tokens.weight"]
    return torch.cat([table[before_ids], image_tokens, table[after_ids]])


# ------------------------------------------------------------------------------------------------------ tests

def test_position_embedding_is_interpolated_bicubically_in_float32(model, raw, files):
    vit, _, _ = raw
    assert torch.load(files.vit_checkpoint)["pos_embed"].dtype == torch.float16  # like the real file
    assert model.visual_encoder.pos_embed.shape == (1, 1 + 8 * 8, files.sizes.vit_width)
    torch.testing.assert_close(model.visual_encoder.pos_embed.detach(), ref_pos_embed(vit, files.sizes),
                               rtol=0, atol=0)


def test_vit_heads_depth_and_output_match_upstream_math(model, raw, files, pixels):
    vision = model.config.vision
    assert (vision.width, vision.depth, vision.num_heads, vision.patch_size, vision.mlp_hidden) == (176, 2, 2, 7, 256)
    out = model.visual_encoder(pixels)
    torch.testing.assert_close(out, ref_vit(raw[0], files.sizes, pixels), rtol=1e-5, atol=1e-5)


def test_four_horizontally_adjacent_patches_are_merged_in_row_major_order(model, raw, files, pixels):
    vit, _, minigpt = raw
    tokens = model.encode_images(pixels)
    assert tokens.shape == (3, 16, files.sizes.llm_hidden)  # 8 x 8 patches -> 16 tokens
    torch.testing.assert_close(tokens, ref_image_tokens(vit, minigpt, files.sizes, pixels), rtol=1e-5, atol=1e-5)


def test_lora_adds_a_quarter_of_b_a_x_to_q_proj(model, raw):
    _, llama, minigpt = raw
    q_proj = model.llama_model.base_model.model.model.layers[1].self_attn.q_proj
    assert model.config.lora_scaling == 0.25 and q_proj.scaling["default"] == 0.25
    x = torch.randn(5, model.config.llm_hidden_size, generator=torch.Generator().manual_seed(3))
    prefix = "llama_model.base_model.model.model.layers.1.self_attn.q_proj."
    expected = x @ llama["model.layers.1.self_attn.q_proj.weight"].T + 0.25 * (
        x @ minigpt[prefix + "lora_A.weight"].T) @ minigpt[prefix + "lora_B.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(q_proj(x), expected, rtol=1e-5, atol=1e-6)
    # LoRA matrices stay float32 and are the only trainable LLaMA tensors, with llama_proj.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias"} | {
        f"llama_model.base_model.model.model.layers.{i}.self_attn.{t}.lora_{m}.default.weight"
        for i in range(2) for t in ("q_proj", "v_proj") for m in "AB"}


def test_inference_prompt_starts_with_two_bos_ids(model):
    question = QUESTIONS[0]
    before, after = model.prompt_token_ids(prompts.inference_prompt(question), add_bos=True)
    sp = model.tokenizer.sp
    assert before[:2] == [1, 1]
    assert before == [1, 1] + sp.encode("[INST] <Img>")
    assert after == sp.encode(f"</Img> {question} [/INST]")


def test_first_token_logits_match_upstream_math(model, raw, files, pixels):
    vit, llama, minigpt = raw
    logits = model.first_token_logits(pixels[:1], QUESTIONS[:1])
    assert logits.shape == (1, model.tokenizer.vocab_size) and logits.dtype == torch.float32
    before, after = model.prompt_token_ids(prompts.inference_prompt(QUESTIONS[0]), add_bos=True)
    image = ref_image_tokens(vit, minigpt, files.sizes, pixels[:1])[0]
    expected = ref_llama_logits(llama, minigpt, files.sizes, ref_prompt_embeds(model, llama, image, before, after))
    torch.testing.assert_close(logits[0], expected[-1], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_gives_each_sample_its_own_logits_and_answer(model, pixels):
    lengths = [len(sum(model.prompt_token_ids(prompts.inference_prompt(q), True), [])) for q in QUESTIONS]
    assert len(set(lengths)) == 3  # the batch really needs padding
    batch_logits = model.first_token_logits(pixels, QUESTIONS)
    batch_answers = model.generate(pixels, QUESTIONS, max_new_tokens=6)
    for i, question in enumerate(QUESTIONS):
        alone = model.first_token_logits(pixels[i:i + 1], [question])
        torch.testing.assert_close(batch_logits[i], alone[0], rtol=1e-5, atol=1e-5)
        assert model.generate(pixels[i:i + 1], [question], max_new_tokens=6).token_ids[0] == \
            batch_answers.token_ids[i]
    embeds, mask = model.inference_batch(model.encode_images(pixels), [prompts.inference_prompt(q) for q in QUESTIONS])
    shortest = int(np.argmin(lengths))
    pad = embeds.shape[1] - (lengths[shortest] + model.config.image_tokens)
    assert pad > 0
    assert mask[shortest, :pad].sum() == 0 and embeds[shortest, :pad].abs().sum() == 0  # zero embeddings


def test_generate_is_greedy_over_upstream_math_and_stops_at_eos(model, raw, files, pixels):
    vit, llama, minigpt = raw
    image = ref_image_tokens(vit, minigpt, files.sizes, pixels[1:2])[0]
    before, after = model.prompt_token_ids(prompts.inference_prompt(QUESTIONS[1]), add_bos=True)
    context, expected_ids = ref_prompt_embeds(model, llama, image, before, after), []
    for _ in range(5):  # greedy without a cache: re-run the whole sequence each step
        next_id = int(ref_llama_logits(llama, minigpt, files.sizes, context)[-1].argmax())
        expected_ids.append(next_id)
        context = torch.cat([context, llama["model.embed_tokens.weight"][next_id][None]])
    result = model.generate(pixels[1:2], QUESTIONS[1:2], max_new_tokens=5)
    assert result.token_ids == [expected_ids]
    text = model.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert result.texts == [text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip()]
    token_ids, texts = result  # unpacks like a tuple
    assert (token_ids, texts) == (result.token_ids, result.texts)

    eos = model.tokenizer.eos_id

    def force_eos_at_step_2_for_row_0(history, logits):
        if history.shape[1] == 2:
            logits[0] = -1e9
            logits[0, eos] = 0
        return logits

    forced = model.generate(pixels[:2], QUESTIONS[:2], max_new_tokens=5,
                            logits_processor=force_eos_at_step_2_for_row_0)
    assert len(forced.token_ids[0]) == 3 and forced.token_ids[0][-1] == eos  # up to and including the EOS
    assert len(forced.token_ids[1]) == 5 and eos not in forced.token_ids[1]


def test_training_loss_is_mean_ce_over_answer_tokens_only(model, raw, files, pixels):
    vit, llama, minigpt = raw
    instructions, answers = QUESTIONS[:2], ["{<12><30><47><61>}", "yes"]
    loss = model.training_loss(pixels[:2], instructions, answers)
    images = ref_image_tokens(vit, minigpt, files.sizes, pixels[:2])
    table, total, count = llama["model.embed_tokens.weight"], 0.0, 0
    for i, (instruction, answer) in enumerate(zip(instructions, answers)):
        prompt = f"[INST] <Img><ImageHere></Img> {instruction}  [/INST]"
        before, after = model.prompt_token_ids(prompt, add_bos=False)
        answer_ids = model.tokenizer.encode(answer + "</s>")
        assert answer_ids[-1] == model.tokenizer.eos_id
        context = torch.cat([table[[1]], ref_prompt_embeds(model, llama, images[i], before, after), table[answer_ids]])
        log_probs = ref_llama_logits(llama, minigpt, files.sizes, context).log_softmax(-1)
        first = context.shape[0] - len(answer_ids) - 1  # the position that predicts the first answer token
        total -= sum(float(log_probs[first + j, token]) for j, token in enumerate(answer_ids))
        count += len(answer_ids)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_training_loss_is_deterministic_in_eval_and_trains_only_projection_and_lora(model, pixels):
    args = (pixels[:2], QUESTIONS[:2], ["yes", "no"])
    assert model.training_loss(*args).item() == model.training_loss(*args).item()
    model.train()
    try:
        assert not model.visual_encoder.training  # the frozen ViT stays in eval mode, as upstream
        torch.manual_seed(0)
        loss = model.training_loss(*args)
        loss.backward()
        assert loss.item() != model.eval().training_loss(*args).item()  # LoRA dropout 0.05 was active
        assert model.llama_proj.weight.grad is not None and model.llama_proj.weight.grad.abs().sum() > 0
        lora_a = model.llama_model.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight
        assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.visual_encoder.parameters())
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_chat_renders_upstream_conversation_and_truncates_old_context(model, raw, files, pixels):
    vit, llama, minigpt = raw
    turns = ["describe the image", "[refer] where is the pancreas?"]
    reply = model.chat(pixels[2:3], turns, max_new_tokens=3)
    prompt = "<s>[INST] <Img><ImageHere></Img> describe the image [/INST]</s><s>[INST] " \
             "[refer] where is the pancreas? [/INST]"
    before, after = model.prompt_token_ids(prompt, add_bos=True)
    image = ref_image_tokens(vit, minigpt, files.sizes, pixels[2:3])[0]
    context = ref_prompt_embeds(model, llama, image, before, after)
    torch.testing.assert_close(reply.first_logits[0], ref_llama_logits(llama, minigpt, files.sizes, context)[-1],
                               rtol=1e-4, atol=1e-4)
    # Upstream keeps only the last (max_length - max_new_tokens) embeddings of the context.
    short = dataclasses.replace(model.config, chat_max_length=20)
    original, model.config = model.config, short
    try:
        truncated = model.chat(pixels[2:3], turns, max_new_tokens=3)
    finally:
        model.config = original
    torch.testing.assert_close(truncated.first_logits[0],
                               ref_llama_logits(llama, minigpt, files.sizes, context[-17:])[-1], rtol=1e-4, atol=1e-4)


def test_preprocess_image_is_pil_bicubic_then_clip_normalisation():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (30, 45, 4), dtype=np.uint8)
    out = preprocess_image(Image.fromarray(rgba, "RGBA"), image_size=28)
    resized = np.asarray(Image.fromarray(rgba[..., :3], "RGB").resize((28, 28), Image.BICUBIC), dtype=np.float32)
    expected = (resized / np.float32(255) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)  # already the right size: no resampling
    gray_out = preprocess_image(gray, image_size=28)
    np.testing.assert_allclose(gray_out[0].numpy(), (gray / np.float32(255) - np.float32(CLIP_MEAN[0]))
                               / np.float32(CLIP_STD[0]), atol=1e-6)
