"""MiniGPT-Pancreas for 3D Slicer: ask a multimodal model about axial CT slices, see its answers as ROI boxes,
compare them with ground truth.

This file holds what needs the Slicer application: the Module, the Widget and the self-Test. The logic and its
helpers live in MiniGPTPancreasLib (GUI-free, tested with pytest on the slicer-core wheel); the HTTP client,
geometry and metrics in the shared core package SlicerMiniGPTPancreas, installed next to this file by CMake.
"""

import logging
import os
import sys
import traceback
from typing import Annotated
from urllib.parse import urlsplit

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_DIR = os.path.dirname(_MODULE_DIR)
if not os.path.isdir(os.path.join(_MODULE_DIR, "SlicerMiniGPTPancreas")) and _CHECKOUT_DIR not in sys.path:
    sys.path.append(_CHECKOUT_DIR)  # run from a source checkout: the core package sits at the repository top level

from MiniGPTPancreasLib.boxes_to_markups import PlacedBox, add_box_rois  # noqa: E402
from MiniGPTPancreasLib.ground_truth import truth_boxes, truth_choices  # noqa: E402
# MiniGPTPancreasLogic lives in the Lib so that it imports without the GUI; this module re-exports it.
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic, SweepOutcome, predictions_of  # noqa: E402
from MiniGPTPancreasLib.prompts import PRESETS  # noqa: E402
from MiniGPTPancreasLib.summaries import describe_health, describe_response, describe_sweep  # noqa: E402
from MiniGPTPancreasLib.volume_geometry import add_volume_node, current_model_slice, model_view_geometry  # noqa: E402
from MiniGPTPancreasLib.worker import FAILED, PROGRESS, BackgroundTask  # noqa: E402
from SlicerMiniGPTPancreas.client import DEFAULT_URL, ClientError  # noqa: E402

SERVER_URL_SETTING = "MiniGPTPancreas/ServerUrl"
UPLOAD_WARNING_SETTING = "MiniGPTPancreas/DontShowUploadWarning"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CUSTOM_PROMPT = "custom"


def _resourcePath(*parts):
    """A file of Resources/: next to this file when built or installed, at the repository top level in a checkout."""
    installed = os.path.join(_MODULE_DIR, "Resources", *parts)
    return installed if os.path.exists(installed) else os.path.join(_CHECKOUT_DIR, "Resources", *parts)


class MiniGPTPancreas(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MiniGPT-Pancreas")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MiniGPT-Pancreas for Slicer contributors"]
        self.parent.helpText = _(
            "Ask MiniGPT-Pancreas (MiniGPT-v2 fine-tuned with LoRA on public pancreas CT data) where the pancreas or "
            "a pancreatic tumour is on axial CT slices, or whether a tumour is present. Boxes appear as locked ROI "
            "markups on their slice; a sweep adds a 3D box around all of them; ground truth gives IoU per slice. "
            "The model runs in a separate server (`minigpt-pancreas serve`). <b>Research software: not a medical "
            "device, not for diagnosis or treatment decisions.</b>")
        self.parent.acknowledgementText = _(
            "Built on MiniGPT-Pancreas (Anastasio et al.) and MiniGPT-v2 (Chen et al.). The module layout follows "
            "3D Slicer's scripted-module template and SlicerMONAIAuto3DSeg.")
        self.parent.icon = qt.QIcon(_resourcePath("Icons", "MiniGPTPancreas.png"))


@parameterNodeWrapper
class MiniGPTPancreasParameterNode:
    """Saved with the scene. The server URL lives in the application settings, the token nowhere."""

    inputVolume: vtkMRMLScalarVolumeNode
    prompt: str = PRESETS[0].prompt
    sweep: bool = False
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0


class MiniGPTPancreasWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: network calls run in a BackgroundTask; a timer hands their results back to this (GUI) thread."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._onTaskFinished = None
        self._lastAnswers = {}  # model-view slice -> QueryResponse of the last Apply
        self._lastVolumeID = None
        self._truthChoices = []  # (title, truth_mask arguments) per entry of truthPartComboBox

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resourcePath("UI", "MiniGPTPancreas.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MiniGPTPancreasLogic()
        for preset in PRESETS:
            self.ui.presetComboBox.addItem(preset.title, preset.key)
        self.ui.presetComboBox.addItem(_("Your own question (edit the prompt)"), CUSTOM_PROMPT)
        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SERVER_URL_SETTING, DEFAULT_URL)
        self.ui.progressBar.hide()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._drainTask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.promptLineEdit.connect("textEdited(QString)", self.onPromptEdited)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.wholeVolumeButton.connect("clicked(bool)", self.onWholeVolume)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.truthSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTruthChanged)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self._abandonTask()
        self.logic.client.close()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event):
        self._abandonTask()
        self._lastAnswers, self._lastVolumeID = {}, None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = MiniGPTPancreasParameterNode(self.logic.parameter_node(slicer.mrmlScene))
        if not parameterNode.inputVolume:  # save the user a click
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.inputVolume = firstVolume
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)  # "SlicerParameterName" in the .ui
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._selectPresetOf(self._parameterNode.prompt)
            self.onVolumeChanged(self._parameterNode.inputVolume)
        self._updateButtons()

    # --- GUI state ------------------------------------------------------------------------------------------------

    def _updateButtons(self, caller=None, event=None):
        busy = self._task is not None
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        self.ui.applyButton.text = _("Cancel") if busy else _("Apply")
        self.ui.applyButton.enabled = busy or volume is not None
        sweep = bool(self._parameterNode and self._parameterNode.sweep)
        for widget in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox, self.ui.wholeVolumeButton):
            widget.enabled = sweep
        self.ui.testConnectionButton.enabled = not busy
        self.ui.compareButton.enabled = (not busy and bool(self._lastAnswers)
                                         and self.ui.truthSelector.currentNode() is not None)

    def _selectPresetOf(self, prompt):
        keys = [preset.key for preset in PRESETS if preset.prompt == prompt.strip()]
        index = self.ui.presetComboBox.findData(keys[0] if keys else CUSTOM_PROMPT)
        wasBlocked = self.ui.presetComboBox.blockSignals(True)
        self.ui.presetComboBox.currentIndex = index
        self.ui.presetComboBox.blockSignals(wasBlocked)

    def onPresetChanged(self, index):
        key = self.ui.presetComboBox.itemData(index)
        preset = next((preset for preset in PRESETS if preset.key == key), None)
        if preset is not None and self._parameterNode:
            self._parameterNode.prompt = preset.prompt

    def onPromptEdited(self, text):
        self._selectPresetOf(text)

    def onVolumeChanged(self, volumeNode):
        try:
            slices = model_view_geometry(volumeNode).shape[0] if volumeNode else 1
        except ValueError:  # no voxels, oblique...: Apply will say why
            slices = 1
        for spinBox in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox):
            spinBox.maximum = slices - 1
        if self._parameterNode and (self._parameterNode.lastSlice == 0 or self._parameterNode.lastSlice >= slices):
            self._parameterNode.lastSlice = slices - 1

    def onWholeVolume(self):
        self._parameterNode.firstSlice = 0
        self._parameterNode.lastSlice = self.ui.lastSliceSpinBox.maximum

    # --- running a question --------------------------------------------------------------------------------------

    def onApplyButton(self):
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        try:
            self._connectLogic()
            if not self._confirmUpload():
                return
            volume, prompt = self._parameterNode.inputVolume, self._parameterNode.prompt.strip()
            if not prompt:
                raise ValueError(_("The prompt is empty. Choose a question or type one."))
            if self._parameterNode.sweep:
                self._startSweep(volume, prompt)
            else:
                self._startSliceQuery(volume, prompt)
        except Exception as error:  # noqa: BLE001 - every failure is shown, none is lost
            self._reportError(error)

    def _startSliceQuery(self, volume, prompt):
        redSliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if redSliceNode is None:
            raise ValueError(_("There is no Red slice view to take the current slice from; sweep a slice range."))
        sliceIndex = current_model_slice(volume, redSliceNode)
        request = self.logic.prepare_slice(volume, sliceIndex)

        def finished(response):
            self.logic.add_slice_boxes(request, response, prompt, slicer.mrmlScene, volume)
            self._lastAnswers, self._lastVolumeID = {sliceIndex: response}, volume.GetID()
            self.ui.statusLabel.text = describe_response(response, sliceIndex)

        self._start(lambda report, cancelled: self.logic.query_slice(request, prompt), finished,
                    _("Asking about slice {index}...").format(index=sliceIndex))

    def _startSweep(self, volume, prompt):
        request = self.logic.prepare_sweep(volume, (self._parameterNode.firstSlice, self._parameterNode.lastSlice))

        def work(report, cancelled):
            return self.logic.run_sweep(request, prompt, lambda done, total: report((done, total)), cancelled)

        def finished(outcome):
            self.logic.add_sweep_boxes(request, outcome, prompt, slicer.mrmlScene, volume)
            self._lastAnswers, self._lastVolumeID = outcome.responses, volume.GetID()
            self.ui.statusLabel.text = describe_sweep(outcome.state, outcome.done, outcome.total, outcome.responses,
                                                      outcome.message)

        self._start(work, finished, _("Uploading slices {first} to {last}...").format(
            first=request.first_slice, last=request.last_slice))

    def onTestConnection(self):
        try:
            self._connectLogic()
        except Exception as error:  # noqa: BLE001
            self._reportError(error)
            return
        url = self.logic.client.base_url
        self._start(lambda report, cancelled: self.logic.check_server(),
                    lambda health: setattr(self.ui.statusLabel, "text", describe_health(health, url)),
                    _("Contacting {url}...").format(url=url))

    def _connectLogic(self):
        """Point the logic at the URL and token of the panel; remember the URL (never the token)."""
        self.logic.set_server(self.ui.serverUrlLineEdit.text, self.ui.tokenLineEdit.text or None)
        self.ui.serverUrlLineEdit.text = self.logic.client.base_url
        qt.QSettings().setValue(SERVER_URL_SETTING, self.logic.client.base_url)

    def _confirmUpload(self):
        if urlsplit(self.logic.client.base_url).hostname in LOOPBACK_HOSTS:
            return True
        return slicer.util.confirmOkCancelDisplay(
            _("The voxel values of the CT slices you ask about (no names, no DICOM tags) will be sent to {url}. "
              "Continue?").format(url=self.logic.client.base_url),
            windowTitle=_("MiniGPT-Pancreas"), dontShowAgainSettingsKey=UPLOAD_WARNING_SETTING)

    def _start(self, work, onFinished, statusText):
        self._task, self._onTaskFinished = BackgroundTask(work), onFinished
        self.ui.statusLabel.text = statusText
        self.ui.progressBar.setRange(0, 0)  # busy indicator until the task reports progress
        self.ui.progressBar.show()
        self._task.start()
        self._timer.start()
        self._updateButtons()

    def _drainTask(self):
        task = self._task
        if task is None:
            self._timer.stop()
            return
        for event in task.drain():
            if event.kind == PROGRESS:
                done, total = event.payload
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.value = done
                self.ui.statusLabel.text = _("Sweeping: {done} of {total} slices answered").format(done=done,
                                                                                                 total=total)
                continue
            self._timer.stop()
            self._task, onFinished = None, self._onTaskFinished
            self.ui.progressBar.hide()
            try:
                if event.kind == FAILED:
                    raise event.payload
                if task.cancel_requested and not isinstance(event.payload, SweepOutcome):
                    self.ui.statusLabel.text = _("Cancelled; the late answer was dropped.")
                else:
                    onFinished(event.payload)
            except Exception as error:  # noqa: BLE001
                self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
                self._reportError(error)
            self._updateButtons()
            return

    def _abandonTask(self):
        """Stop listening to the running task (it stops at its next check); its result is dropped."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._timer.stop()
        self.ui.progressBar.hide()

    @staticmethod
    def _reportError(error):
        if isinstance(error, (ClientError, ValueError)):  # their messages say what happened and what to do
            slicer.util.errorDisplay(str(error), windowTitle=_("MiniGPT-Pancreas"))
            return
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logging.error(details)
        slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=error), windowTitle=_("MiniGPT-Pancreas"),
                                 detailedText=details)

    # --- ground truth -------------------------------------------------------------------------------------------

    def onTruthChanged(self, truthNode):
        self._truthChoices = truth_choices(truthNode)
        self.ui.truthPartComboBox.clear()
        for title, _selection in self._truthChoices:
            self.ui.truthPartComboBox.addItem(title)
        self._updateButtons()

    def onCompare(self):
        try:
            truthNode, volume = self.ui.truthSelector.currentNode(), slicer.mrmlScene.GetNodeByID(self._lastVolumeID)
            if volume is None:
                raise ValueError(_("The volume of the last answers is gone; ask again first."))
            if not any(response.kind == "boxes" for response in self._lastAnswers.values()):
                raise ValueError(_("The last answers have no boxes (a yes/no question?). Ask a box question first."))
            _title, selection = self._truthChoices[self.ui.truthPartComboBox.currentIndex]
            comparison = self.logic.compare_with_ground_truth(volume, truthNode, predictions_of(self._lastAnswers),
                                                              **selection)
        except Exception as error:  # noqa: BLE001
            self._reportError(error)
            return
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(comparison.table_node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        mean = "n/a" if comparison.mean_iou is None else f"{comparison.mean_iou:.3f}"
        self.ui.statusLabel.text = _("Mean IoU {mean} over {count} slices; see the table '{name}'.").format(
            mean=mean, count=len(comparison.rows), name=comparison.table_node.GetName())


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
                           label="truth", volume_node=ct, add_fused_roi=True)
        self.assertEqual(len(run.rois), len(truths))
        self.delayDisplay("Test passed")

    def test_MiniGPTPancreas_AnalyzeSliceIfReady(self):
        url = qt.QSettings().value(SERVER_URL_SETTING, DEFAULT_URL)
        logic = MiniGPTPancreasLogic()
        try:
            logic.set_server(url)
            health = logic.check_server()
        except ClientError as error:
            self.delayDisplay(f"Skipped: no MiniGPT-Pancreas server is ready at {url} ({error})")
            return
        if health.status != "ok":
            self.delayDisplay(f"Skipped: the server at {url} is {health.status}")
            return
        phantom, ct, _labels = self._phantomNodes()
        slices = sorted(truth_boxes(phantom.labels > 0, phantom.ijk_to_ras))
        sliceIndex = slices[len(slices) // 2]
        response = logic.analyze_slice(ct, sliceIndex, PRESETS[0].prompt)
        self.assertEqual(response.slice_index, sliceIndex)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")), len(response.boxes))
        self.delayDisplay(describe_response(response, sliceIndex))
