"""`minigpt-pancreas-train cascade` end to end on a miniature of the demo cascade: synthetic datasets in the three
public layouts, `prepare` with a validation split, a from-scratch stage 0 and the LoRA stages, each starting from
the epoch its predecessor chose on the validation split, then evaluation on the test split and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backend.model_dir import load_model, read_manifest
from training.cascade_config import load_cascade
from training.config import FitConfigError
from training.cli import main

TINY = {"image_size": 32, "patch_size": 8, "vit_width": 88, "vit_depth": 1, "vit_mlp_hidden": 128,
        "llm_hidden": 32, "llm_layers": 1, "llm_heads": 2, "llm_intermediate": 64, "lora_r": 4}
LORA_FIT = {"init_lr": 1e-3, "warmup_steps": 1, "iters_per_epoch": 2, "max_epoch": 2}


def miniature(out: Path) -> dict:
    stage = lambda name, start, tasks, select: {  # noqa: E731 - a table of stages reads best this way
        "name": name, "start": start, "datasets": [{"task": task, "sample_ratio": 1} for task in tasks],
        "fit": LORA_FIT, "select": {"tasks": select, "limit": 3}}
    return {
        "output_dir": str(out / "run"),
        "data": {"phantoms": {"msd": 5, "nih": 3, "abdomenct1k": 4, "seed": 7, "coarsen": 3},
                 "prepare": {"test_ratio": 0.25, "val_ratio": 0.25, "threshold": 0.0, "workers": 1}},
        "fit": {"batch_size": 2, "device": "cpu", "num_workers": 0, "log_every": 1, "seed": 3},
        "stages": [
            {"name": "tower", "start": {"scratch": TINY},  # no "select": the last epoch is kept
             "datasets": [{"task": "multi_organ_abdomenct1k", "sample_ratio": 1}],
             "fit": {"train": "vision", "init_lr": 5e-3, "warmup_steps": 2, "iters_per_epoch": 6, "max_epoch": 2,
                     "patch_grounding": 1.0}},
            {"name": "base", "start": "tower",
             "datasets": [{"task": "multi_organ_abdomenct1k", "sample_ratio": 1},
                          {"task": "pancreas_detection_msd", "sample_ratio": 1}],
             "fit": {"train": "all", "init_lr": 5e-3, "warmup_steps": 2, "iters_per_epoch": 10, "max_epoch": 2,
                     "patch_grounding": 1.0, "grad_clip": 1.0},
             "select": {"tasks": ["pancreas_detection_msd"], "limit": 3}},
            stage("pancreas_detection", "base", ["pancreas_detection_msd", "pancreas_detection_nih"],
                  ["pancreas_detection_msd"]),
            stage("tumor_classification", "pancreas_detection", ["tumor_classification"], ["tumor_classification"]),
            stage("tumor_detection", "tumor_classification", ["tumor_detection_msd", "tumor_classification"],
                  ["tumor_detection_msd"]),
            stage("multi_organ", "base", ["multi_organ_abdomenct1k"], ["multi_organ_abdomenct1k"]),
        ],
        "final": "tumor_detection",
        "evaluate": {"limit": 3, "batch_size": 4},
        "export": {"out": str(out / "exported" / "model"), "model_id": "mini-cascade", "synthetic": True,
                   "half_base": True,
                   "description": "miniature cascade of the test suite"},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The miniature cascade run once by the command line; (its folder, the cascade dict, the output)."""
    out = tmp_path_factory.mktemp("cascade")
    cascade = miniature(out)
    (out / "cascade.json").write_text(json.dumps(cascade))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out)  # as a builder in a checkout: the report records paths relative to it
        assert main(["cascade", str(out / "cascade.json")]) == 0
    return out, cascade


def assert_loss_falls(stage_dir: Path) -> None:
    """The mean of the last three logged losses is well below that of the first three."""
    records = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_each_stage_starts_from_the_epoch_its_predecessor_chose(finished):
    out, cascade = finished
    state = json.loads((out / "run" / "cascade_state.json").read_text())
    for stage in cascade["stages"][1:]:
        recorded = json.loads((out / "run" / "stages" / stage["name"] / "config.json").read_text())["model"]
        chosen = state["stages"][stage["start"]]["chosen_epoch"]
        assert recorded["epoch"] == chosen
        assert Path(recorded["previous_stage"]).name == stage["start"]
        scores = state["stages"][stage["start"]]["scores"]
        if scores:
            assert scores[str(chosen)] == max(scores.values())  # the best validation score wins
        else:  # a stage without "select" (the tower) hands on its last epoch
            assert chosen == 1 and not (out / "run" / "stages" / stage["start"] / "validation").exists()


def test_the_tower_stage_trains_the_vision_tower_alone(finished):
    out, _ = finished
    tower = out / "run" / "stages" / "tower"
    assert_loss_falls(tower)
    initial, trained = load_model(tower / "model_epoch_0"), load_model(tower / "model_epoch_1")
    changed = lambda part: any(not torch.equal(a, b) for a, b in zip(  # noqa: E731
        part(initial).state_dict().values(), part(trained).state_dict().values()))
    assert changed(lambda model: model.visual_encoder)
    assert not changed(lambda model: model.llama_model) and not changed(lambda model: model.llama_proj)


def test_validation_uses_the_val_split_never_the_test_split(finished):
    out, _ = finished
    prepared = out / "run" / "prepared"
    validation = out / "run" / "stages" / "base" / "validation" / "epoch_0" / "predictions"
    def images(split: str) -> set[str]:
        return {e["image"] for e in json.loads((prepared / "tasks" / f"pancreas_detection_msd_{split}.json").read_text())}

    val_images, test_images = images("val"), images("test")
    lines = (validation / "pancreas_detection_msd.jsonl").read_text().splitlines()
    answered = {json.loads(line)["image"] for line in lines}
    assert answered and answered <= val_images and not answered & test_images


def test_stage_zero_loss_falls_and_trains_the_base(finished):
    out, _ = finished
    base = out / "run" / "stages" / "base"
    assert_loss_falls(base)
    manifest = read_manifest(base / "model_epoch_1")
    assert manifest["base"]["vit_checkpoint"]["path"] == "base/eva_vit.pth"  # its own trained base, relative
    lora_b = {name: tensor for name, tensor in load_file(base / "model_epoch_1" / manifest["tensors"]["file"]).items()
              if ".lora_B." in name}
    assert lora_b and all(not tensor.any() for tensor in lora_b.values())  # LoRA left without effect for stage 1


def test_the_final_model_is_evaluated_and_exported_with_its_report(finished, tmp_path):
    out, _ = finished
    metrics = json.loads((out / "run" / "evaluation" / "metrics.json").read_text())
    assert {"pancreas_detection_msd", "tumor_classification", "multi_organ_abdomenct1k"} <= set(metrics["tasks"])
    exported = out / "exported" / "model"
    assert read_manifest(exported)["card"]["model_id"].startswith("mini-cascade-")  # + the weights' hash
    run = json.loads((out / "run" / "evaluation" / "run.json").read_text())
    assert run["model"] == "exported/model"  # the report describes the exported (float16 base) weights
    assert run["prepared"] == str(out / "run" / "prepared")  # absolute where `rescore` reads it back
    published = out / "exported" / "report"
    assert json.loads((published / "run.json").read_text())["prepared"] == "run/prepared"  # not the builder's path
    assert json.loads((published / "metrics.json").read_text())["run"]["prepared"] == "run/prepared"
    vit = torch.load(exported / "base" / "eva_vit.pth", weights_only=True)
    assert vit["blocks.0.attn.qkv.weight"].dtype == torch.float16
    assert "mini-cascade-" in (out / "exported" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert (out / "exported" / "report" / "tables.md").is_file()
    moved = tmp_path / "elsewhere"
    (out / "exported").rename(moved)  # self-contained: still loads after a move
    assert load_model(moved / "model").config.vision.image_size == TINY["image_size"]


def test_a_second_call_resumes_without_training_again(finished, capsys):
    out, _ = finished
    log = (out / "run" / "stages" / "base" / "log.jsonl").read_text()
    assert main(["cascade", str(out / "cascade.json")]) == 0
    assert (out / "run" / "stages" / "base" / "log.jsonl").read_text() == log
    assert "stage 2/6 base: done" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda c: c["stages"][1].update(start="later"), "not an EARLIER stage"),
    (lambda c: c.update(final="nowhere"), "'final' is 'nowhere'"),
    (lambda c: c["stages"][0]["fit"].update(init_lrr=1), "did you mean 'init_lr'"),
    (lambda c: c["data"].update(prepared="x"), "exactly one of 'prepared'"),
    (lambda c: c["export"].update(halfbase=True), "did you mean 'half_base'"),
    (lambda c: c["data"]["prepare"].update(test_threshold="0"), "data.prepare.test_threshold must be float"),
])
def test_a_bad_cascade_file_is_refused_by_name(tmp_path, change, message):
    cascade = miniature(tmp_path)
    change(cascade)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cascade))
    with pytest.raises(FitConfigError, match=message):  # CascadeConfigError is one
        load_cascade(path)


def test_the_build_time_counts_every_call_up_to_its_last_save_crashed_calls_too(tmp_path, monkeypatch):
    """The model card's build time: a call that crashed after saving progress still counts."""
    import training.cascade as cascade

    clock = iter([0.0, 180.0, 1000.0, 1060.0])  # seconds: start, a save, the next call's start, its save
    monkeypatch.setattr(cascade.time, "monotonic", lambda: next(clock))
    crashed = cascade.CascadeState(tmp_path / "state.json")
    crashed.stage("tower")["chosen_epoch"] = 3
    crashed.save()  # then the call dies: nothing else is saved
    resumed = cascade.CascadeState(tmp_path / "state.json")
    assert resumed.data["minutes"] == 3.0
    resumed.save()
    assert json.loads((tmp_path / "state.json").read_text())["minutes"] == 4.0
