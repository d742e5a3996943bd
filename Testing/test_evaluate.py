"""`minigpt-pancreas-train evaluate`: a tiny model of the real code answers a tiny prepared set end to end; the
scoring is checked on answers written by hand (rescore mode) against hand-computed numbers; resuming answers
only what is missing (counted by a real InferenceEngine subclass)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import backend
from backend.engine import InferenceEngine
from backend.cascade_sweep import TUMOUR_QUESTION
from backend.prompts import TC_EVAL_PROMPT
from SlicerMiniGPTPancreas.grammar import render_box
from SlicerMiniGPTPancreas.metrics import evaluate_detection
from small_prepared import prepare_small_msd
from tiny_upstream_models import build_tiny_upstream
from training.augment import GreyCurve
from training.cli import main
from training.evaluate import evaluate, run_settings
from training.evaluate_tasks import EvaluateError
from training.evaluate_scoring import roc_auc

TASKS = ("pancreas_detection_balanced_msd", "pancreas_detection_msd", "tumor_classification",
         "tumor_detection_balanced_msd", "tumor_detection_msd")
QUICK = ["--device", "cpu", "--batch-size", "3", "--max-new-tokens", "6"]


class CountingEngine(InferenceEngine):
    """The real engine, counting the slices it is asked about."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slices_answered = 0

    def run_rgb(self, images_rgb, prompts, **options):
        self.slices_answered += len(images_rgb)
        self.last_images = images_rgb
        return super().run_rgb(images_rgb, prompts, **options)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`prepare` output for two small MSD phantoms (one test volume)."""
    return prepare_small_msd(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    files = build_tiny_upstream(root / "upstream")
    model = backend.load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint, image_size=56)
    return backend.save_model_dir(model, root / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    return CountingEngine.from_model_dir(model_dir, device="cpu", batch_size=3)


def entries_of(prepared, task) -> list[dict]:
    return json.loads((prepared / "tasks" / f"{task}_test.json").read_text())


def saved(out, task) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]


def write_answers(out: Path, task: str, entries: list[dict], answers: dict) -> None:
    """Hand-written predictions: answers maps q_id -> text, or -> (text, yes probability)."""
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    lines = []
    for entry in entries:
        if entry["q_id"] in answers:
            text, probability = answers[entry["q_id"]] if isinstance(answers[entry["q_id"]], tuple) \
                else (answers[entry["q_id"]], None)
            lines.append(json.dumps({"q_id": entry["q_id"], "image": entry["image"], "prompt": "by hand",
                                     "answer": text, "yes_probability": probability}))
    (out / "predictions" / f"{task}.jsonl").write_text("".join(line + "\n" for line in lines))


def rescore(out, prepared, tasks) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--rescore", "--out", str(out), "--prepared", str(prepared),
                     "--tasks", ",".join(tasks)]) == 0
    return json.loads((out / "metrics.json").read_text())


def floor_box(answer: str, width: int, height: int, scale: float | None = None) -> list[float]:
    """Upstream's decoding: grid value g -> g / 100 * size (or g * scale for AbdomenCT-1K at HEAD)."""
    g = [int(v) for v in re.findall(r"\d+", answer)]
    if scale:
        return [v * scale for v in g]
    return [g[0] / 100 * width, g[1] / 100 * height, g[2] / 100 * width, g[3] / 100 * height]


def hand_iou(a, b, plus: int = 0) -> float:
    """docs/upstream.md 6.1: continuous (plus 0) or the +1 convention of eval_utils.computeIoU (plus 1)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + plus) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + plus)
    area_a, area_b = (a[2] - a[0] + plus) * (a[3] - a[1] + plus), (b[2] - b[0] + plus) * (b[3] - b[1] + plus)
    return inter / (area_a + area_b - inter)


# -------------------------------------------------------------------------------------------- end to end

def test_evaluate_answers_every_test_entry_with_upstreams_prompts_and_writes_tables(prepared, model_dir, engine,
                                                                                     tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--prepared", str(prepared), "--model", str(model_dir), "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv + QUICK) == 0
    assert "wrote" in printed.getvalue()
    for name in ("run.json", "metrics.json", "tables.md", "tables.csv", "iou_histograms.png", "heatmaps.png"):
        assert (out / name).is_file(), name
    for task in TASKS:
        entries, records = entries_of(prepared, task), saved(out, task)
        assert sorted(r["q_id"] for r in records) == sorted(e["q_id"] for e in entries), task
        by_q_id = {r["q_id"]: r for r in records}
        for entry in entries:
            record = by_q_id[entry["q_id"]]
            assert record["image"] == entry["image"]
            if task == "tumor_classification":
                assert record["prompt"] == TC_EVAL_PROMPT and 0.0 < record["yes_probability"] < 1.0
            else:
                assert record["prompt"] == f"[refer] give me the location of the {entry['phrase']}"
                assert record["box_confidence"] is None or 0.0 < record["box_confidence"] <= 1.0
        assert {e.get("phrase") for e in entries} == ({None} if task == "tumor_classification" else
                                                     {"pancreatic tumor"} if "tumor" in task else {"pancreas"})
    # the yes/no set is asked once more with a training prompt, the one upstream's prompt never was
    twin = saved(out, "tumor_classification@training_prompt")
    assert sorted(r["q_id"] for r in twin) == sorted(e["q_id"] for e in entries_of(prepared, "tumor_classification"))
    assert {r["prompt"] for r in twin} == {TUMOUR_QUESTION} and TUMOUR_QUESTION != TC_EVAL_PROMPT
    assert all(0.0 < r["yes_probability"] < 1.0 for r in twin)

    # The saved answers are the engine's answers on those PNGs (same batch of 3, same settings).
    entries = entries_of(prepared, "pancreas_detection_msd")[:3]
    images = [np.asarray(Image.open(prepared / e["image"]).convert("RGB")) for e in entries]
    direct = engine.run_rgb(images, "[refer] give me the location of the pancreas", max_new_tokens=6)
    assert [r.answer for r in direct] == [r["answer"] for r in saved(out, "pancreas_detection_msd")[:3]]

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {*TASKS, "tumor_classification@training_prompt"}
    assert metrics["tasks"]["tumor_classification@training_prompt"]["baseline"]["answer"] in ("yes", "no")
    plain, balanced = metrics["tasks"]["pancreas_detection_msd"], metrics["tasks"]["tumor_detection_balanced_msd"]
    assert set(plain["variants"]) == {"E1", "E2", "E3", "STRICT"}
    n_plain = len(entries_of(prepared, "pancreas_detection_msd"))
    assert all("mean_iou" in plain["variants"][v] and plain["variants"][v]["n"] == n_plain for v in plain["variants"])
    assert "skipped" in balanced["variants"]["E1"]
    assert all(balanced["variants"][v]["tp"] is not None for v in ("E2", "E3", "STRICT"))
    tc = metrics["tasks"]["tumor_classification"]
    assert set(tc["rules"]) == {"upstream", "strict"}
    assert tc["auc"]["n"] == len(entries_of(prepared, "tumor_classification"))
    assert metrics["run"]["model_id"].startswith("sha256:")
    tables = (out / "tables.md").read_text(encoding="utf-8")
    for label in ("IoU E1", "IoU E3", "IoU STRICT", "det. acc. E2", "failures STRICT", "AUC of P(yes)"):
        assert label in tables
    assert "scored against the tumour box" in tables
    rows = (out / "tables.csv").read_text().splitlines()
    assert rows[0].startswith("section,task,dataset,subset,variant")
    # 4 detection tasks x (4 variants + fixed box); 2 yes/no prompts x (2 rules + majority)
    assert len(rows) == 1 + 4 * (4 + 1) + 2 * (2 + 1)
    assert "| tumor_classification@training_prompt | MSD | strict |" in tables
    assert all("mean_iou" in metrics["tasks"][task]["baseline"] for task in TASKS if task != "tumor_classification")
    assert metrics["tasks"]["tumor_classification"]["baseline"]["answer"] in ("yes", "no")
    assert metrics["figures"]["examples"] and all((out / path).is_file() for path in metrics["figures"]["examples"])


def test_a_rerun_answers_only_the_missing_q_ids(prepared, engine, tmp_path):
    out, task = tmp_path / "eval", "pancreas_detection_msd"
    settings = run_settings("tiny", "tiny model", prepared, max_new_tokens=6)
    evaluate(engine, prepared, out, settings, [task])
    first, n = saved(out, task), len(entries_of(prepared, task))
    assert len(first) == n > 5
    # A crash after half: four whole lines and a torn fifth one remain.
    lines = (out / "predictions" / f"{task}.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions" / f"{task}.jsonl").write_text("".join(lines[:4]) + lines[4][:25])
    before = engine.slices_answered
    metrics = evaluate(engine, prepared, out, settings, [task])
    assert engine.slices_answered - before == n - 4
    resumed = saved(out, task)
    assert sorted(r["q_id"] for r in resumed) == list(range(1, n + 1)) and resumed[:4] == first[:4]
    assert metrics["tasks"][task]["n_predicted"] == n
    before = engine.slices_answered
    evaluate(engine, prepared, out, settings, [task])
    assert engine.slices_answered == before

    other = run_settings("another model", "other", prepared, max_new_tokens=6)
    with pytest.raises(EvaluateError, match="another run .*--force"):
        evaluate(engine, prepared, out, other, [task])
    evaluate(engine, prepared, out, other, [task], limit=2, force=True)
    assert engine.slices_answered - before == 2 and len(saved(out, task)) == 2


def test_a_grey_curve_changes_the_slices_the_model_sees_and_is_part_of_the_run(prepared, engine, tmp_path):
    task = "pancreas_detection_msd"
    plain = run_settings("tiny", "tiny model", prepared, max_new_tokens=6)
    evaluate(engine, prepared, tmp_path / "plain", plain, [task], limit=3)
    seen_plain = np.stack(engine.last_images).astype(float)
    darker = run_settings("tiny", "tiny model", prepared, max_new_tokens=6, grey_curve=GreyCurve(0.0, 1.0, 1.5))
    evaluate(engine, prepared, tmp_path / "darker", darker, [task], limit=3)
    seen_darker = np.stack(engine.last_images).astype(float)
    assert seen_darker.shape == seen_plain.shape and (seen_darker <= seen_plain).all()
    soft_tissue = (seen_plain > 60) & (seen_plain < 200)
    assert (seen_plain - seen_darker)[soft_tissue].mean() > 20  # mid greys darken, black and white stay
    assert json.loads((tmp_path / "darker" / "run.json").read_text())["grey_curve"] == [0.0, 1.0, 1.5]
    with pytest.raises(EvaluateError, match="different grey_curve"):  # answers under two curves never mix
        evaluate(engine, prepared, tmp_path / "darker", plain, [task], limit=3)


def test_a_malformed_grey_curve_is_a_one_line_error(prepared, model_dir, tmp_path, capsys):
    for text, message in (("0,1", "three numbers LOW,HIGH,GAMMA"), ("1,0,1", "LOW < HIGH"), ("0,1,0", "GAMMA")):
        assert main(["evaluate", "--prepared", str(prepared), "--model", str(model_dir), "--out",
                     str(tmp_path / "e"), "--grey-curve", text]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------- scoring by hand

def test_truth_answers_score_perfectly_under_strict_and_as_computed_by_hand_under_e3(prepared, tmp_path):
    out = tmp_path / "eval"
    tasks = ("pancreas_detection_msd", "pancreas_detection_balanced_msd")
    for task in tasks:
        entries = entries_of(prepared, task)
        write_answers(out, task, entries, {e["q_id"]: render_box(None if e["bbox"] == [0, 0, 0, 0] else e["bbox"],
                                                                 e["width"], e["height"]) for e in entries})
    metrics = rescore(out, prepared, tasks)

    entries = entries_of(prepared, "pancreas_detection_msd")
    answers = [render_box(e["bbox"], e["width"], e["height"]) for e in entries]
    strict = metrics["tasks"]["pancreas_detection_msd"]["variants"]["STRICT"]
    assert strict["hit_rate"] == 1.0 and strict["detection_accuracy"] == 1.0 and strict["parse_failure_rate"] == 0
    e3 = metrics["tasks"]["pancreas_detection_msd"]["variants"]["E3"]
    sizes = [(e["width"], e["height"]) for e in entries]
    independent = evaluate_detection(answers, [e["bbox"] for e in entries], sizes, "E3").mean_iou
    by_hand = np.mean([hand_iou(floor_box(a, e["width"], e["height"]), e["bbox"]) for a, e in zip(answers, entries)])
    assert e3["mean_iou"] == pytest.approx(independent, abs=1e-12) == pytest.approx(by_hand, abs=1e-12)
    assert e3["mean_iou"] < 1.0  # the grid floor costs IoU even for perfect answers (docs/datasets.md flaw 5)

    balanced_entries = entries_of(prepared, "pancreas_detection_balanced_msd")
    present = sum(e["bbox"] != [0, 0, 0, 0] for e in balanced_entries)
    strict = metrics["tasks"]["pancreas_detection_balanced_msd"]["variants"]["STRICT"]
    assert (strict["tp"], strict["tn"], strict["fp"], strict["fn"]) == (present, len(balanced_entries) - present, 0, 0)
    assert strict["accuracy"] == 1.0 and strict["hit_rate"] == 1.0


def test_unreadable_and_missing_answers_count_in_e1_but_not_in_the_e3_mean(prepared, tmp_path):
    out, task = tmp_path / "eval", "pancreas_detection_msd"
    entries = entries_of(prepared, task)
    answers = {e["q_id"]: render_box(e["bbox"], e["width"], e["height"]) for e in entries[:5]}
    answers.update({entries[5]["q_id"]: "the pancreas is in the middle", entries[6]["q_id"]: "{<12><40>}"})
    write_answers(out, task, entries, answers)  # entries[7:] have no answer at all
    result = rescore(out, prepared, [task])["tasks"][task]
    n = len(entries)

    good = entries[:5]
    boxes = [floor_box(answers[e["q_id"]], e["width"], e["height"]) for e in good]
    e1, e3 = result["variants"]["E1"], result["variants"]["E3"]
    assert (e1["n_scored"], e3["n_scored"], e1["n_failed"], e3["n_missing"]) == (n, 5, n - 5, n - 7)
    assert e1["mean_iou"] == pytest.approx(sum(hand_iou(b, e["bbox"], plus=1) for b, e in zip(boxes, good)) / n)
    assert e3["mean_iou"] == pytest.approx(sum(hand_iou(b, e["bbox"]) for b, e in zip(boxes, good)) / 5)
    assert e1["parse_failure_rate"] == e3["parse_failure_rate"] == (n - 5) / n
    hits = sum(hand_iou(b, e["bbox"]) >= 0.5 for b, e in zip(boxes, good))
    assert e3["detection_accuracy"] == pytest.approx(hits / n) and e3["hit_rate"] == pytest.approx(hits / 5)
    assert result["n_predicted"] == 7
    assert any(f"{n - 7} of {n} test entries have no saved answer" in note for note in json.loads(
        (out / "metrics.json").read_text())["notes"])


def hand_prepared(root: Path, tasks: dict[str, list[dict]]) -> Path:
    """A prepared folder written by hand (rescoring reads only the task files, not the images)."""
    (root / "tasks").mkdir(parents=True)
    for task, entries in tasks.items():
        for q_id, entry in enumerate(entries, start=1):
            entry.update(q_id=q_id, image=f"slices/{task}_{q_id}.png")
        (root / "tasks" / f"{task}_test.json").write_text(json.dumps(entries))
    return root


def test_tumour_classification_rules_and_auc_match_a_hand_count(tmp_path):
    truths = ["yes", "yes", "yes", "no", "no", "no"]
    said = [("yes", 0.9), ("Yes.", 0.8), ("no", 0.4), ("no", 0.3), ("yes", 0.8), ("maybe", 0.5)]
    prepared = hand_prepared(tmp_path / "prep", {"tumor_classification": [{"answer": t, "dataset": "MSD"}
                                                                          for t in truths]})
    entries = entries_of(prepared, "tumor_classification")
    write_answers(tmp_path / "eval", "tumor_classification", entries, {e["q_id"]: s for e, s in zip(entries, said)})
    result = rescore(tmp_path / "eval", prepared, ["tumor_classification"])["tasks"]["tumor_classification"]
    # upstream: "Yes." and "maybe" count as "no" -> TP 1, FN 2, TN 2, FP 1
    upstream = result["rules"]["upstream"]
    assert (upstream["tp"], upstream["fn"], upstream["tn"], upstream["fp"]) == (1, 2, 2, 1)
    assert (upstream["accuracy"], upstream["precision"], upstream["recall"]) == (0.5, 0.5, pytest.approx(1 / 3))
    assert upstream["f1"] == pytest.approx(0.4)
    assert (upstream["specificity"], upstream["npv"], upstream["balanced_accuracy"]) == (
        pytest.approx(2 / 3), 0.5, pytest.approx(0.5))
    # strict: "Yes." is yes, "maybe" is wrong (FP on a "no") -> TP 2, FN 1, TN 1, FP 2
    strict = result["rules"]["strict"]
    assert (strict["tp"], strict["fn"], strict["tn"], strict["fp"], strict["n_unparsed"]) == (2, 1, 1, 2, 1)
    assert strict["recall"] == pytest.approx(2 / 3) and strict["f1"] == pytest.approx(4 / 7)
    assert (strict["specificity"], strict["npv"], strict["balanced_accuracy"]) == (
        pytest.approx(1 / 3), 0.5, pytest.approx(0.5))
    # AUC: positive/negative pairs ranked right: 0.9 beats 3, 0.8 beats 2 and ties 1, 0.4 beats 1 -> 6.5 / 9
    assert result["auc"] == {"value": pytest.approx(6.5 / 9), "n": 6}


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.random(40), 1)  # many ties
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(np.ones(3, bool), np.array([0.1, 0.2, 0.3])) is None


def test_nih_and_msd_are_combined_sample_weighted_and_abdomenct1k_uses_upstreams_fixed_scale(tmp_path):
    def entry(box, size, dataset="ABD", organ=None):
        organ_keys = {"organ": organ} if organ else {}
        return {"bbox": box, "width": size, "height": size, "phrase": organ or "pancreas", "answer": "",
                "dataset": dataset, **organ_keys}

    tasks = {"pancreas_detection_nih": [entry([10, 10, 40, 30], 100, dataset="NIH"),
                                        entry([20, 20, 60, 70], 100, dataset="NIH")],
             "pancreas_detection_msd": [entry([5, 5, 30, 25], 50, dataset="MSD") for _ in range(3)],
             "multi_organ_abdomenct1k": [entry([10, 10, 60, 60], 256, organ="liver"),
                                         entry([100, 40, 180, 90], 256, organ="liver"),
                                         entry([150, 150, 200, 230], 256, organ="spleen")]}
    prepared = hand_prepared(tmp_path / "prep", tasks)
    said = {"pancreas_detection_nih": ["{<12><8><38><33>}", "{<20><20><60><70>}"],
            "pancreas_detection_msd": ["{<10><10><60><50>}", "{<14><10><60><56>}", "no box"],
            "multi_organ_abdomenct1k": [render_box(e["bbox"], 256, 256) for e in tasks["multi_organ_abdomenct1k"]]}
    for task, answers in said.items():
        write_answers(tmp_path / "eval", task, tasks[task], {e["q_id"]: a for e, a in zip(tasks[task], answers)})
    metrics = rescore(tmp_path / "eval", prepared, list(tasks))

    def mean_iou(task, scale=None, plus=0, over_parsed=False):
        ious = [hand_iou(floor_box(a, e["width"], e["height"], scale), e["bbox"], plus)
                for a, e in zip(said[task], tasks[task]) if a.startswith("{")]
        return sum(ious) / (len(ious) if over_parsed else len(tasks[task]))

    combined = metrics["combined"]["pancreas_detection_weighted"]
    assert (combined["dataset"], combined["n"], combined["tasks"]) == (
        "NIH+MSD", 5, ["pancreas_detection_nih", "pancreas_detection_msd"])
    assert combined["variants"]["E3"]["mean_iou"] == pytest.approx(
        (2 * mean_iou("pancreas_detection_nih", over_parsed=True) + 3 * mean_iou("pancreas_detection_msd",
                                                                                 over_parsed=True)) / 5)
    assert combined["variants"]["E1"]["mean_iou"] == pytest.approx(
        (2 * mean_iou("pancreas_detection_nih", plus=1) + 3 * mean_iou("pancreas_detection_msd", plus=1)) / 5)

    abd = metrics["tasks"]["multi_organ_abdomenct1k"]
    liver = [e for e in tasks["multi_organ_abdomenct1k"] if e["organ"] == "liver"]
    liver_answers = said["multi_organ_abdomenct1k"][:2]
    e3_liver = np.mean([hand_iou(floor_box(a, 256, 256, scale=5.12), e["bbox"]) for a, e in zip(liver_answers, liver)])
    e2_liver = np.mean([hand_iou(floor_box(a, 256, 256), e["bbox"]) for a, e in zip(liver_answers, liver)])
    assert abd["organs"]["liver"]["variants"]["E3"]["mean_iou"] == pytest.approx(e3_liver)
    assert abd["organs"]["liver"]["variants"]["E2"]["mean_iou"] == pytest.approx(e2_liver)
    assert e2_liver > e3_liver + 0.3  # the fixed 5.12 assumes 512-px slices
    spleen = abd["organs"]["spleen"]["variants"]["E3"]["mean_iou"]
    assert abd["variants"]["E3"]["mean_iou"] == pytest.approx((2 * e3_liver + spleen) / 3)
    assert abd["variants"]["E3"]["counts"] == {"liver": 2, "spleen": 1}
    assert "multi_organ_abdomenct1k / liver" in (tmp_path / "eval" / "tables.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- errors

def test_user_errors_are_one_line_messages(prepared, model_dir, tmp_path, capsys):
    def error(argv) -> str:
        assert main(["evaluate", *argv]) == 2
        return capsys.readouterr().err

    message = error(["--prepared", str(prepared), "--rescore", "--out", str(tmp_path / "o"), "--tasks", "pancreas"])
    assert "no test set for task 'pancreas'" in message and "pancreas_detection_msd" in message
    assert "needs --out" in error(["--rescore", "--prepared", str(prepared)])
    assert "holds no predictions" in error(["--rescore", "--prepared", str(prepared), "--out", str(tmp_path / "o")])
    entries = entries_of(prepared, "pancreas_detection_msd")
    write_answers(tmp_path / "o", "pancreas_detection_msd", [{**entries[0], "image": "msd/slices/other.png"}],
                  {entries[0]["q_id"]: "{<1><1><2><2>}"})
    assert "task files changed" in error(["--rescore", "--prepared", str(prepared), "--out", str(tmp_path / "o")])
    assert "model folder not found" in error(["--prepared", str(prepared), "--model", str(tmp_path / "none")])
    no_images = hand_prepared(tmp_path / "no_images", {"tumor_classification": [{"answer": "yes"}]})
    assert "1 image(s) of tumor_classification are missing" in error(["--prepared", str(no_images), "--model",
                                                                      str(model_dir), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_a_fit_output_folder_means_its_latest_model_and_names_the_default_output(prepared, model_dir, tmp_path,
                                                                                  monkeypatch):
    run = tmp_path / "pancreas_stage"
    shutil.copytree(model_dir, run / "model_epoch_3")
    (run / "latest.json").write_text(json.dumps({"step": 4, "epoch": 3, "model_dir": "model_epoch_3"}))
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--prepared", str(prepared), "--model", str(run), "--tasks", "tumor_detection_msd",
                     "--limit", "1"] + QUICK) == 0
    out = tmp_path / "evaluation-pancreas_stage-model_epoch_3"
    assert json.loads((out / "run.json").read_text())["model"] == str(run / "model_epoch_3")
    assert [r["q_id"] for r in saved(out, "tumor_detection_msd")] == [1]
    assert json.loads((out / "metrics.json").read_text())["tasks"]["tumor_detection_msd"]["n"] == 1


def test_box_confidence_is_reported_against_iou_by_rank_correlation_and_bins(tmp_path):
    truth = [20, 20, 59, 59]
    entries = [{"phrase": "pancreas", "bbox": truth, "width": 100, "height": 100, "dataset": "MSD",
                "answer": "{<20><20><59><59>}"} for _ in range(6)]
    prepared = hand_prepared(tmp_path / "prep", {"pancreas_detection_msd": entries})
    # boxes shifted by 0, 5, 10 and 20 pixels (IoU falling) with falling confidence; one answer saved without a
    # confidence (an older run) and one unreadable answer, both left out
    said = [(shift, confidence) for shift, confidence in ((0, 0.96), (5, 0.85), (10, 0.75), (20, 0.3))]
    lines = [{"q_id": i + 1, "image": entries[i]["image"], "prompt": "by hand",
              "answer": f"{{<{20 + s}><20><{59 + s}><59>}}", "box_confidence": c} for i, (s, c) in enumerate(said)]
    lines += [{"q_id": 5, "image": entries[4]["image"], "prompt": "by hand", "answer": "{<20><20><59><59>}"},
              {"q_id": 6, "image": entries[5]["image"], "prompt": "by hand", "answer": "no idea",
               "box_confidence": 0.99}]
    (tmp_path / "eval" / "predictions").mkdir(parents=True)
    (tmp_path / "eval" / "predictions" / "pancreas_detection_msd.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines))
    metrics = rescore(tmp_path / "eval", prepared, ["pancreas_detection_msd"])
    result = metrics["tasks"]["pancreas_detection_msd"]["confidence"]
    assert (result["n"], result["n_without_confidence"]) == (4, 1)
    assert result["spearman"] == pytest.approx(1.0)  # higher confidence, higher IoU, in every pair
    assert [(b["range"], b["n"]) for b in result["bins"]] == [([0.0, 0.5], 1), ([0.7, 0.8], 1), ([0.8, 0.9], 1),
                                                               ([0.95, 1.0], 1)]
    ious = [b["mean_iou"] for b in result["bins"]]
    assert ious == sorted(ious) and result["bins"][-1]["hit_rate"] == 1.0 and result["bins"][0]["hit_rate"] == 0.0
    tables = (tmp_path / "eval" / "tables.md").read_text(encoding="utf-8")
    assert "### Box confidence against IoU (STRICT)" in tables and "| pancreas_detection_msd | 1.000 (4) |" in tables
