"""Loading the original file formats (size inference, peft name variants, checks that refuse broken files with
messages naming the file and tensor) and the project's own model folder (round trip, base-file checks)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from backend.checkpoint_io import CheckpointError
from backend.checkpoints import infer_vision_config, load_upstream
from backend.config import ConfigError
from backend.llm import QuantizationError
from backend.model_dir import MANIFEST_FILE, TENSORS_FILE, load_model, save_model_dir
from backend.tiny_upstream import TinySizes, build_tiny_minigpt_checkpoint
from tiny_upstream_models import build_tiny_upstream

SIZES = TinySizes()
QUESTIONS = ["[refer] give me the location of the pancreas", "[vqa] is there a tumor?"]
LORA_B_1 = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def model(files):
    return load(files)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, SIZES.image_size, SIZES.image_size, generator=torch.Generator().manual_seed(0))


def load(files, vit=None, llama=None, minigpt=None, **kwargs):
    return load_upstream(vit or files.vit_checkpoint, llama or files.llama_dir, minigpt or files.minigpt_checkpoint,
                         image_size=SIZES.image_size, **kwargs)


def edited_checkpoint(files, tmp_path, edit):
    data = torch.load(files.minigpt_checkpoint)
    edit(data)
    path = tmp_path / "edited.pth"
    torch.save(data, path)
    return path


# ------------------------------------------------------------------------------------------- size inference

def shaped(*shape):
    """A tensor with the given shape and no real storage (only shapes matter for size inference)."""
    return torch.zeros(1).expand(*shape)


def eva_like(width, blocks, patch=14, grid=16, mlp=6144):
    raw = {"pos_embed": shaped(1, 1 + grid * grid, width), "patch_embed.proj.weight": shaped(width, 3, patch, patch)}
    for block in blocks:
        raw[f"blocks.{block}.mlp.fc1.weight"] = shaped(mlp, width)
        raw[f"blocks.{block}.attn.qkv.weight"] = shaped(3 * width, width)
    return raw


def test_real_eva_vit_g_shapes_give_the_upstream_vit():
    config = infer_vision_config(eva_like(1408, range(40)), 448, None, "eva_vit_g.pth")
    assert (config.width, config.depth, config.num_heads, config.mlp_hidden) == (1408, 39, 16, 6144)
    assert (config.patch_size, config.checkpoint_grid, config.grid_size) == (14, 16, 32)
    assert infer_vision_config(eva_like(1408, range(39)), 448, None, "f").depth == 39


def test_depth_is_the_contiguous_block_count_for_other_models():
    assert infer_vision_config(eva_like(176, range(40), mlp=256), 56, 2, "f").depth == 40
    assert infer_vision_config(eva_like(176, [0, 1, 3], mlp=256), 56, 2, "f").depth == 2


def test_a_vit_of_another_width_without_a_head_count_is_refused_not_guessed(tmp_path):
    # ViT-B is 768 wide with 12 heads; upstream's rule would have guessed 768 // 88 = 8 and answered wrongly
    vit = tmp_path / "vit_b.pth"
    with pytest.raises(CheckpointError, match=r"768 wide.*vit_num_heads=N.*vit_b\.json"):
        infer_vision_config(eva_like(768, range(2), mlp=3072), 224, None, vit)
    assert infer_vision_config(eva_like(768, range(2), mlp=3072), 224, 12, vit).num_heads == 12
    (tmp_path / "vit_b.json").write_text(json.dumps({"num_heads": 12}))
    assert infer_vision_config(eva_like(768, range(2), mlp=3072), 224, None, vit).num_heads == 12
    (tmp_path / "vit_b.json").write_text("{\"heads\": 12}")
    with pytest.raises(CheckpointError, match="vit_b.json must be JSON like"):
        infer_vision_config(eva_like(768, range(2), mlp=3072), 224, None, vit)


def test_a_vit_of_a_width_that_is_a_multiple_of_88_is_refused_without_a_head_count_too(tmp_path):
    # 264 = 3 x 88: upstream's rule width // 88 used to guess 3 heads with a warning; trained with 6, it answers wrongly
    vit = tmp_path / "eva_vit.pth"
    with pytest.raises(CheckpointError, match=r"264 wide.*not stored in the weights.*vit_num_heads=N.*eva_vit\.json"):
        infer_vision_config(eva_like(264, range(2), mlp=512), 56, None, vit)
    (tmp_path / "eva_vit.json").write_text(json.dumps({"num_heads": 6}))
    assert infer_vision_config(eva_like(264, range(2), mlp=512), 56, None, vit).num_heads == 6


def test_the_tiny_vit_files_carry_their_head_count(files, tmp_path):
    assert json.loads(files.vit_checkpoint.with_suffix(".json").read_text()) == {"num_heads": 2}
    shutil.copy(files.vit_checkpoint, tmp_path / "eva_vit_g.pth")  # without its sidecar
    with pytest.raises(CheckpointError, match="176 wide"):
        load(files, vit=tmp_path / "eva_vit_g.pth")


def test_head_count_can_be_given_and_must_divide_the_width(files):
    assert infer_vision_config(eva_like(176, range(2)), 56, 4, "f").num_heads == 4
    with pytest.raises(ConfigError, match="not divisible by num_heads 3.*vit_num_heads"):
        load(files, vit_num_heads=3)


# ------------------------------------------------------------------------------------------- name variants

def test_newer_peft_names_load_the_same_weights(files, model, tmp_path, pixels):
    new = build_tiny_minigpt_checkpoint(tmp_path / "new.pth", SIZES, seed=2, peft_names="new")
    assert any(".lora_A.default.weight" in key for key in torch.load(new)["model"])
    other = load(files, minigpt=new)
    torch.testing.assert_close(other.first_token_logits(pixels, QUESTIONS),
                               model.first_token_logits(pixels, QUESTIONS), rtol=0, atol=0)
    assert other.trainable_state_dict().keys() == model.trainable_state_dict().keys()
    assert all(".lora_A.default" not in key for key in model.trainable_state_dict())  # upstream names


def test_inv_freq_buffers_are_ignored_and_unknown_keys_reported(files, tmp_path):
    assert any(key.endswith("rotary_emb.inv_freq") for key in torch.load(files.minigpt_checkpoint)["model"])
    path = edited_checkpoint(files, tmp_path, lambda d: d["model"].update({"query_tokens": torch.zeros(1, 32, 8)}))
    report = "\n".join(load(files, minigpt=path).load_report)
    assert "query_tokens" in report and "rotary_emb" not in report


def test_ln_vision_is_taken_from_the_checkpoint_when_present(files, model, tmp_path):
    path = build_tiny_minigpt_checkpoint(tmp_path / "ln.pth", SIZES, seed=2, with_ln_vision=True)
    with_ln = load(files, minigpt=path)
    torch.testing.assert_close(with_ln.ln_vision.weight, torch.load(path)["model"]["ln_vision.weight"])
    assert with_ln.ln_vision.eps == 1e-5
    assert torch.equal(model.ln_vision.weight, torch.ones(SIZES.vit_width))  # identity when absent
    assert any("ln_vision: from identity" in line for line in model.load_report)


def test_unused_vit_tensors_are_reported(files, tmp_path):
    raw = torch.load(files.vit_checkpoint)
    raw["norm.weight"] = torch.ones(SIZES.vit_width)
    torch.save(raw, tmp_path / "vit.pth")
    report = load(files, vit=tmp_path / "vit.pth", vit_num_heads=SIZES.vit_heads).load_report
    assert any("norm.weight" in line for line in report)


# ---------------------------------------------------------------------------------------------- refusals

def test_truncated_files_are_refused_naming_the_file(files, tmp_path):
    for name, source in (("vit.pth", files.vit_checkpoint), ("ckpt.pth", files.minigpt_checkpoint)):
        data = source.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"EVA ViT checkpoint .*vit\.pth.*damaged, incomplete.*again"):
        load(files, vit=tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"MiniGPT checkpoint .*ckpt\.pth.*damaged, incomplete.*again"):
        load(files, minigpt=tmp_path / "ckpt.pth")


def test_missing_and_misshaped_tensors_are_all_listed(files, tmp_path):
    def damage(data):
        del data["model"][LORA_B_1]
        data["model"]["llama_proj.weight"] = torch.zeros(SIZES.llm_hidden, 100)

    with pytest.raises(CheckpointError) as error:
        load(files, minigpt=edited_checkpoint(files, tmp_path, damage))
    message = str(error.value)
    assert "edited.pth" in message and "2 expected tensor(s) missing or mis-shaped" in message
    assert f"missing    {LORA_B_1}  (expected shape [64, 64])" in message
    assert "mis-shaped llama_proj.weight  (expected [64, 704], found [64, 100])" in message


def test_checkpoint_without_model_entry_is_refused(files, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain\.pth has no 'model' entry.*\['state_dict'\]"):
        load(files, minigpt=tmp_path / "plain.pth")


def test_vit_file_missing_a_block_tensor_is_refused(files, tmp_path):
    raw = torch.load(files.vit_checkpoint)
    del raw["blocks.1.attn.q_bias"]
    torch.save(raw, tmp_path / "vit.pth")
    expected_line = r"vit\.pth.*\n  missing    blocks\.1\.attn\.q_bias  \(expected shape \[176\]\)"
    with pytest.raises(CheckpointError, match=expected_line):
        load(files, vit=tmp_path / "vit.pth", vit_num_heads=SIZES.vit_heads)
    with pytest.raises(CheckpointError, match=r"checkpoint_stage3\.pth is not a flat state dict.*eva_vit_g\.pth"):
        load(files, vit=files.minigpt_checkpoint)


def test_broken_llama_folders_are_refused(files, tmp_path):
    no_config = shutil.copytree(files.llama_dir, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json in the LLaMA folder .*no_config.*Llama-2-7b-chat-hf"):
        load(files, llama=no_config)
    partial = shutil.copytree(files.llama_dir, tmp_path / "partial")
    state = torch.load(partial / "pytorch_model.bin")
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, partial / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"partial.*\n  missing    model\.layers\.1\.mlp\.up_proj\.weight"):
        load(files, llama=partial)


def test_checkpoint_for_another_llama_size_is_refused(files, tmp_path):
    other = build_tiny_minigpt_checkpoint(tmp_path / "wide.pth", TinySizes(llm_hidden=96, llm_heads=4), seed=2)
    expected_line = r"(?s)wide\.pth.*mis-shaped llama_proj\.weight  \(expected \[64, 704\], found \[96, 704\]\)"
    with pytest.raises(CheckpointError, match=expected_line):
        load(files, minigpt=other)


def test_python_objects_need_allow_pickle(files, tmp_path):
    path = edited_checkpoint(files, tmp_path, lambda d: d.update({"rng": np.random.default_rng(0)}))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load(files, minigpt=path)
    assert load(files, minigpt=path, allow_pickle=True).config.lora_r == 64


def test_quantization_without_cuda_says_what_is_missing(files):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(QuantizationError, match="8bit loading needs a CUDA GPU"):
        load(files, quantization="8bit")


def test_half_precision_keeps_upstream_float32_parts(files, model, pixels):
    half = load(files, dtype=torch.bfloat16)
    assert half.visual_encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert half.visual_encoder.blocks[0].norm1.weight.dtype == torch.float32
    assert half.visual_encoder.pos_embed.dtype == torch.float32
    assert half.llama_proj.weight.dtype == torch.float32
    assert half.llama_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype \
        == torch.float32
    logits = half.first_token_logits(pixels, QUESTIONS)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.first_token_logits(pixels, QUESTIONS), rtol=0, atol=0.15)


# ------------------------------------------------------------------------------------------- own format

def test_model_folder_round_trip(files, model, tmp_path, pixels):
    folder = save_model_dir(model, tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == {MANIFEST_FILE, TENSORS_FILE, "tokenizer.model"}
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    vit_record = manifest["base"]["vit_checkpoint"]
    assert vit_record["size"] == files.vit_checkpoint.stat().st_size and len(vit_record["sha256"]) == 64
    assert set(manifest["base"]["llama_dir"]["files"]) == {"config.json", "pytorch_model.bin"}
    loaded = load_model(folder, verify_hashes=True)
    torch.testing.assert_close(loaded.first_token_logits(pixels, QUESTIONS),
                               model.first_token_logits(pixels, QUESTIONS), rtol=0, atol=0)
    assert loaded.config == model.config
    with pytest.raises(CheckpointError, match="already holds a model"):
        save_model_dir(model, folder)


def test_model_folder_detects_changed_or_moved_base_files(files, model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(files.vit_checkpoint.parent, base)
    moved = load(files, vit=base / "eva_vit_g.pth", llama=base / "llama")
    folder = save_model_dir(moved, tmp_path / "model")
    vit = base / "eva_vit_g.pth"
    size = vit.stat().st_size
    raw = torch.load(vit)
    raw["blocks.0.attn.q_bias"][0] += 1  # same tensors, one value changed: same file size
    torch.save(raw, vit)
    assert vit.stat().st_size == size
    load_model(folder)  # sizes agree: the default check passes
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: sha256 differs"):
        load_model(folder, verify_hashes=True)
    vit.write_bytes(vit.read_bytes() + b"x")
    with pytest.raises(CheckpointError, match=r"(?s)eva_vit_g\.pth: size \d+ bytes, recorded \d+.*vit_checkpoint="):
        load_model(folder)
    vit.unlink()
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: missing"):
        load_model(folder)
    assert load_model(folder, vit_checkpoint=str(files.vit_checkpoint)).config == moved.config


def test_model_folder_without_hashes_and_damaged_tensors(model, tmp_path):
    folder = save_model_dir(model, tmp_path / "model", hash_base_files=False)
    with pytest.raises(CheckpointError, match="no sha256 was recorded"):
        load_model(folder, verify_hashes=True)
    tensors = folder / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors is missing or not the file.*re-create"):
        load_model(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="minigpt_model.json is missing.*import-upstream"):
        load_model(folder)


def test_frozen_tensors_in_a_checkpoint_override_the_base_files_as_upstream_strict_false_does(files, tmp_path):
    prefix = "llama_model.base_model.model."
    overrides = {"visual_encoder.cls_token": torch.full((1, 1, SIZES.vit_width), 0.5),
                 prefix + "model.layers.0.self_attn.q_proj.weight": torch.full((SIZES.llm_hidden,) * 2, 0.01),
                 prefix + "lm_head.0.weight": torch.full((400, SIZES.llm_hidden), 0.02)}
    loaded = load(files, minigpt=edited_checkpoint(files, tmp_path, lambda d: d["model"].update(overrides)))
    llama = loaded.llama_model.base_model.model
    assert torch.equal(loaded.visual_encoder.cls_token, overrides["visual_encoder.cls_token"])
    assert torch.equal(llama.model.layers[0].self_attn.q_proj.base_layer.weight,
                       overrides[prefix + "model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(llama.lm_head.weight, overrides[prefix + "lm_head.0.weight"])
    assert any("loaded 3 frozen tensor(s)" in line for line in loaded.load_report)


def test_real_size_model_expects_the_130_released_tensors_with_their_shapes():
    from transformers import LlamaConfig

    from backend.checkpoints import _expected_trainable
    from backend.config import MiniGPTConfig
    from backend.vision import EvaViT

    llama_2_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             vocab_size=32000)
    config = MiniGPTConfig()
    expected = _expected_trainable(config, llama_2_7b, {})
    assert len(expected) == 130
    assert expected["llama_proj.weight"] == (4096, 5632)
    assert expected["llama_model.base_model.model.model.layers.31.self_attn.v_proj.lora_A.weight"] == (64, 4096)
    assert expected["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (4096, 64)
    with torch.device("meta"):  # shapes only, no memory
        vit = EvaViT(config.vision).state_dict()
    assert vit["pos_embed"].shape == (1, 1025, 1408) and vit["blocks.38.mlp.fc1.weight"].shape == (6144, 1408)
    assert vit["blocks.0.attn.qkv.weight"].shape == (4224, 1408) and vit["blocks.0.attn.q_bias"].shape == (1408,)
    assert "blocks.39.norm1.weight" not in vit and config.image_tokens == 256


def test_upstream_and_internal_names_map_both_ways():
    from backend.checkpoint_io import to_internal_name, to_upstream_name

    layer = "llama_model.base_model.model.model.layers.3.self_attn."
    pairs = {  # upstream (peft 0.2.0, transformers 4.30) -> this model (current peft)
        layer + "q_proj.lora_A.weight": layer + "q_proj.lora_A.default.weight",
        layer + "v_proj.lora_B.weight": layer + "v_proj.lora_B.default.weight",
        layer + "q_proj.weight": layer + "q_proj.base_layer.weight",
        layer + "k_proj.weight": layer + "k_proj.weight",  # not a LoRA target: unchanged
        "llama_model.base_model.model.lm_head.0.weight": "llama_model.base_model.model.lm_head.weight",
        "visual_encoder.blocks.0.attn.q_bias": "visual_encoder.blocks.0.attn.q_bias",
        "llama_proj.weight": "llama_proj.weight",
    }
    for upstream, internal in pairs.items():
        assert to_internal_name(upstream, ("q_proj", "v_proj")) == internal
        assert to_upstream_name(internal) == upstream
    assert to_internal_name(layer + "q_proj.lora_A.default.weight") == layer + "q_proj.lora_A.default.weight"
