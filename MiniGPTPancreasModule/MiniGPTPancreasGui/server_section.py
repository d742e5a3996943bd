"""The server part of the panel: the local server (start, stop, its log), the connection, and the questions the
server offers. A mixin of MiniGPTPancreasWidget (MiniGPTPancreas.py), which provides self.ui, self.logic,
self._parameterNode, self._start (run work off the GUI thread), self._reportError and self._updateButtons.
"""

from urllib.parse import urlsplit

import qt
import slicer
from slicer.i18n import tr as _

from MiniGPTPancreasLib.local_server import LOOPBACK_HOSTS, STARTED, default_executable, default_model_dir
from MiniGPTPancreasLib.prompts import menu_entries
from MiniGPTPancreasLib.summaries import describe_info
from SlicerMiniGPTPancreas.client import DEFAULT_URL

SETTINGS = "MiniGPTPancreas/"  # + ServerUrl, ServerExecutable, ModelFolder, DontShowUploadWarning
CUSTOM_PROMPT = ""  # the menu entry for a question typed by hand
LOG_INTERVAL_MS = 500


class ServerSection:
    """Start/stop/connect buttons, the model label, the question menu and the prompt line edit."""

    def _setupServerSection(self):
        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS + "ServerUrl", DEFAULT_URL)
        self.ui.executableLineEdit.text = settings.value(SETTINGS + "ServerExecutable", default_executable())
        self.ui.modelDirLineEdit.text = settings.value(SETTINGS + "ModelFolder", default_model_dir())
        self.logic.local_server.launch = lambda args: slicer.util.launchConsoleProcess(args, useStartupEnvironment=True)
        self._logTimer.setInterval(LOG_INTERVAL_MS)  # the local server's output, to the Python console
        self._logTimer.connect("timeout()", self._printServerLog)
        slicer.app.connect("aboutToQuit()", self._stopLocalServer)
        self._fillPresets()

    def _fillPresets(self):
        """The questions the connected server offers, a group per task of its model (a separator between them, the
        task named in the tooltip), then the entry for a question of one's own."""
        comboBox = self.ui.presetComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        for preset in menu_entries(self.logic.presets) + [None]:
            if preset is None:  # between two tasks, and before one's own question (none in an empty menu)
                if comboBox.count:
                    comboBox.insertSeparator(comboBox.count)
                continue
            comboBox.addItem(preset.title, preset.prompt)
            comboBox.setItemData(comboBox.count - 1, preset.task, qt.Qt.ToolTipRole)
        comboBox.addItem(_("Your own question (type it below)"), CUSTOM_PROMPT)
        comboBox.blockSignals(wasBlocked)
        if self._parameterNode and not self._parameterNode.prompt and self.logic.presets:
            self._parameterNode.prompt = self.ui.promptLineEdit.text = self.logic.presets[0].prompt
        self._selectPresetOf(self.ui.promptLineEdit.text)

    def _selectPresetOf(self, prompt):
        index = self.ui.presetComboBox.findData(prompt.strip())
        wasBlocked = self.ui.presetComboBox.blockSignals(True)
        self.ui.presetComboBox.currentIndex = index if index >= 0 else self.ui.presetComboBox.count - 1
        self.ui.presetComboBox.blockSignals(wasBlocked)

    def onPresetChanged(self, index):
        prompt = self.ui.presetComboBox.itemData(index)
        if prompt and self._parameterNode:
            self._parameterNode.prompt = self.ui.promptLineEdit.text = prompt

    def onPromptEdited(self, text):
        if self._parameterNode:
            self._parameterNode.prompt = text  # the line edit is not rewritten: the cursor stays where it is
        self._selectPresetOf(text)

    def _connectLogic(self):
        """Point the logic at the URL and token and the local server at the executable and model folder of the
        panel; remember all but the token."""
        self.logic.set_server(self.ui.serverUrlLineEdit.text, self.ui.tokenLineEdit.text or None)
        self.ui.serverUrlLineEdit.text = self.logic.client.base_url
        server = self.logic.local_server
        server.executable = self.ui.executableLineEdit.text.strip() or default_executable()
        server.model_dir = self.ui.modelDirLineEdit.text.strip()
        for key, value in (("ServerUrl", self.logic.client.base_url), ("ServerExecutable", server.executable),
                           ("ModelFolder", server.model_dir)):
            qt.QSettings().setValue(SETTINGS + key, value)

    def onStartServer(self):
        try:
            self._connectLogic()
            started = self.logic.launch_local_server() == STARTED
            self._logTimer.start()
            self._start(lambda report, cancelled: self.logic.wait_for_server(should_cancel=cancelled), self._showInfo,
                        _("Starting: {command}").format(command=self.logic.local_server.shown) if started
                        else _("A server already answers at {url}; using it.").format(url=self.logic.client.base_url))
        except Exception as error:  # noqa: BLE001
            self._reportError(error)

    def _stopLocalServer(self):
        if self.logic is not None and self.logic.stop_local_server() is not None:
            self.ui.modelLabel.text = _("The local server was stopped.")
        self._printServerLog()
        self._logTimer.stop()
        self._updateButtons()

    def _printServerLog(self):
        for line in self.logic.local_server.log_lines():
            print(f"[minigpt-pancreas serve] {line}")

    def onConnect(self):
        try:
            self._connectLogic()
        except Exception as error:  # noqa: BLE001
            self._reportError(error)
            return
        self._start(lambda report, cancelled: self.logic.connect(), self._showInfo,
                    _("Contacting {url}...").format(url=self.logic.client.base_url))

    def _showInfo(self, info):
        self.ui.modelLabel.text = describe_info(info, self.logic.client.base_url)
        self.ui.statusLabel.text = self.ui.modelLabel.text
        self._fillPresets()

    def _confirmUpload(self):
        if urlsplit(self.logic.client.base_url).hostname in LOOPBACK_HOSTS:
            return True
        return slicer.util.confirmOkCancelDisplay(
            _("The voxel values of the CT slices you ask about (no names, no DICOM tags) will be sent to {url}. "
              "Continue?").format(url=self.logic.client.base_url),
            windowTitle=_("MiniGPT-Pancreas"), dontShowAgainSettingsKey=SETTINGS + "DontShowUploadWarning")
