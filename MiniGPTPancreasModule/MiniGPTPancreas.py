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

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_DIR = os.path.dirname(_MODULE_DIR)
if not os.path.isdir(os.path.join(_MODULE_DIR, "SlicerMiniGPTPancreas")) and _CHECKOUT_DIR not in sys.path:
    sys.path.append(_CHECKOUT_DIR)  # run from a source checkout: the core package sits at the repository top level

# MiniGPTPancreasLogic lives in the Lib so that it imports without the GUI; this module re-exports it.
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic  # noqa: E402
from MiniGPTPancreasLib.results import results_table  # noqa: E402
from MiniGPTPancreasLib.summaries import describe_response, describe_sweep  # noqa: E402
from MiniGPTPancreasLib.volume_geometry import (current_model_slice, first_ct_volume, model_view_geometry,  # noqa: E402
                                                slice_center_ras)
from MiniGPTPancreasLib.worker import DRAIN_INTERVAL_MS, TaskRunner  # noqa: E402
from MiniGPTPancreasGui.self_test import MiniGPTPancreasTest  # noqa: E402, F401 - Slicer runs <Module>Test from here
from MiniGPTPancreasGui.server_section import ServerSection  # noqa: E402
from MiniGPTPancreasGui.truth_section import TruthSection  # noqa: E402
from SlicerMiniGPTPancreas.client import ServerNotRunningError  # noqa: E402
from SlicerMiniGPTPancreas.errors import UserError  # noqa: E402

SERVE_COMMAND = "minigpt-pancreas serve --model <model folder> --port 8765"


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
            "markups on their slice; a sweep adds a 3D box; ground truth gives IoU per slice. The model runs in a "
            "separate server: <i>Start local server</i> runs <code>{command}</code> from the project's environment "
            "(or start it yourself in a terminal). <b>Research software: not a medical device, not for diagnosis or "
            "treatment decisions.</b>").format(command=SERVE_COMMAND)
        self.parent.acknowledgementText = _(
            "Built on MiniGPT-Pancreas (Anastasio et al.) and MiniGPT-v2 (Chen et al.). The module layout follows "
            "3D Slicer's scripted-module template and SlicerMONAIAuto3DSeg.")
        self.parent.icon = qt.QIcon(_resourcePath("Icons", "MiniGPTPancreas.png"))


@parameterNodeWrapper
class MiniGPTPancreasParameterNode:
    """Saved with the scene. The server URL lives in the application settings, the token nowhere. `prompt` is not
    bound to its line edit: Slicer 5.6/5.8 rewrite a bound line edit on every key, moving the cursor to the end."""

    inputVolume: vtkMRMLScalarVolumeNode
    prompt: str = ""
    sweep: bool = False
    resampleTilted: bool = False  # MiniGPTPancreasLogic.resample_tilted
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0


class MiniGPTPancreasWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, ServerSection, TruthSection):
    """The panel: network calls run in a TaskRunner; a timer hands their results back to this (GUI) thread."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = TaskRunner()
        self._timer = qt.QTimer()  # drains the runner while a task runs
        self._logTimer = qt.QTimer()  # prints the local server's log
        self._truthChoices = []  # (title, truth_mask arguments) per entry of truthPartComboBox

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resourcePath("UI", "MiniGPTPancreas.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MiniGPTPancreasLogic()
        self.ui.progressBar.hide()
        self._timer.setInterval(DRAIN_INTERVAL_MS)
        self._timer.connect("timeout()", self._drainTask)
        self._setupServerSection()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for name, signal, slot in (
                ("presetComboBox", "currentIndexChanged(int)", self.onPresetChanged),
                ("promptLineEdit", "textEdited(QString)", self.onPromptEdited),
                ("inputVolumeSelector", "currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged),
                ("wholeVolumeButton", "clicked(bool)", self.onWholeVolume),
                ("firstFromCurrentButton", "clicked(bool)", lambda: self._setRangeFromCurrent("firstSlice")),
                ("lastFromCurrentButton", "clicked(bool)", lambda: self._setRangeFromCurrent("lastSlice")),
                ("applyButton", "clicked(bool)", self.onApplyButton),
                ("thresholdSlider", "valueChanged(double)", self.onThresholdChanged),
                ("resampleTiltedCheckBox", "toggled(bool)",  # the sweep's grid, and so its slice count, changes
                 lambda: self.onVolumeChanged(self.ui.inputVolumeSelector.currentNode())),
                ("startServerButton", "clicked(bool)", self.onStartServer),
                ("stopServerButton", "clicked(bool)", self._stopLocalServer),
                ("testConnectionButton", "clicked(bool)", self.onConnect),
                ("resultsTableView", "clicked(QModelIndex)", self.onResultClicked),
                ("exportButton", "clicked(bool)", self.onExport),
                ("truthSelector", "currentNodeChanged(vtkMRMLNode*)", self.onTruthChanged),
                ("compareButton", "clicked(bool)", self.onCompare),
                ("chatAskButton", "clicked(bool)", self.onChat),
                ("chatLineEdit", "returnPressed()", self.onChat)):
            getattr(self.ui, name).connect(signal, slot)
        self.initializeParameterNode()

    def cleanup(self):
        """Also called when setup() failed half-way: only undo what exists."""
        self.removeObservers()
        if self.logic is None:
            return
        self._runner.cancel()
        self._timer.stop()
        self._logTimer.stop()
        self._stopLocalServer()
        self.logic.client.close()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event):
        if self._runner.cancel():
            self._taskEnded()
        self.logic.last_run = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = MiniGPTPancreasParameterNode(self.logic.parameter_node(slicer.mrmlScene))
        if not parameterNode.inputVolume:  # save the user a click (a label map is never the CT)
            parameterNode.inputVolume = first_ct_volume(slicer.mrmlScene)
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)  # "SlicerParameterName" in the .ui
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self.ui.promptLineEdit.text = self._parameterNode.prompt
            self._selectPresetOf(self._parameterNode.prompt)
            self.onVolumeChanged(self._parameterNode.inputVolume)
        self._updateButtons()

    # --- GUI state ------------------------------------------------------------------------------------------------

    def onThresholdChanged(self, threshold):
        with slicer.util.RenderBlocker():
            self.logic.set_threshold(slicer.mrmlScene, None, threshold)

    def _updateButtons(self, caller=None, event=None):
        busy = self._runner.busy
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        self.ui.applyButton.text = _("Cancel") if busy else _("Apply")
        self.ui.applyButton.enabled = busy or volume is not None
        sweep = bool(self._parameterNode and self._parameterNode.sweep)
        for widget in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox, self.ui.wholeVolumeButton,
                       self.ui.firstFromCurrentButton, self.ui.lastFromCurrentButton, self.ui.resampleTiltedCheckBox):
            widget.enabled = sweep
        for widget in (self.ui.testConnectionButton, self.ui.startServerButton, self.ui.chatAskButton):
            widget.enabled = not busy
        self.ui.stopServerButton.enabled = self.logic.local_server.running
        self.ui.exportButton.enabled = self.logic.last_run is not None
        self.ui.compareButton.enabled = (not busy and self.logic.last_run is not None
                                         and self.ui.truthSelector.currentNode() is not None)

    def onVolumeChanged(self, volumeNode):
        self.logic.resample_tilted = self.ui.resampleTiltedCheckBox.checked  # the range is on the grid swept
        try:
            slices = self.logic.sweep_geometry(volumeNode).shape[0] if volumeNode else 1
        except UserError:  # no voxels, tilted without resampling...: Apply will say why
            slices = 1
        for spinBox in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox):
            spinBox.maximum = slices - 1
        if self._parameterNode and (self._parameterNode.lastSlice == 0 or self._parameterNode.lastSlice >= slices):
            self._parameterNode.lastSlice = slices - 1
        red = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        if volumeNode is not None and red is not None and red.GetBackgroundVolumeID() != volumeNode.GetID():
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)  # "the current slice" is of this CT

    def onWholeVolume(self):
        self._parameterNode.firstSlice = 0
        self._parameterNode.lastSlice = self.ui.lastSliceSpinBox.maximum

    def _currentSlice(self, view):
        redSliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if redSliceNode is None:
            raise ValueError(_("There is no Red slice view to take the current slice from; sweep a slice range."))
        return current_model_slice(view, redSliceNode)

    def _setRangeFromCurrent(self, field):
        try:
            view = self.logic.sweep_geometry(self._parameterNode.inputVolume)  # a tilted volume's resampled grid
            setattr(self._parameterNode, field, self._currentSlice(view))
        except Exception as error:  # noqa: BLE001
            self._reportError(error)

    # --- running a question --------------------------------------------------------------------------------------

    def onApplyButton(self):
        if self._runner.busy:
            freed = self._runner.cancel()
            self.ui.statusLabel.text = _("Cancelled; a late answer will be dropped.") if freed else _("Cancelling...")
            if freed:
                self._taskEnded()
            return
        try:
            volume, prompt = self._readyVolume(), self._parameterNode.prompt.strip()
            if not prompt:
                raise ValueError(_("The prompt is empty. Connect to the server to see its questions, or type one."))
            if volume is not None:
                (self._startSweep if self._parameterNode.sweep else self._startSliceQuery)(volume, prompt)
        except Exception as error:  # noqa: BLE001 - every failure is shown, none is lost
            self._reportError(error)

    def _readyVolume(self):
        """The input volume once the logic points at the panel's server and the user agreed to send voxels."""
        volume = self._parameterNode.inputVolume
        if volume is None:
            raise ValueError(_("Choose a CT volume first."))
        self._connectLogic()
        return volume if self._confirmUpload() else None

    def _startSliceQuery(self, volume, prompt):
        request = self.logic.prepare_slice(volume, self._currentSlice(model_view_geometry(volume)))

        def finished(response):
            run = self.logic.add_slice_boxes(request, response, prompt, slicer.mrmlScene, volume)
            self._showRun(run, describe_response(response, request.slice_index))

        self._start(lambda report, cancelled: self.logic.query_slice(request, prompt), finished,
                    _("Asking about slice {index}...").format(index=request.slice_index), dropWhenCancelled=True)

    def _startSweep(self, volume, prompt):
        self.logic.resample_tilted = self._parameterNode.resampleTilted
        request = self.logic.prepare_sweep(volume, (self._parameterNode.firstSlice, self._parameterNode.lastSlice))

        def work(report, cancelled):
            return self.logic.run_sweep(request, prompt, lambda done, total: report((done, total)), cancelled)

        def finished(outcome):
            with slicer.util.RenderBlocker():
                run = self.logic.add_sweep_boxes(request, outcome, prompt, slicer.mrmlScene, volume,
                                                 self._parameterNode.threshold)
            self._showRun(run, describe_sweep(
                outcome.state, outcome.done, outcome.total, outcome.responses, outcome.message, request.resampled))

        self._start(work, finished, _("Uploading slices {first} to {last}...").format(
            first=request.first_slice, last=request.last_slice))

    def _showRun(self, run, text):
        self.ui.resultsTableView.setMRMLTableNode(results_table(slicer.mrmlScene, run.number))
        if run.dropped:
            text += " " + _("Only the {count} most confident boxes are drawn; the table has every answer.").format(
                count=len(run.rois))
        self.ui.statusLabel.text = text

    def onResultClicked(self, index):
        """Jump the slice views to the slice of the clicked row (its first column)."""
        last = self.logic.last_run
        text = self.ui.resultsTableView.model().data(self.ui.resultsTableView.model().index(index.row(), 0))
        try:
            sliceIndex = int(float(text))
        except (TypeError, ValueError):  # a header row
            return
        if last is not None:
            center = slice_center_ras(last.geometry, sliceIndex)
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *center)

    def onExport(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export the run into a folder"))
        if not folder:
            return
        try:
            paths = self.logic.export_last_run(folder)
            self.ui.statusLabel.text = _("Exported {files}.").format(files=", ".join(str(p) for p in paths))
        except Exception as error:  # noqa: BLE001
            self._reportError(error)

    def onChat(self):
        try:
            volume = self._readyVolume()
            if volume is None:
                return
            request = self.logic.prepare_slice(volume, self._currentSlice(model_view_geometry(volume)))
            sent = self.logic.chat_session.ask(volume.GetID(), request.slice_index, self.ui.chatLineEdit.text)
        except Exception as error:  # noqa: BLE001
            self._reportError(error)
            return

        def finished(reply):
            run = self.logic.add_chat_boxes(request, sent, reply, slicer.mrmlScene, volume)
            self.ui.chatTranscript.plainText = self.logic.chat_session.transcript()
            self.ui.chatLineEdit.text = ""
            self.ui.statusLabel.text = _("The model answered; {count} boxes drawn.").format(
                count=len(run.rois) if run else 0)

        self._start(lambda report, cancelled: self.logic.chat(request, sent), finished,
                    _("Asking about slice {index}...").format(index=request.slice_index), dropWhenCancelled=True)

    def _start(self, work, onFinished, statusText, dropWhenCancelled=False):
        self._runner.start(work, onFinished, self._showProgress, drop_when_cancelled=dropWhenCancelled)
        self.ui.statusLabel.text = statusText
        self.ui.progressBar.setRange(0, 0)  # busy indicator until the task reports progress
        self.ui.progressBar.show()
        self._timer.start()
        self._updateButtons()

    def _showProgress(self, progress):
        done, total = progress
        self.ui.progressBar.setRange(0, total)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = _("Sweeping: {done} of {total} slices answered").format(done=done, total=total)

    def _drainTask(self):
        try:
            self._runner.poll()
        except Exception as error:  # noqa: BLE001
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            self._reportError(error)
        if not self._runner.busy:
            self._taskEnded()

    def _taskEnded(self):
        self._timer.stop()
        self.ui.progressBar.hide()
        self._updateButtons()

    def _reportError(self, error):
        if isinstance(error, UserError):  # its message says what to do; anything else is a bug: show its traceback
            more = _(" Or press Start local server, which runs: {command}").format(
                command=self.logic.local_server.command_line(self.logic.client.base_url)
            ) if isinstance(error, ServerNotRunningError) else ""
            slicer.util.errorDisplay(str(error) + more, windowTitle=_("MiniGPT-Pancreas"))
            return
        details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        logging.error(details)
        slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=error), windowTitle=_("MiniGPT-Pancreas"),
                                 detailedText=details)
