"""A model folder whose minigpt_model.json was edited or damaged is refused when the manifest is read, with one line
naming the file and the key (a CheckpointError: the command lines print it and exit 2), never a KeyError or
TypeError from deep inside loading, nor a model silently built from EVA ViT-g's defaults."""

from __future__ import annotations

import math
import re
import socket

import pytest

from backend import cli
from backend.checkpoint_io import CheckpointError
from backend.model_dir import MANIFEST_FILE, load_model, read_manifest
from model_folders import bundled_model_copy

ADVICE = ("; the folder was not written by this tool or was edited. Re-create it (minigpt-pancreas import-upstream, "
          "or minigpt-pancreas-train export).")
DELETE = object()
LLAMA_WEIGHTS = ("base", "llama_dir", "files", "model.safetensors")


def _set(keys: tuple[str, ...], value):
    """An edit of the manifest: the value at `keys` becomes `value`, or is deleted (DELETE)."""
    def edit(manifest):
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return edit


# (keys, new value, what the message says after the file name)
CASES = [
    (("tensors",), DELETE, "tensors is missing"),
    (("tensors", "file"), DELETE, "tensors.file is missing"),
    (("tensors", "sha256"), None, "tensors.sha256 is null, expected 64 hex digits (a sha256)"),
    (("base",), DELETE, "base is missing"),
    (("base", "vit_checkpoint", "path"), None, "base.vit_checkpoint.path is null, expected a non-empty string"),
    (("base", "vit_checkpoint", "size"), DELETE, "base.vit_checkpoint.size is missing"),
    (("base", "llama_dir", "files"), None, "base.llama_dir.files is null, expected an object"),
    (LLAMA_WEIGHTS, None, 'base.llama_dir.files["model.safetensors"] is null, expected an object'),
    ((*LLAMA_WEIGHTS, "size"), "6742560", 'base.llama_dir.files["model.safetensors"].size is "6742560", expected '
                                          "a byte count"),
    (("config", "vision"), DELETE, "config.vision is missing"),  # not EVA ViT-g's sizes, 511 tensors missing
    (("config", "vision", "depth"), DELETE, "config.vision.depth is missing"),
    (("config", "vision", "layer_norm_eps"), None, "config.vision.layer_norm_eps is null, expected a finite number"),
    (("config", "ln_vision_eps"), None, "config.ln_vision_eps is null, expected a finite number"),
    (("config", "lora_alpha"), math.nan, "config.lora_alpha is NaN, expected a finite number"),
    (("config", "lora_r"), "sixteen", 'config.lora_r is "sixteen", expected a whole number >= 1'),
    (("config", "llm_hidden_size"), 0, "config.llm_hidden_size is 0, expected a whole number >= 1"),
    (("config", "lora_target_modules"), "q_proj", 'config.lora_target_modules is "q_proj", expected a list of '
                                                  "strings"),
    (("card", "model_id"), 5, "card.model_id is 5, expected 1-200 printable characters"),
]
BROKEN = {f"{'.'.join(case[0])} {'deleted' if case[1] is DELETE else repr(case[1])}": case for case in CASES}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_manifest_is_one_line_naming_the_file_and_the_key(case, tmp_path):
    keys, value, said = BROKEN[case]
    folder = bundled_model_copy(tmp_path / "model", _set(keys, value))
    with pytest.raises(CheckpointError) as refused:
        load_model(folder)
    assert str(refused.value) == f"{folder / MANIFEST_FILE}: {said}{ADVICE}"


@pytest.mark.parametrize(("text", "said"), [
    (b"\xff\xfe{}", "'utf-8' codec can't decode byte 0xff"),
    (b'{"format": 1' + b"0" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
    (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth exceeded"),
])
def test_a_manifest_that_is_not_json_text_is_one_line(text, said, tmp_path):
    folder = bundled_model_copy(tmp_path / "model")
    (folder / MANIFEST_FILE).write_bytes(text)
    with pytest.raises(CheckpointError, match=rf"^cannot read {re.escape(str(folder / MANIFEST_FILE))}: .*Re-create"
                       ) as refused:
        load_model(folder)
    assert said in str(refused.value)


def test_a_config_its_own_rules_refuse_is_refused_when_the_manifest_is_read(tmp_path):
    folder = bundled_model_copy(tmp_path / "model", _set(("config", "vision", "num_heads"), 7))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / MANIFEST_FILE))}: invalid model config \(ViT width 264 is "
                                              "not divisible by num_heads 7"):
        read_manifest(folder)  # what serve checks before it takes the port


def test_the_commands_print_the_manifest_problem_as_one_line(tmp_path, capsys):
    folder = bundled_model_copy(tmp_path / "model", _set(("tensors",), DELETE))
    said = f"{folder / MANIFEST_FILE}: tensors is missing{ADVICE}\n"
    assert cli.main(["info", str(folder)]) == 2
    assert capsys.readouterr().err == f"minigpt-pancreas info: error: {said}"
    with socket.socket() as taken:  # serve reads the manifest before it takes the port (and would not serve)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["serve", "--model", str(folder), "--device", "cpu", "--port", str(taken.getsockname()[1])]
        assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"minigpt-pancreas serve: error: {said}"


def test_what_the_tool_may_leave_out_or_null_still_loads(tmp_path):
    def unhashed_and_bare(manifest):  # saved with hash_base_files=False, never exported, nothing imported
        for record in (manifest["base"]["vit_checkpoint"], *manifest["base"]["llama_dir"]["files"].values()):
            record["sha256"] = None
        for optional in ("tokenizer", "card", "exported_from"):
            del manifest[optional]
        manifest["imported_from"] = None

    model = load_model(bundled_model_copy(tmp_path / "model", unhashed_and_bare))
    assert model.config.vision.depth == 4 and model.config.lora_r == 16
