"""`minigpt-pancreas bench`: the engine and the plain per-question loop answer the same slices of the bundled demo
model, and the report (text or JSON) says how they compare; bad options get one line and exit status 2. Timings are
reported, never asserted."""

from __future__ import annotations

import json

from backend.bench.sweep_vs_plain import bench_slices
from backend.cli import main


def test_bench_json_compares_the_engine_with_the_plain_loop(capsys):
    assert main(["bench", "--slices", "3", "--device", "cpu", "--batch-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answers_equal_to_plain_loop"] is True and report["answers_differing"] == 0
    assert report["speedup_vs_plain_loop"] > 0 and report["first_answer_seconds"] > 0
    assert report["slices"] == 3 and report["questions"] >= 6 and report["batch_size"] == 2
    engine, plain = report["engine"], report["plain_loop"]
    assert engine["vision_encodings"] == 3 and plain["vision_encodings"] == report["questions"]
    assert engine["language_model_calls"] < plain["language_model_calls"]
    assert report["peak_memory_kind"] == "rss" and report["peak_memory_bytes"] > 0


def test_bench_text_names_the_model_and_the_comparison(capsys):
    assert main(["bench", "--slices", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Using the bundled demo model" in out
    for line in ("engine sweep", "plain loop", "speed-up", "first answer", "peak memory",
                 "answers equal to the plain loop: yes"):
        assert line in out


def test_bench_refuses_bad_options(capsys, tmp_path):
    assert main(["bench", "--slices", "0"]) == 2
    assert "--slices must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_bench_without_a_demo_model_says_how_to_build_one(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIGPT_PANCREAS_DEMO_MODEL", str(tmp_path / "missing"))
    assert main(["bench", "--slices", "1"]) == 2
    error = capsys.readouterr().err
    assert "no bundled demo model" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_bench_slices_show_the_pancreas_in_the_middle():
    slices = bench_slices(48)
    assert len(slices) == 48 and all(s.ndim == 2 for s in slices)
    assert len({s.tobytes() for s in slices}) == 48  # distinct slices: no answer is reused by accident
