"""`.mrk.json` ROI files: written by the core without Slicer, read back by the real Slicer markups code
(`slicer-core`: the same vtkSlicerMarkupsLogic.LoadMarkups that File > Add Data calls)."""

from __future__ import annotations

import json

import pytest

from SlicerMiniGPTPancreas.markups import SCHEMA_URL, MarkupsError, RoiMarkup, write_roi_markups

# Deliberately off-origin and asymmetric, so a missing or doubled RAS <-> LPS flip shows.
ROIS = [
    RoiMarkup((12.5, -30.25, -181.0), (40.0, 22.5, 5.0), "pancreas s12", "confidence 0.91"),
    RoiMarkup((-8.0, 14.0, -176.0), (18.0, 9.0, 2.5), "pancreas s13"),
]


def test_file_is_lps_with_one_centre_control_point_per_roi(tmp_path):
    path = write_roi_markups(tmp_path / "boxes.mrk.json", ROIS)
    document = json.loads(path.read_text())
    assert document["@schema"] == SCHEMA_URL and SCHEMA_URL.endswith("markups-schema-v1.0.3.json#")
    first, second = document["markups"]
    assert first["type"] == "ROI" and first["roiType"] == "Box" and first["coordinateSystem"] == "LPS"
    assert first["center"] == [-12.5, 30.25, -181.0]  # R, A negated; S kept
    assert first["size"] == [40.0, 22.5, 5.0]  # sizes are lengths: not flipped
    assert first["orientation"] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]  # axis-aligned in RAS
    assert first["controlPoints"][0]["position"] == first["center"]
    assert first["controlPoints"][0]["description"] == "confidence 0.91"
    assert (first["name"], second["name"]) == ("pancreas s12", "pancreas s13")
    assert second["center"] == [8.0, -14.0, -176.0] and second["controlPoints"][0]["description"] == ""


@pytest.mark.parametrize("bad, message", [
    (((0, 0, float("nan")), (1, 1, 1), "a"), "three finite"),
    (((0, 0), (1, 1, 1), "a"), "three finite"),
    (((0, 0, 0), (1, -1, 1), "a"), "must not be negative"),
    (((0, 0, 0), (1, 1, 1), "  "), "non-empty name"),
])
def test_bad_roi_is_refused_and_the_previous_file_survives(tmp_path, bad, message):
    path = write_roi_markups(tmp_path / "boxes.mrk.json", ROIS)
    before = path.read_bytes()
    with pytest.raises(MarkupsError, match=message):
        write_roi_markups(path, [ROIS[0], bad])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.mrk.json"]  # no temporary file left behind


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MarkupsError, match="folder exists"):
        write_roi_markups(tmp_path / "nowhere" / "boxes.mrk.json", ROIS)


@pytest.fixture
def slicer_scene():
    """A bare MRML scene with the markups logic registered, as the Slicer application sets it up."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    scene = slicer.vtkMRMLScene()
    selection = slicer.vtkMRMLSelectionNode()  # the application's singleton; the logic reports errors without it
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    return slicer, scene, logic


def _loaded_rois(slicer, scene, logic, path) -> list:
    messages = slicer.vtkMRMLMessageCollection()
    assert logic.LoadMarkups(str(path), None, messages), messages.GetAllMessagesAsString()
    count = scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")
    return [scene.GetNthNodeByClass(index, "vtkMRMLMarkupsROINode") for index in range(count)]


def test_slicer_loads_every_roi_at_its_ras_position(slicer_scene, tmp_path):
    slicer, scene, logic = slicer_scene
    path = write_roi_markups(tmp_path / "boxes.mrk.json", ROIS)
    nodes = _loaded_rois(slicer, scene, logic, path)
    assert [node.GetName() for node in nodes] == ["pancreas s12", "pancreas s13"]
    for node, roi in zip(nodes, ROIS):
        center = [0.0, 0.0, 0.0]
        node.GetCenterWorld(center)
        assert center == pytest.approx(roi.center_ras)
        assert node.GetSize() == pytest.approx(roi.size_mm)
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)  # [r_min, r_max, a_min, a_max, s_min, s_max]: the box is axis-aligned
        for axis in range(3):
            assert bounds[2 * axis] == pytest.approx(roi.center_ras[axis] - roi.size_mm[axis] / 2)
            assert bounds[2 * axis + 1] == pytest.approx(roi.center_ras[axis] + roi.size_mm[axis] / 2)
        assert node.GetNthControlPointDescription(0) == roi.description
        assert node.GetLocked()


def test_our_geometry_keys_match_what_slicer_itself_writes(slicer_scene, tmp_path):
    slicer, scene, _ = slicer_scene
    roi = ROIS[0]
    node = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(node)
    node.SetCenter(*roi.center_ras)
    node.SetSize(*roi.size_mm)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.mrk.json"))
    assert storage.WriteData(node)
    theirs = json.loads((tmp_path / "slicer.mrk.json").read_text())["markups"][0]
    ours = json.loads(write_roi_markups(tmp_path / "ours.mrk.json", [roi]).read_text())["markups"][0]
    for key in ("type", "coordinateSystem", "coordinateUnits", "roiType"):
        assert ours[key] == theirs[key], key
    for key in ("center", "orientation", "size"):
        assert ours[key] == pytest.approx(theirs[key]), key
    assert ours["controlPoints"][0]["position"] == pytest.approx(theirs["controlPoints"][0]["position"])


def test_an_empty_file_loads_as_no_rois(slicer_scene, tmp_path):
    slicer, scene, logic = slicer_scene
    path = write_roi_markups(tmp_path / "none.mrk.json", [])
    logic.LoadMarkups(str(path), None, slicer.vtkMRMLMessageCollection())
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 0
