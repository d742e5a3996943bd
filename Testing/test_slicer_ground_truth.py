"""Ground truth in the Slicer module on REAL MRML nodes (the slicer-core wheel): truth masks and boxes from label
maps and segmentations on the CT grid, the truth choices offered, the per-slice IoU table, the IoU-by-slice plot and
the truth boxes drawn in green.

Expectations are computed independently of the module: truth boxes slice by slice with geometry.mask_box, IoU
values by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

# slicer_fixtures first: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import ROTATE_90_AND_SHIFT, add_ct, expected_view, truth_slices

import slicer  # noqa: E402  (the slicer-core wheel)
from MiniGPTPancreasLib import ground_truth, volume_geometry
from MiniGPTPancreasLib.boxes_to_markups import roi_world_center_and_size
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic
from SlicerMiniGPTPancreas.phantom import reorient


# ----------------------------------------------------------------------------------------------- ground truth

@pytest.fixture
def ct_and_labels(scene, phantom):
    ct = add_ct(scene, phantom, ROTATE_90_AND_SHIFT)
    labels = volume_geometry.add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "labels",
                                             "vtkMRMLLabelMapVolumeNode")
    labels.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
    return ct, labels


def test_truth_boxes_from_a_label_map_on_the_ct_grid(ct_and_labels, phantom):
    ct, labels = ct_and_labels
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    for values in ([1, 2], [2]):
        mask = ground_truth.truth_mask(labels, ct, label_values=values)
        got = ground_truth.truth_boxes(mask, volume_geometry.world_ijk_to_ras(ct))
        assert got == truth_slices(phantom.labels, world, values) and got
    assert ground_truth.truth_mask(labels, ct).sum() == (phantom.labels > 0).sum()


def test_truth_from_a_label_map_stored_another_way_is_resampled_onto_the_ct_grid(scene, phantom):
    ct = add_ct(scene, phantom)
    other = reorient(phantom, "RPI")  # same voxels, stored inferior-first and flipped
    labels = volume_geometry.add_volume_node(scene, other.labels, other.ijk_to_ras, "labels RPI",
                                             "vtkMRMLLabelMapVolumeNode")
    mask = ground_truth.truth_mask(labels, ct, label_values=[1, 2])
    assert np.array_equal(mask, phantom.labels > 0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # the temporary nodes are gone


def test_truth_from_a_segmentation_node(ct_and_labels, phantom, scene):
    ct, labels = ct_and_labels
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
    segments = segmentation.GetSegmentation()
    ids = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegmentID(i)
           for i in range(segments.GetNumberOfSegments())}
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    both = ground_truth.truth_mask(segmentation, ct)
    assert np.array_equal(both, phantom.labels > 0)
    tumour = ground_truth.truth_mask(segmentation, ct, segment_ids=[ids[2]])
    assert ground_truth.truth_boxes(tumour, world) == truth_slices(phantom.labels, world, [2])
    with pytest.raises(ground_truth.GroundTruthError, match="no segment.*it has"):
        ground_truth.truth_mask(segmentation, ct, segment_ids=["nonexistent"])
    choices = ground_truth.truth_choices(segmentation)
    assert [title for title, _ in choices][0] == "All segments" and len(choices) == 3
    for title, selection in choices[1:]:  # each segment's choice selects exactly its label's voxels
        label = next(value for value, segment_id in ids.items() if selection == {"segment_ids": [segment_id]})
        assert np.array_equal(ground_truth.truth_mask(segmentation, ct, **selection), phantom.labels == label)


def test_label_map_choices_name_every_label_present(ct_and_labels):
    _, labels = ct_and_labels
    assert ground_truth.truth_choices(labels) == [("All labels (nonzero)", {}), ("Label 1", {"label_values": [1]}),
                                                  ("Label 2", {"label_values": [2]})]
    assert ground_truth.truth_choices(None) == []


def test_iou_table_for_hand_made_predictions(ct_and_labels, phantom):
    ct, labels = ct_and_labels
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    truths = truth_slices(phantom.labels, world, [1, 2])
    shifted_s, missed_s, split_s = sorted(truths)[:3]
    x0, y0, x1, y1 = truths[shifted_s]
    empty = [s for s in range(expected_view(phantom, ROTATE_90_AND_SHIFT).shape[0]) if s not in truths]
    false_alarm_s, quiet_s = empty[0], empty[1]
    a0, b0, a1, b1 = truths[split_s]
    predictions = {
        shifted_s: [(x0 + 1, y0, x1 + 1, y1)],  # one pixel to the right: IoU (w - 1) / (w + 1)
        missed_s: [],  # the model found nothing where the truth has a box: IoU 0
        split_s: [(a0, b0, a1, b1 - 1), (a0, b1 - 1, a1, b1)],  # two boxes whose enclosing box is the truth: 1
        false_alarm_s: [(5, 5, 9, 9)],  # a box where the truth has none: IoU 0
        quiet_s: [],  # nothing and nothing: left out of the mean
    }
    width = x1 - x0 + 1
    shifted_iou = (width - 1) / (width + 1)
    comparison = MiniGPTPancreasLogic().compare_with_ground_truth(ct, labels, predictions, label_values=[1, 2])
    table = comparison.table_node.GetTable()
    read = {table.GetValueByName(r, "slice").ToString(): r for r in range(table.GetNumberOfRows())}
    assert list(read) == [str(s) for s in sorted(predictions)] + ["mean"]
    iou = {s: table.GetValueByName(read[str(s)], "IoU").ToDouble() for s in predictions}
    assert iou[shifted_s] == pytest.approx(shifted_iou)
    assert (iou[missed_s], iou[split_s], iou[false_alarm_s]) == (0.0, pytest.approx(1.0), 0.0)
    assert np.isnan(iou[quiet_s])
    want_mean = (shifted_iou + 0.0 + 1.0 + 0.0) / 4
    assert comparison.mean_iou == pytest.approx(want_mean)
    assert table.GetValueByName(read["mean"], "IoU").ToDouble() == pytest.approx(want_mean)
    assert table.GetValueByName(read[str(missed_s)], "predicted box").ToString() == "none"
    assert table.GetValueByName(read[str(shifted_s)], "truth box").ToString() == f"({x0}, {y0}, {x1}, {y1})"
    plot_table = scene_plot_table(comparison.plot_chart_node)
    points = {int(plot_table.GetValue(r, 0).ToDouble()): plot_table.GetValue(r, 1).ToDouble()
              for r in range(plot_table.GetNumberOfRows())}
    assert points == {s: pytest.approx(value) for s, value in iou.items() if s != quiet_s}  # scored slices only
    view = expected_view(phantom, ROTATE_90_AND_SHIFT)
    green = {int(roi.GetAttribute("MiniGPTPancreas.slice")): roi for roi in comparison.truth_run.rois}
    assert sorted(green) == sorted(s for s in predictions if s in truths)
    for s, roi in green.items():
        np.testing.assert_allclose(roi_world_center_and_size(roi)[0], view.box_to_ras(truths[s], s)[0], atol=1e-6)
        assert roi.GetDisplayNode().GetColor() == pytest.approx((0.2, 0.8, 0.2))


def scene_plot_table(chart):
    """The vtkTable behind the chart's single plot series."""
    (series_id,) = [chart.GetNthPlotSeriesNodeID(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    series = chart.GetScene().GetNodeByID(series_id)
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("slice", "IoU")
    return series.GetTableNode().GetTable()
