"""`minigpt-pancreas-train export` as a user runs it: a real tiny fit run and tiny model folders are exported,
moved away from everything they came from, and loaded back with the same outputs; broken sources and occupied
targets are refused in one line with nothing written. Also: relative base paths in any model folder, and the lookup
of the bundled demo model."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

import backend
from backend import cli as backend_cli
from backend import demo_model
from backend.model_dir import MANIFEST_FILE, check_base_files, load_model, save_model_dir
from small_prepared import prepare_small_msd
from tiny_upstream_models import build_tiny_upstream
from training.cli import main

pytestmark = pytest.mark.slow

QUESTIONS = ["[refer] give me the location of the pancreas", "[vqa] is there a tumor?"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def pixels(upstream):
    size = upstream.sizes.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fit_run(upstream, tmp_path_factory):
    """A real `fit` output folder: two epochs of one step each (model_epoch_0, model_epoch_1, checkpoints)."""
    root = tmp_path_factory.mktemp("fit")
    prepared = prepare_small_msd(root / "data")
    config = {"output_dir": str(root / "pancreas_stage"), "stage": "test",
              "model": {"vit_checkpoint": str(upstream.vit_checkpoint), "llama_dir": str(upstream.llama_dir),
                        "checkpoint": str(upstream.minigpt_checkpoint), "image_size": upstream.sizes.image_size},
              "datasets": [{"task_file": str(prepared / "tasks/pancreas_detection_msd_train.json")}],
              "batch_size": 1, "iters_per_epoch": 1, "max_epoch": 2, "warmup_steps": 1, "init_lr": 1e-3,
              "num_workers": 1}
    (root / "fit.json").write_text(json.dumps(config))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", str(root / "fit.json")]) == 0
    return root / "pancreas_stage"


def private_model(upstream, root):
    """A model folder whose base files are private copies under `root` (so a test may break or delete them)."""
    shutil.copytree(upstream.vit_checkpoint.parent, root / "base")
    model = backend.load_upstream(root / "base" / "eva_vit_g.pth", root / "base" / "llama",
                                  root / "base" / "checkpoint_stage3.pth", image_size=upstream.sizes.image_size)
    return model, save_model_dir(model, root / "model")


def export(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *map(str, argv)])
    return code, out.getvalue(), err.getvalue().strip()


def manifest_of(folder) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_self_contained(folder) -> None:
    """The folder holds exactly the files its manifest lists (no checkpoint, no optimizer state), by relative
    path, each with its true size and sha256."""
    manifest = manifest_of(folder)
    base = manifest["base"]
    records = {base["vit_checkpoint"]["path"]: base["vit_checkpoint"], manifest["tokenizer"]["file"]:
               manifest["tokenizer"], manifest["tensors"]["file"]: manifest["tensors"]}
    records.update({f"{base['llama_dir']['path']}/{name}": entry for name, entry in base["llama_dir"]["files"].items()})
    assert set(records) | {MANIFEST_FILE} == {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    for path, entry in records.items():
        assert not path.startswith("/")
        assert (entry["size"], entry["sha256"]) == ((folder / path).stat().st_size, sha256(folder / path)), path


# ------------------------------------------------------------------------------------------------ export

def test_a_fit_run_exports_its_latest_model_which_loads_after_a_move(fit_run, pixels, tmp_path):
    code, printed, _ = export(fit_run, "--out", tmp_path / "exported")
    assert code == 0 and "wrote" in printed
    assert_self_contained(tmp_path / "exported")
    card = manifest_of(tmp_path / "exported")["card"]
    trained_sha = manifest_of(fit_run / "model_epoch_1")["tensors"]["sha256"]
    assert card["model_id"] == f"pancreas_stage-{trained_sha[:8]}"  # the run's name, not model_epoch_1
    assert (card["description"], card["synthetic"]) == ("", False) and card["created"]
    moved = shutil.move(tmp_path / "exported", tmp_path / "elsewhere" / "demo")
    expected = load_model(fit_run / "model_epoch_1").first_token_logits(pixels, QUESTIONS)
    torch.testing.assert_close(load_model(moved).first_token_logits(pixels, QUESTIONS), expected, rtol=0, atol=0)

    assert export(fit_run, "--epoch", 0, "--out", tmp_path / "first")[0] == 0
    first_sha = manifest_of(fit_run / "model_epoch_0")["tensors"]["sha256"]
    assert manifest_of(tmp_path / "first")["tensors"]["sha256"] == first_sha != trained_sha


def test_a_model_folder_exports_with_its_card_and_outlives_its_base_files(upstream, pixels, tmp_path):
    model, source = private_model(upstream, tmp_path / "private")
    code, printed, _ = export(source, "--out", tmp_path / "exported", "--model-id", "tiny-demo-1",
                              "--description", "a tiny test model", "--synthetic")
    assert code == 0 and "synthetic demonstration model tiny-demo-1" in printed
    shutil.rmtree(tmp_path / "private")  # the originals are gone: the copies must be enough
    moved = shutil.move(tmp_path / "exported", tmp_path / "moved")
    assert_self_contained(moved)
    card = manifest_of(moved)["card"]
    assert (card["model_id"], card["description"], card["synthetic"]) == ("tiny-demo-1", "a tiny test model", True)
    torch.testing.assert_close(load_model(moved, verify_hashes=True).first_token_logits(pixels, QUESTIONS),
                               model.first_token_logits(pixels, QUESTIONS), rtol=0, atol=0)
    with contextlib.redirect_stdout(io.StringIO()) as described:
        assert backend_cli.main(["info", str(moved), "--verify-hashes"]) == 0
    assert "card: tiny-demo-1 (synthetic demonstration model" in described.getvalue()
    assert f"EVA ViT file: {moved.resolve() / 'base' / 'eva_vit.pth'}" in described.getvalue()
    assert export(moved, "--out", tmp_path / "again")[0] == 0  # re-exporting keeps the card
    assert manifest_of(tmp_path / "again")["card"]["model_id"] == "tiny-demo-1"
    assert demo_model.model_card(tmp_path / "again")["synthetic"] is True


def test_an_occupied_or_overlapping_target_is_refused_unless_forced(upstream, tmp_path):
    _, source = private_model(upstream, tmp_path / "private")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = export(source, "--out", out)
    assert code == 2 and "already holds files" in err and "--force" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = export(source, "--out", source / "inside", "--force")
    assert code == 2 and "overlaps" in err
    code, _, err = export(source, "--out", tmp_path, "--force")  # would delete the source with the old folder
    assert code == 2 and "overlaps" in err
    assert export(source, "--out", out, "--force")[0] == 0
    assert not (out / "notes.txt").exists() and (out / MANIFEST_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "private"]  # no staging folder left


def test_a_broken_source_is_one_line_and_writes_nothing(upstream, fit_run, tmp_path):
    _, source = private_model(upstream, tmp_path / "private")
    (tmp_path / "private" / "base" / "eva_vit_g.pth").unlink()
    cases = [
        ([source], "eva_vit_g.pth: missing"),
        ([tmp_path / "nothing"], "model folder not found"),
        ([fit_run, "--epoch", 7], "has no model_epoch_7 (saved: ['model_epoch_0', 'model_epoch_1'])"),
        ([fit_run / "model_epoch_1", "--epoch", 1], "is a model folder, not a fit output folder"),
        ([fit_run / "model_epoch_1", "--model-id", " "], "--model-id must be"),
    ]
    for argv, message in cases:
        code, _, err = export(*argv, "--out", tmp_path / "out")
        assert code == 2 and message in err and "\n" not in err and "Traceback" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["private"]  # no out, no staging folder


def test_a_base_file_changed_in_place_is_caught_while_copying(upstream, tmp_path):
    _, source = private_model(upstream, tmp_path / "private")
    weights = tmp_path / "private" / "base" / "llama" / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size: only the sha256 recorded at save time can tell
    weights.write_bytes(bytes(data))
    code, _, err = export(source, "--out", tmp_path / "out")
    assert code == 2 and "pytorch_model.bin is not the file the model was saved with" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private"]


# ---------------------------------------------------------------------------------------- relative paths

def test_relative_base_paths_are_resolved_against_the_model_folder(upstream, pixels, tmp_path, monkeypatch):
    model, folder = private_model(upstream, tmp_path / "private")
    shutil.move(tmp_path / "private" / "base", folder / "weights")
    manifest = manifest_of(folder)
    manifest["base"]["vit_checkpoint"]["path"] = "weights/eva_vit_g.pth"
    manifest["base"]["llama_dir"]["path"] = "weights/llama"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)  # not the model folder: paths must not depend on where the command runs
    base, problems = check_base_files(manifest, verify_hashes=True, model_dir=folder)
    assert problems == [] and base.vit_checkpoint == (folder / "weights" / "eva_vit_g.pth").resolve()
    loaded = load_model(folder)
    torch.testing.assert_close(loaded.first_token_logits(pixels, QUESTIONS),
                               model.first_token_logits(pixels, QUESTIONS), rtol=0, atol=0)
    resaved = manifest_of(save_model_dir(loaded, tmp_path / "resaved"))  # e.g. fit starting from it
    assert resaved["base"]["vit_checkpoint"]["path"] == str(base.vit_checkpoint)  # absolute again


def test_provenance_is_recorded_relative_to_the_working_directory(upstream, tmp_path, monkeypatch):
    """A model built in a checkout and bundled must not carry the builder's home folder in its manifest."""
    _, source = private_model(upstream, tmp_path / "build" / "private")
    monkeypatch.chdir(tmp_path / "build")
    assert export(source, "--out", tmp_path / "build" / "exported")[0] == 0
    assert manifest_of(tmp_path / "build" / "exported")["exported_from"] == "private/model"
    monkeypatch.chdir(tmp_path / "build" / "exported")  # the source is outside: absolute, still traceable
    assert export(source, "--out", tmp_path / "again")[0] == 0
    assert manifest_of(tmp_path / "again")["exported_from"] == str(source)


# ------------------------------------------------------------------------------------- bundled demo model

def test_the_bundled_model_lookup_says_how_to_build_it_when_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(demo_model.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(demo_model, "DEMO_MODEL_DIR", tmp_path / "model")
    with pytest.raises(demo_model.DemoModelError) as missing:
        demo_model.bundled_model_dir()
    assert "minigpt-pancreas-train cascade training/configs/demo/cascade.json" in str(missing.value)
    assert str(tmp_path / "model") in str(missing.value) and "--model" in str(missing.value)
    monkeypatch.setenv(demo_model.ENVIRONMENT_VARIABLE, str(tmp_path / "elsewhere"))
    with pytest.raises(demo_model.DemoModelError, match=r"\$MINIGPT_PANCREAS_DEMO_MODEL points at .*elsewhere"):
        demo_model.bundled_model_dir()


def test_a_folder_without_a_card_is_named_after_itself(upstream, tmp_path, monkeypatch):
    _, folder = private_model(upstream, tmp_path / "private")
    monkeypatch.setenv(demo_model.ENVIRONMENT_VARIABLE, str(folder))
    assert demo_model.bundled_model_dir() == folder
    assert demo_model.model_card(folder) == {"model_id": "model", "description": "", "synthetic": False,
                                             "created": None}
    assert demo_model.default_model_notice(folder) == f"Using the bundled demo model model: {folder}"
    assert demo_model.MANIFEST_FILE == MANIFEST_FILE


def test_the_demo_model_package_imports_without_torch():
    code = "import sys, backend.demo_model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
