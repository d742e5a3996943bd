"""`minigpt-pancreas-train fit` on a tiny model of the real code and a tiny prepared dataset: the LR schedule,
learning, exact resumption, upstream-loadable checkpoints, the cascade, the sampler, the prompts and the errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from backend.checkpoints import load_upstream
from backend.image import preprocess_image
from backend.model_dir import load_model
from backend.prompts import REFER_TEMPLATES, TC_INSTRUCTION_TEMPLATES, TC_QUESTIONS
from backend.tiny_upstream import TinySizes
from small_prepared import prepare_small_msd
from tiny_upstream_models import build_tiny_upstream
from training.cli import main
from training.config import FitConfigError, load_config, parse_config
from training.data import DataError, MultiTaskSampler, TaskDataset, TrainingData, training_example
from training.fit import build_optimizer, fit, load_starting_model, lr_at, slow_bfloat16_note

SIZE = TinySizes().image_size
QUESTIONS = ["[refer] give me the location of the pancreas", "[vqa] is there a tumor?"]
PANCREAS, TC = "tasks/pancreas_detection_msd_train.json", "tasks/tumor_classification_train.json"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return build_tiny_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`prepare` output for two small MSD phantoms (one train volume, one test volume)."""
    return prepare_small_msd(tmp_path_factory.mktemp("data"))


def settings(upstream, prepared, out, **overrides) -> dict:
    data = {"output_dir": str(out), "stage": "test",
            "model": {"vit_checkpoint": str(upstream.vit_checkpoint), "llama_dir": str(upstream.llama_dir),
                      "checkpoint": str(upstream.minigpt_checkpoint), "image_size": SIZE},
            "datasets": [{"task_file": str(prepared / PANCREAS), "sample_ratio": 3},
                         {"task_file": str(prepared / TC), "sample_ratio": 1}],
            "batch_size": 2, "iters_per_epoch": 4, "max_epoch": 2, "warmup_steps": 2, "init_lr": 1e-3,
            "num_workers": 2}
    data.update(overrides)
    return data


def config_file(tmp_path, data: dict, name: str = "fit.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def logged_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    return [r["loss"] for r in steps]


@pytest.fixture(scope="module")
def straight_run(upstream, prepared, tmp_path_factory):
    """6 uninterrupted steps (epochs of 4: a checkpoint after step 4 and one at the end)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    cfg = parse_config(settings(upstream, prepared, out, max_steps=6), out.parent)
    with contextlib.redirect_stdout(io.StringIO()):
        return out, fit(cfg)


# --------------------------------------------------------------------------------------------- schedule

def test_lr_follows_upstreams_linear_warmup_then_cosine():
    cfg = parse_config({"output_dir": "o", "model": {"model_dir": "m"}, "datasets": [{"task_file": "t"}]}, Path("/"))
    assert (cfg.init_lr, cfg.min_lr, cfg.warmup_lr, cfg.warmup_steps, cfg.total_steps) == (1e-5, 1e-6, 1e-6, 1000,
                                                                                          50000)
    expected = {0: 1e-6, 500: 1e-6 + 9e-6 * 500 / 1000, 999: 1e-6 + 9e-6 * 0.999,
                1000: 1e-6 + 4.5e-6 * (1 + 0.99802672842827156),  # cos(pi * 1000 / 50000) = cos(pi / 50)
                25000: 1e-6 + 4.5e-6, 37500: 1e-6 + 4.5e-6 * (1 - math.sqrt(2) / 2), 50000: 1e-6}
    for step, lr in expected.items():
        assert lr_at(step, cfg) == pytest.approx(lr, rel=1e-12, abs=1e-18), step
    # upstream passes the iteration within the epoch to the warmup, so a warmup longer than an epoch restarts
    long_warmup = parse_config({"output_dir": "o", "model": {"model_dir": "m"}, "datasets": [{"task_file": "t"}],
                                "warmup_steps": 1500}, Path("/"))
    assert lr_at(1000, long_warmup) == pytest.approx(1e-6)
    assert lr_at(1200, long_warmup) == pytest.approx(1e-6 + 9e-6 * 200 / 1500)
    assert lr_at(1500, long_warmup) == pytest.approx(1e-6 + 4.5e-6 * (1 + math.cos(math.pi * 1500 / 50000)))
    no_warmup = parse_config({"output_dir": "o", "model": {"model_dir": "m"}, "datasets": [{"task_file": "t"}],
                              "warmup_steps": 0}, Path("/"))
    assert lr_at(0, no_warmup) == 1e-5


# ------------------------------------------------------------------------------------------------- learning

def test_loss_falls_on_a_fixed_batch_and_only_lora_and_llama_proj_change(upstream, prepared, tmp_path):
    out = tmp_path / "overfit"
    task = {"task_file": str(prepared / PANCREAS)}
    # Every batch is the whole dataset: a handful of slices, how many depends on the phantom patient.
    size = len(TaskDataset(parse_config(settings(upstream, prepared, out, datasets=[task]), tmp_path).datasets[0]))
    assert 3 <= size <= 12
    cfg = parse_config(settings(upstream, prepared, out, datasets=[task], batch_size=size, iters_per_epoch=30,
                                max_epoch=1, warmup_steps=0, init_lr=1e-2), tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        trained = fit(cfg).model
    losses = logged_losses(out)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.6 * losses[0]

    fresh = load_starting_model(cfg, torch.float32, torch.device("cpu"))
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("llama_proj.") or ".lora_" in name for name in trainable)
    assert len(trainable) == 2 + 2 * 2 * 2  # llama_proj weight/bias + A/B of q_proj/v_proj in 2 layers
    before, after = fresh.state_dict(), trained.state_dict()
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == (name in trainable), name
    optimizer = build_optimizer(fresh, cfg)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0
    assert {n for n, p in fresh.named_parameters() if id(p) in decayed} == trainable - {"llama_proj.bias"}


def test_resumed_run_equals_the_uninterrupted_one(upstream, prepared, straight_run, tmp_path, capsys):
    straight_out, straight = straight_run
    out = tmp_path / "resumed"
    config = config_file(tmp_path, settings(upstream, prepared, out))
    assert main(["fit", str(config), "--max-steps", "3"]) == 0  # stops inside epoch 0
    assert json.loads((out / "latest.json").read_text())["step"] == 3
    assert main(["fit", str(config), "--max-steps", "6"]) == 2  # the run exists: --resume or --force needed
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", str(config), "--max-steps", "6", "--resume"]) == 0

    assert logged_losses(out) == pytest.approx(logged_losses(straight_out), abs=1e-6)
    resumed = torch.load(out / "checkpoint_1.pth", weights_only=True)
    assert resumed["step"] == 6 and resumed["epoch"] == 1
    expected = straight.model.trainable_state_dict()
    assert resumed["model"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6)


def test_checkpoint_and_model_folder_load_back_with_the_same_outputs(upstream, straight_run):
    out, result = straight_run
    assert json.loads((out / "latest.json").read_text()) == result.latest
    assert result.latest == {"step": 6, "epoch": 1, "epoch_complete": False, "checkpoint": "checkpoint_1.pth",
                             "model_dir": "model_epoch_1"}
    checkpoint = torch.load(out / "checkpoint_1.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "config"} <= checkpoint.keys()
    assert all(".default." not in name for name in checkpoint["model"])  # peft 0.2.0 names, as upstream wrote
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in checkpoint["model"]
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    expected = result.model.first_token_logits(pixels, QUESTIONS)
    from_pth = load_upstream(upstream.vit_checkpoint, upstream.llama_dir, out / "checkpoint_1.pth", image_size=SIZE)
    torch.testing.assert_close(from_pth.first_token_logits(pixels, QUESTIONS), expected, rtol=0, atol=1e-5)
    from_folder = load_model(out / "model_epoch_1")
    torch.testing.assert_close(from_folder.first_token_logits(pixels, QUESTIONS), expected, rtol=0, atol=1e-5)
    first_epoch = load_model(out / "model_epoch_0").first_token_logits(pixels, QUESTIONS)
    assert not torch.allclose(first_epoch, expected, atol=1e-3)  # epoch 0's folder holds step 4's weights


def test_a_later_stage_starts_from_the_previous_stage(upstream, prepared, straight_run, tmp_path):
    stage_one, result = straight_run
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    data = settings(upstream, prepared, tmp_path / "stage2", model={"previous_stage": str(stage_one)},
                    datasets=[{"task_file": str(prepared / TC)}], max_steps=2)
    cfg = load_config(config_file(tmp_path, data))
    start = load_starting_model(cfg, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(start.first_token_logits(pixels, QUESTIONS[1]),
                               result.model.first_token_logits(pixels, QUESTIONS[1]), rtol=0, atol=1e-5)
    with contextlib.redirect_stdout(io.StringIO()):
        assert fit(cfg).step == 2
    data["model"]["epoch"] = 7
    with pytest.raises(FitConfigError, match="model_epoch_7.*model_epoch_0"):
        load_config(config_file(tmp_path, data))


def test_gradient_checkpointing_gives_the_same_losses(upstream, prepared, straight_run, tmp_path):
    straight_out, _ = straight_run
    cfg = parse_config(settings(upstream, prepared, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True),
                       tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        layers = fit(cfg).model.llama_model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert logged_losses(tmp_path / "ckpt") == pytest.approx(logged_losses(straight_out)[:3], abs=1e-5)


# ----------------------------------------------------------------------------------------------------- data

def test_sampler_follows_sample_ratios_and_covers_each_dataset_per_pass():
    sampler = MultiTaskSampler([6, 6, 6], [1, 2, 7], batch_size=2, seed=3)
    draws = [sampler.next() for _ in range(4000)]
    counts = [sum(1 for d, _ in draws if d == k) for k in range(3)]
    for count, share in zip(counts, (0.1, 0.2, 0.7)):
        assert abs(count - 4000 * share) < 4 * math.sqrt(4000 * share * (1 - share)), counts
    first = [indices for d, indices in draws if d == 0]
    for start in (0, 3, 6):  # 3 batches of 2 = one pass over 6 entries: each entry exactly once
        assert sorted(sum(first[start:start + 3], [])) == list(range(6))
    assert first[0:3] != first[3:6]  # every pass is shuffled anew
    ranks = [MultiTaskSampler([7], [1], 1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    shards = [[ranks[r].next()[1][0] for _ in range(3)] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0] + shards[1])) == 6  # 7th dropped


def test_examples_use_upstreams_prompt_pools_and_the_prepared_images(prepared):
    config = parse_config({"output_dir": "o", "model": {"model_dir": "m"},
                           "datasets": [{"task_file": str(prepared / PANCREAS)}, {"task_file": str(prepared / TC)}]},
                          prepared)
    detection, classification = (TaskDataset(spec) for spec in config.datasets)
    rng = random.Random(0)
    refer = {training_example(detection.entries[0], rng) for _ in range(300)}
    assert {instruction for instruction, _ in refer} == {t.format("pancreas") for t in REFER_TEMPLATES}
    assert {answer for _, answer in refer} == {detection.entries[0]["answer"]}
    assert detection.entries[0]["answer"].startswith("{<")
    tc = {training_example(entry, rng) for entry in classification.entries for _ in range(300)}
    assert {i for i, _ in tc} == {t.format(q) for t in TC_INSTRUCTION_TEMPLATES for q in TC_QUESTIONS}
    assert {a for _, a in tc} == {"yes", "no"}
    data = TrainingData(config.datasets, batch_size=2, image_size=SIZE, seed=0, num_workers=2)
    batch = data.next_batch()
    data.close()
    source = (detection, classification)[batch.dataset]
    assert batch.pixels.shape == (2, 3, SIZE, SIZE)
    matches = [i for i, path in enumerate(source.image_paths)
               if torch.equal(preprocess_image(Image.open(path), SIZE), batch.pixels[0])]
    assert matches and batch.answers[0] == training_example(source.entries[matches[0]], random.Random())[1]


def test_batches_decoded_ahead_are_the_batches_drawn_in_step_and_a_resume_continues_them(prepared):
    config = parse_config({"output_dir": "o", "model": {"model_dir": "m"}, "augment": True,
                           "datasets": [{"task_file": str(prepared / PANCREAS)}, {"task_file": str(prepared / TC)}]},
                          prepared)

    def loader(workers: int) -> TrainingData:
        return TrainingData(config.datasets, batch_size=2, image_size=SIZE, seed=3, num_workers=workers,
                            augment=config.augment)

    def same(a, b) -> bool:
        return (a.dataset, a.instructions, a.answers) == (b.dataset, b.instructions, b.answers) \
            and torch.equal(a.pixels, b.pixels)

    in_step, ahead = loader(0), loader(2)
    for _ in range(3):
        assert same(in_step.next_batch(), ahead.next_batch())
    resumed = loader(2)
    resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))  # as a checkpoint stores it
    for _ in range(3):
        expected = in_step.next_batch()
        assert same(expected, ahead.next_batch()) and same(expected, resumed.next_batch())
    for data in (in_step, ahead, resumed):
        data.close()


# --------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(init_lrr=1e-5), r"unknown key 'init_lrr' \(did you mean 'init_lr'\?\)"),
    (lambda d: d["datasets"][0].update(sample_rato=2), r"datasets\[0\]: unknown key 'sample_rato'"),
    (lambda d: d.update(batch_size="16"), r"'batch_size' must be an integer > 0"),
    (lambda d: d["datasets"][1].update(sample_ratio=0), r"datasets\[1\].sample_ratio must be a number > 0"),
    (lambda d: d["model"].update(model_dir="m"), r"model: give exactly one of"),
    (lambda d: d.update(precision="fp16"), r"'precision' must be one of auto, float32, float16, bfloat16"),
    (lambda d: d.update(grad_accumulation=3), r"multiples of 'grad_accumulation'"),
    (lambda d: d.update(augment={"zoom": [1.2, 0.8]}), r"'augment'.zoom must be \[low, high\]"),
    (lambda d: d.update(augment={"shift": 0.7}), r"'augment'.shift must be at most 0.5"),
    (lambda d: d.update(augment={"rotate": 10}), r"'augment' must be true, false or"),
    (lambda d: d.update(augment={"window": 0.5}), r"'augment'.window must be at most 0.4"),
    (lambda d: d.update(augment={"gamma": [0, 2]}), r"'augment'.gamma must be \[low, high\]"),
    (lambda d: d.update(answer_value=-1), r"'answer_value' must be a number >= 0"),
    (lambda d: d.update(patch_grounding=1.0), r"'patch_grounding' trains the vision tower"),
    (lambda d: d.update(train="vision"), r"\"vision\" trains the tower on the patch-grounding loss alone"),
    (lambda d: d.update(train="vision", patch_grounding=1.0, answer_value=1.0), r"leave 'answer_value' at 0"),
    (lambda d: d["datasets"][0].update(task_file=d["datasets"][0]["task_file"].replace("pancreas", "nope")),
     r"datasets\[0\].task_file: .*nope_detection_msd_train.json does not exist.*prepare"),
])
def test_config_mistakes_are_refused_naming_the_key(upstream, prepared, tmp_path, edit, message):
    data = settings(upstream, prepared, tmp_path / "out")
    edit(data)
    with pytest.raises(FitConfigError, match=message):
        load_config(config_file(tmp_path, data))


def test_missing_image_is_named_before_anything_is_written(upstream, prepared, tmp_path):
    entries = json.loads((prepared / PANCREAS).read_text())
    entries[1] = {**entries[1], "image": "msd/slices/gone_slice_3.png"}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "edited_train.json").write_text(json.dumps(entries))
    datasets = [{"task_file": "tasks/edited_train.json", "images_root": str(prepared)}]
    cfg = parse_config(settings(upstream, prepared, tmp_path / "out", datasets=datasets), tmp_path)
    with pytest.raises(DataError, match=rf"1 of {len(entries)} images .* missing, e\.g\. .*gone_slice_3\.png"):
        fit(cfg)
    assert not (tmp_path / "out").exists()


def test_unusable_entries_and_unreadable_images_are_named(prepared, tmp_path):
    entry = json.loads((prepared / TC).read_text())[0]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = {"maybe.json": [{**entry, "answer": "maybe"}], "broken.json": [{**entry, "image": "broken.png"}]}
    for name, entries in cases.items():
        (tmp_path / "tasks" / name).write_text(json.dumps(entries))

    def specs(name: str):
        return parse_config({"output_dir": "o", "model": {"model_dir": "m"},
                             "datasets": [{"task_file": f"tasks/{name}"}]}, tmp_path).datasets

    with pytest.raises(DataError, match=r"maybe.json, entry 0 .*answer 'maybe' is not yes/no"):
        TaskDataset(specs("maybe.json")[0])
    data = TrainingData(specs("broken.json"), batch_size=1, image_size=SIZE, seed=0)
    with pytest.raises(DataError, match=r"cannot read image .*broken.png"):
        data.next_batch()


def test_output_folder_of_another_run_is_refused_unless_forced(upstream, prepared, tmp_path, capsys):
    out = tmp_path / "out"
    first = config_file(tmp_path, settings(upstream, prepared, out, max_steps=2), "first.json")
    other = config_file(tmp_path, settings(upstream, prepared, out, max_steps=2, init_lr=5e-4), "other.json")
    assert main(["fit", str(first)]) == 0
    for flags in ([], ["--resume"]):
        assert main(["fit", str(other), *flags]) == 2
        assert "holds a different run (it differs in: init_lr)" in capsys.readouterr().err
    assert main(["fit", str(other), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["init_lr"] == 5e-4
    assert len(logged_losses(out)) == 2  # the first run's log went with it
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    foreign = config_file(tmp_path, settings(upstream, prepared, tmp_path / "foreign"), "foreign.json")
    assert main(["fit", str(foreign)]) == 2
    assert "not empty and holds no fit run" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_float16_on_cpu_is_refused_with_advice(upstream, prepared, tmp_path):
    cfg = parse_config(settings(upstream, prepared, tmp_path / "out", precision="float16", device="cpu"), tmp_path)
    with pytest.raises(FitConfigError, match="float16 training needs a CUDA device; use bfloat16 or float32"):
        fit(cfg)


def test_example_configs_chain_the_cascade_with_upstreams_settings():
    folder = Path(__file__).resolve().parents[1] / "training" / "configs"
    configs = {path.stem: parse_config(json.loads(path.read_text()), folder, path.name)
               for path in folder.glob("*.json") if path.stem != "cascade"}  # cascade.json: test_cascade.py
    assert set(configs) == {"pancreas_detection", "tumor_classification", "tumor_detection", "multi_organ"}
    for config in configs.values():
        assert (config.init_lr, config.min_lr, config.warmup_lr, config.warmup_steps, config.weight_decay,
                config.iters_per_epoch, config.max_epoch, config.batch_size) == (1e-5, 1e-6, 1e-6, 1000, 0.05,
                                                                                 1000, 50, 16)
    assert configs["pancreas_detection"].model.kind == configs["multi_organ"].model.kind == "upstream"
    assert configs["tumor_classification"].model.previous_stage == configs["pancreas_detection"].output_dir
    assert configs["tumor_detection"].model.previous_stage == configs["tumor_classification"].output_dir
    assert [d.task_file.name for d in configs["tumor_detection"].datasets] == ["tumor_detection_msd_train.json"]


@pytest.mark.slow
def test_two_processes_with_torchrun_train_and_save_once(upstream, prepared, tmp_path):
    """DistributedDataParallel on CPU (gloo): two processes, gradient accumulation, one set of files."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    config = config_file(tmp_path, settings(upstream, prepared, out, batch_size=1, grad_accumulation=2,
                                            max_steps=4, num_workers=0))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.cli", "fit", str(config)]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 4 steps") == 1
    checkpoint = torch.load(out / "checkpoint_0.pth", weights_only=True)
    states = checkpoint["random_states"]
    assert checkpoint["step"] == 4 and len(states) == 2
    assert states[0]["data"]["prompt_rng"] != states[1]["data"]["prompt_rng"]  # each process its own stream
    assert len(logged_losses(out)) == 4
    load_model(out / "model_epoch_0")


def test_bfloat16_on_a_cpu_without_native_bfloat16_is_named_as_slow(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpu = torch.device("cpu")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert "float32" in slow_bfloat16_note(torch.bfloat16, cpu, cpuinfo)
    assert slow_bfloat16_note(torch.float32, cpu, cpuinfo) is None
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    assert slow_bfloat16_note(torch.bfloat16, cpu, cpuinfo) is None
    assert slow_bfloat16_note(torch.bfloat16, cpu, tmp_path / "missing") is None
