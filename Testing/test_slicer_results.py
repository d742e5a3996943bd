"""What a run leaves in the scene and on disk, on REAL MRML nodes (the slicer-core wheel): the confidence threshold
and the fused 3D box on a crafted sweep with an outlier slice, provenance and yes/no attributes, run numbers that
never repeat, the ROI cap, and the export read back. Expected boxes come from SlicerMiniGPTPancreas.geometry."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

import numpy as np
import pytest

# slicer_fixtures before the Lib: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import REFER, add_ct, expected_view

from MiniGPTPancreasLib.boxes_to_markups import PlacedBox, add_box_rois, roi_world_center_and_size
from MiniGPTPancreasLib.fusion import run_rois
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic, SweepOutcome
from MiniGPTPancreasLib.results import ExportError, export_run, results_table
from MiniGPTPancreasLib.volume_geometry import add_volume_node, first_ct_volume, slicer_slice_label
from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.phantom import reorient

TC_PROMPT = "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"
PANCREAS_BOX = (40.0, 50.0, 70.0, 66.0)
OUTLIER_BOX = (5.0, 5.0, 20.0, 15.0)


def boxes_answer(s, *boxes):
    """A QueryResponse with (box, confidence) pairs, as the server sends it."""
    return p.QueryResponse("{...}", "boxes", "crafted-model", slice_index=s,
                           boxes=tuple(p.BoxResult(box, None, confidence) for box, confidence in boxes))


def crafted_sweep():
    """Slices 10-13 sure (0.9), 14 unsure (0.3), 15-16 sure, nothing on 17-29, and one sure outlier on 30."""
    answers = {s: boxes_answer(s, (PANCREAS_BOX, 0.9)) for s in (10, 11, 12, 13, 15, 16)}
    answers[14] = boxes_answer(14, (PANCREAS_BOX, 0.3))
    answers.update({s: boxes_answer(s) for s in range(17, 30)})
    answers[30] = boxes_answer(30, (OUTLIER_BOX, 0.95))
    return SweepOutcome("done", 21, 21, answers)


def expected_fused(view, slices):
    corners = np.concatenate([view.box_to_ras_corners(PANCREAS_BOX, s) for s in slices])
    return (corners.min(0) + corners.max(0)) / 2, corners.max(0) - corners.min(0)


def test_threshold_hides_boxes_and_the_fused_box_follows_the_largest_run_of_consecutive_slices(scene, phantom):
    node = add_ct(scene, phantom)
    view = expected_view(phantom)
    logic = MiniGPTPancreasLogic()
    request = logic.prepare_sweep(node, (10, 30))
    run = logic.add_sweep_boxes(request, crafted_sweep(), REFER, scene, node)
    boxes, fused = run_rois(scene, run.number)
    assert len(boxes) == 8 and fused is run.fused
    np.testing.assert_allclose(np.concatenate(roi_world_center_and_size(fused)),  # the outlier on 30 is left out
                               np.concatenate(expected_fused(view, range(10, 17))), atol=1e-6)
    assert fused.GetAttribute("MiniGPTPancreas.fusedSlices") == "10-16"
    logic.set_threshold(scene, run, 0.5)
    visible = sorted(int(roi.GetAttribute("MiniGPTPancreas.slice")) for roi in boxes if roi.GetDisplayVisibility())
    assert visible == [10, 11, 12, 13, 15, 16, 30]  # slice 14 hidden...
    assert len(run_rois(scene, run.number)[0]) == 8  # ...not deleted
    np.testing.assert_allclose(np.concatenate(roi_world_center_and_size(fused)),
                               np.concatenate(expected_fused(view, range(10, 14))), atol=1e-6)
    assert fused.GetName() == "pancreas 3D (slices 10-13, 4 boxes >= 0.50)"
    logic.set_threshold(scene, run, 0.99)
    assert not fused.GetDisplayVisibility() and not any(roi.GetDisplayVisibility() for roi in boxes)
    logic.set_threshold(scene, run, 0.0)
    assert fused.GetDisplayVisibility() and all(roi.GetDisplayVisibility() for roi in boxes)
    assert fused.GetAttribute("MiniGPTPancreas.fusedSlices") == "10-16"


def test_every_run_records_its_provenance_and_yes_no_answers(scene, phantom):
    node = add_ct(scene, phantom)
    logic = MiniGPTPancreasLogic()
    request = logic.prepare_slice(node, 12)
    answer = p.QueryResponse("Yes", "yes_no", "crafted-model", yes=True, yes_probability=0.8312, slice_index=12)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run = logic.add_slice_boxes(request, answer, TC_PROMPT, scene, node)
    sh_node = scene.GetSubjectHierarchyNode()
    folder = {key: sh_node.GetItemAttribute(run.folder_item, "MiniGPTPancreas." + key)
              for key in ("prompt", "modelId", "serverUrl", "time", "yes", "yesProbability", "run")}
    assert folder["prompt"] == TC_PROMPT and folder["modelId"] == "crafted-model"
    assert folder["serverUrl"] == logic.client.base_url and (folder["yes"], folder["yesProbability"]) == ("yes",
                                                                                                          "0.8312")
    assert datetime.fromisoformat(folder["time"]) >= before and folder["run"] == str(run.number)
    table = results_table(scene, run.number).GetTable()
    row = {table.GetColumnName(c): table.GetValue(0, c).ToString() for c in range(table.GetNumberOfColumns())}
    assert (row["slice"], row["answer"], row["yes"], float(row["P(yes)"])) == ("12", "Yes", "yes", 0.8312)
    assert sh_node.GetItemParent(sh_node.GetItemByDataNode(results_table(scene, run.number))) == run.folder_item


def test_the_last_run_is_what_threshold_export_and_ground_truth_act_on(scene, phantom, tmp_path):
    node = add_ct(scene, phantom)
    labels = add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "labels", "vtkMRMLLabelMapVolumeNode")
    logic = MiniGPTPancreasLogic()
    with pytest.raises(ValueError, match="ask a question first"):
        logic.compare_last_run(labels)
    with pytest.raises(ExportError, match="no run to export"):
        logic.export_last_run(tmp_path)
    request = logic.prepare_slice(node, 12)
    logic.add_slice_boxes(request, p.QueryResponse("No", "yes_no", "m", yes=False, slice_index=12), TC_PROMPT,
                          scene, node)
    with pytest.raises(ValueError, match="no boxes"):
        logic.compare_last_run(labels)
    run = logic.add_sweep_boxes(logic.prepare_sweep(node, (10, 30)), crafted_sweep(), REFER, scene, node)
    assert logic.set_threshold(scene, None, 0.5).GetAttribute("MiniGPTPancreas.fusedSlices") == "10-13"
    assert logic.export_last_run(tmp_path)[0].name == f"minigpt_pancreas_run_{run.number}.mrk.json"
    assert [row.slice_index for row in logic.compare_last_run(labels).rows] == list(range(10, 31))


def test_ground_truth_is_compared_with_the_boxes_shown_at_the_threshold_which_table_and_plot_name(scene, phantom):
    node = add_ct(scene, phantom)
    labels = add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "labels", "vtkMRMLLabelMapVolumeNode")
    logic = MiniGPTPancreasLogic()
    logic.add_sweep_boxes(logic.prepare_sweep(node, (10, 30)), crafted_sweep(), REFER, scene, node, threshold=0.5)

    def compared():
        comparison = logic.compare_last_run(labels)
        table = comparison.table_node.GetTable()
        mean_row = table.GetNumberOfRows() - 1
        return ({row.slice_index: row for row in comparison.rows}, table.GetValue(mean_row, 2).ToString(),
                comparison.plot_chart_node.GetTitle())

    rows, mean_text, plot_title = compared()
    assert rows[14].predicted is None and rows[14].iou == (None if rows[14].truth is None else 0.0)  # 0.3: hidden
    assert [s for s, row in rows.items() if row.predicted == PANCREAS_BOX] == [10, 11, 12, 13, 15, 16]
    assert rows[30].predicted == OUTLIER_BOX  # shown (0.95), so compared
    assert mean_text.endswith("with a box, boxes >= 0.50") and "boxes >= 0.50: IoU by slice" in plot_title
    logic.set_threshold(scene, None, 0.0)  # the slider moved back: slice 14's box is shown and compared again
    rows, mean_text, plot_title = compared()
    assert rows[14].predicted == PANCREAS_BOX and mean_text.endswith("boxes >= 0.00") and ">= 0.00" in plot_title


def test_run_numbers_never_repeat_even_after_a_run_is_deleted(scene, phantom):
    node = add_ct(scene, phantom)
    logic = MiniGPTPancreasLogic()
    request = logic.prepare_slice(node, 12)
    first = logic.add_slice_boxes(request, boxes_answer(12, (PANCREAS_BOX, 0.9)), REFER, scene, node)
    second = logic.add_slice_boxes(request, boxes_answer(12, (PANCREAS_BOX, 0.8)), REFER, scene, node)
    for roi in run_rois(scene, second.number)[0]:
        scene.RemoveNode(roi)
    scene.RemoveNode(results_table(scene, second.number))
    third = logic.add_slice_boxes(request, boxes_answer(12), REFER, scene, node)
    assert (first.number, second.number, third.number) == (1, 2, 3)


def test_very_long_sweeps_keep_the_most_confident_boxes_up_to_the_cap(scene, phantom):
    boxes = [PlacedBox(s, PANCREAS_BOX, confidence) for s, confidence in enumerate((0.1, 0.9, 0.5, 0.7, 0.2))]
    run = add_box_rois(scene, expected_view(phantom), boxes, label="pancreas", max_rois=3)
    assert [roi.GetName() for roi in run.rois] == ["pancreas s1 (0.90)", "pancreas s2 (0.50)", "pancreas s3 (0.70)"]
    assert run.dropped == 2


def test_export_writes_markups_and_csv_that_read_back(scene, phantom, tmp_path):
    node = add_ct(scene, phantom)
    logic = MiniGPTPancreasLogic()
    run = logic.add_sweep_boxes(logic.prepare_sweep(node, (10, 30)), crafted_sweep(), REFER, scene, node)
    markups_path, csv_path = export_run(scene, run.number, tmp_path)
    document = json.loads(markups_path.read_text(encoding="utf-8"))
    rois = {roi.GetName(): roi for roi in run_rois(scene, run.number)[0] + [run.fused]}
    assert sorted(m["name"] for m in document["markups"]) == sorted(rois)
    for markup in document["markups"]:
        center, size = roi_world_center_and_size(rois[markup["name"]])
        lps = [-markup["center"][0], -markup["center"][1], markup["center"][2]]
        np.testing.assert_allclose(lps, center, atol=1e-6)
        np.testing.assert_allclose(markup["size"], size, atol=1e-6)
    with csv_path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["slice"]) for row in rows] == list(range(10, 31))
    assert rows[4]["confidences"] == "0.3000" and rows[4]["boxes"] == "40 50 70 66"
    assert {row["prompt"] for row in rows} == {REFER} and {row["modelId"] for row in rows} == {"crafted-model"}
    with pytest.raises(ExportError, match="no MiniGPT-Pancreas run 99"):
        export_run(scene, 99, tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        export_run(scene, run.number, tmp_path / "missing")
    assert sorted(path.name for path in tmp_path.iterdir()) == [csv_path.name, markups_path.name]


def test_the_default_input_skips_label_maps_and_slices_are_named_as_slicer_shows_them(scene, phantom):
    add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "labels", "vtkMRMLLabelMapVolumeNode")
    assert first_ct_volume(scene) is None
    flipped = reorient(phantom, "LPI")  # stored from superior to inferior: voxel K runs against model slice s
    node = add_ct(scene, flipped)
    assert first_ct_volume(scene) is node
    view = expected_view(flipped)
    k_count = flipped.hu.shape[0]
    offset = (view.model_to_ras_matrix @ [0, 0, 3, 1])[2]
    assert slicer_slice_label(view, 3).startswith(f"K {k_count - 1 - 3}, S {offset:.1f}")
