"""The bundled demo model (backend/demo_model/): it loads as an installed backend finds it, its report and card are
the ones of these very weights, and it still gives the stored answers on held-out phantom slices.

The stored answers (`Testing/data/bundled_model_answers.json`) are written by `python Testing/test_bundled_model.py`
right after the demo cascade exports a new model; a rebuilt model whose answers drift fails here until its report
and these answers are refreshed together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from backend.demo_model import DEMO_MODEL_DIR, bundled_model_dir, model_card
from backend.model_dir import read_manifest

STORED = Path(__file__).parent / "data" / "bundled_model_answers.json"
SEEDS = (11, 12)  # patients the demo cascade never saw (it trains on seeds >= 100000)


def held_out_answers() -> list[dict]:
    """The bundled model's cascade answers on every third model-view slice with pancreas, asked as
    `predict --cascade` and the demo ask them (with the model's close-up, when its folder says so)."""
    import numpy as np

    from backend.cascade_sweep import sweep_cascade
    from backend.engine import InferenceEngine
    from SlicerMiniGPTPancreas import geometry, phantom

    engine = InferenceEngine.from_model_dir(bundled_model_dir(), device="cpu", batch_size=8)
    records = []
    for seed in SEEDS:
        ct = phantom.make_phantom(seed, tumour=True, **phantom.sample_scan_parameters(seed))
        view = geometry.ModelView.from_volume(ct.hu, ct.ijk_to_ras)
        labels = geometry.ModelView.from_volume(ct.labels, ct.ijk_to_ras)
        chosen = [s for s in range(view.shape[0]) if np.isin(labels.slice(s), (1, 2)).any()][::3]
        answers = sweep_cascade(engine, [view.slice(s) for s in chosen], close_up_zoom=engine.close_up_zoom)
        for s, answer in zip(chosen, answers):
            records.append({"seed": seed, "slice": s, "window": answer.window and answer.window.as_list(),
                            "pancreas": answer.pancreas.answer,
                            "boxes": [list(box.box) for box in answer.pancreas.boxes],
                            "yes_probability": answer.tumour_yes_no.yes_probability})
    return records


def test_the_bundled_model_is_where_an_installed_backend_looks():
    assert bundled_model_dir() == DEMO_MODEL_DIR
    card = model_card(DEMO_MODEL_DIR)
    assert card["synthetic"] and card["model_id"].startswith("minigpt-pancreas-demo-")
    size = sum(path.stat().st_size for path in DEMO_MODEL_DIR.rglob("*") if path.is_file())
    assert size < 20 * 2**20


def test_the_report_and_card_describe_these_very_weights():
    weights = read_manifest(DEMO_MODEL_DIR)["tensors"]["sha256"]
    run = json.loads((DEMO_MODEL_DIR.parent / "report" / "run.json").read_text())
    assert run["model_id"] == f"sha256:{weights}"
    card = (DEMO_MODEL_DIR.parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert model_card(DEMO_MODEL_DIR)["model_id"] in card and "not for clinical use" in card


@pytest.mark.slow
def test_the_bundled_model_still_gives_the_stored_answers():
    from SlicerMiniGPTPancreas import metrics

    stored = json.loads(STORED.read_text())
    assert stored["model_id"] == model_card(DEMO_MODEL_DIR)["model_id"], "refresh the stored answers"
    now = held_out_answers()
    assert len(now) == len(stored["answers"]) > 0
    for got, expected in zip(now, stored["answers"]):
        assert (got["seed"], got["slice"]) == (expected["seed"], expected["slice"])
        assert (got["window"] is None) == (expected["window"] is None)
        if got["window"] is not None:  # the window follows the first box, which another CPU may round otherwise
            assert max(abs(a - b) for a, b in zip(got["window"], expected["window"])) <= 3
        assert len(got["boxes"]) == len(expected["boxes"])
        for box, old in zip(got["boxes"], expected["boxes"]):  # another CPU may round a last digit differently
            assert metrics.box_iou(box, old, convention="plus_one") > 0.9
        assert got["yes_probability"] == pytest.approx(expected["yes_probability"], abs=0.02)


if __name__ == "__main__":  # refresh the stored answers after exporting a new demo model
    STORED.parent.mkdir(exist_ok=True)
    STORED.write_text(json.dumps({"model_id": model_card(DEMO_MODEL_DIR)["model_id"],
                                  "answers": held_out_answers()}, indent=1) + "\n")
    print(f"wrote {STORED}", file=sys.stderr)
