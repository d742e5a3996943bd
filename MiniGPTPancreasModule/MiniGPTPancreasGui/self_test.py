"""The module's self-test (Slicer's "Reload and Test", and CTest through slicer_add_python_unittest). MiniGPTPancreas.py
imports it, because Slicer looks the class up there as <ModuleName>Test.

The geometry and ground-truth path always runs; a real question only when a server answers at the saved URL.
"""

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from MiniGPTPancreasLib.boxes_to_markups import PlacedBox, add_box_rois
from MiniGPTPancreasLib.ground_truth import truth_boxes
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic
from MiniGPTPancreasLib.summaries import describe_response
from MiniGPTPancreasLib.volume_geometry import add_volume_node, model_view_geometry
from SlicerMiniGPTPancreas.client import DEFAULT_URL, ClientError

from .server_section import SETTINGS


class MiniGPTPancreasTest(ScriptedLoadableModuleTest):
    """Self-test: the geometry and ground-truth path always; a real question only when a server answers (IfReady)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MiniGPTPancreas_GroundTruthAndRois()
        self.setUp()
        self.test_MiniGPTPancreas_AnalyzeSliceIfReady()

    def _phantomNodes(self):
        from SlicerMiniGPTPancreas.phantom import make_phantom

        phantom = make_phantom(0)
        ct = add_volume_node(slicer.mrmlScene, phantom.hu, phantom.ijk_to_ras, "MiniGPT-Pancreas phantom CT")
        labels = add_volume_node(slicer.mrmlScene, phantom.labels, phantom.ijk_to_ras, "phantom labels",
                                 "vtkMRMLLabelMapVolumeNode")
        return phantom, ct, labels

    def test_MiniGPTPancreas_GroundTruthAndRois(self):
        self.delayDisplay("Truth boxes of a phantom, fed back as predictions, score IoU 1 and become ROIs")
        phantom, ct, labels = self._phantomNodes()
        truths = truth_boxes(phantom.labels > 0, phantom.ijk_to_ras)
        self.assertTrue(truths)
        comparison = MiniGPTPancreasLogic().compare_with_ground_truth(ct, labels, {s: [b] for s, b in truths.items()})
        self.assertAlmostEqual(comparison.mean_iou, 1.0)
        run = add_box_rois(slicer.mrmlScene, model_view_geometry(ct), [PlacedBox(s, b) for s, b in truths.items()],
                           label="truth", volume_node=ct)
        self.assertEqual(len(run.rois), len(truths))
        self.delayDisplay("Test passed")

    def test_MiniGPTPancreas_AnalyzeSliceIfReady(self):
        url = qt.QSettings().value(SETTINGS + "ServerUrl", DEFAULT_URL)
        logic = MiniGPTPancreasLogic()
        try:
            logic.set_server(url)
            info = logic.connect()
        except ClientError as error:
            self.delayDisplay(f"Skipped: no MiniGPT-Pancreas server is ready at {url} ({error})")
            return
        phantom, ct, _labels = self._phantomNodes()
        slices = sorted(truth_boxes(phantom.labels > 0, phantom.ijk_to_ras))
        sliceIndex = slices[len(slices) // 2]
        response = logic.analyze_slice(ct, sliceIndex, info.example_prompts[0])
        self.assertEqual(response.slice_index, sliceIndex)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")), len(response.boxes))
        self.delayDisplay(describe_response(response, sliceIndex))
