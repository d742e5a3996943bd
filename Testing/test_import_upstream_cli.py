"""`minigpt-pancreas import-upstream` and `info` on tiny files in the original formats, and the light `backend`
package (no torch import until the model API is used)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.cli import main
from tiny_upstream_models import build_tiny_upstream

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("upstream"))


def import_args(files, out):
    return ["import-upstream", "--vit", str(files.vit_checkpoint), "--llama", str(files.llama_dir),
            "--checkpoint", str(files.minigpt_checkpoint), "--out", str(out), "--image-size", "56",
            "--dtype", "float32"]


def test_import_then_info_then_load(files, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(import_args(files, out)) == 0
    printed = capsys.readouterr().out
    assert "LoRA: r 64, alpha 16.0 (scaling 0.25), targets q_proj, v_proj" in printed
    assert f"wrote {out}" in printed

    assert main(["info", str(out), "--verify-hashes"]) == 0
    info = capsys.readouterr().out
    assert "ViT: 2 blocks, width 176, 2 heads, MLP 256, patch 7, image 56 px (8x8 patches" in info
    assert "image tokens: 16 of 704 -> 64 (llama_proj)" in info
    assert "base files: as saved (sha256 and size)" in info

    import backend

    model = backend.load_model(out)
    answers = model.generate(torch.zeros(1, 3, 56, 56), ["[vqa] is there a tumor?"], max_new_tokens=3)
    assert len(answers.token_ids[0]) == 3

    assert main(import_args(files, out)) == 2  # refuses to replace without --overwrite
    assert "already holds a model" in capsys.readouterr().err
    assert main(import_args(files, out) + ["--overwrite"]) == 0


def test_info_describes_an_upstream_checkpoint(files, capsys):
    assert main(["info", str(files.minigpt_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "tensors in 'model': 12 (8 LoRA, 2 rotary inv_freq buffers)" in printed
    assert "llama_proj: 704 -> 64" in printed
    assert "LoRA: r 64, targets q_proj, v_proj, 2 layers" in printed


def test_info_reports_changed_base_files(files, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(import_args(files, out) + ["--no-hash"]) == 0
    capsys.readouterr()
    config = files.llama_dir / "config.json"
    original = config.read_text()
    try:
        config.write_text(original + "\n")
        assert main(["info", str(out)]) == 1
        assert "base files: NOT as saved" in capsys.readouterr().out
    finally:
        config.write_text(original)


def test_broken_input_gives_an_error_line_not_a_traceback(files, tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(files.minigpt_checkpoint.read_bytes()[:500])
    args = import_args(files, tmp_path / "model")
    args[args.index("--checkpoint") + 1] = str(broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("minigpt-pancreas import-upstream: error: cannot read MiniGPT checkpoint")
    assert "broken.pth" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "model").exists()
    assert main(["info", str(broken)]) == 2


def test_importing_backend_and_building_the_cli_does_not_import_torch():
    code = ("import sys, backend, backend.cli; backend.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(backend.load_upstream) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
