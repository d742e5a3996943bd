"""The module's files as Slicer meets them: the .ui loaded for real with PyQt5's uic on the offscreen platform, every
widget name, signal and parameter binding the Widget uses checked against it; the CMake lists; the icon.

Slicer's ctk/qMRML widgets are not in PyQt5, so small stand-ins declare what the .ui and the Widget need of them:
the properties the .ui sets (a missing setter fails the load), the signals the Widget connects, and setMRMLScene
for the scene the panel hands down. Everything else (Qt's own widgets and properties) is the real thing.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import types
from pathlib import Path

import pytest

# slicer_fixtures first: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import MODULE_DIR, ROOT

QtWidgets = pytest.importorskip("PyQt5.QtWidgets")
from PyQt5 import QtCore, uic  # noqa: E402

UI_FILE = ROOT / "Resources" / "UI" / "MiniGPTPancreas.ui"
GUI_FILES = [MODULE_DIR / "MiniGPTPancreas.py", *sorted((MODULE_DIR / "MiniGPTPancreasGui").glob("*.py"))]
WIDGET_SOURCE = "\n".join(path.read_text(encoding="utf-8") for path in GUI_FILES)


class CppSignal:
    """A PyQt signal reached under the C++ signature a .ui connection names (PyQt cannot declare vtk pointers)."""

    def __init__(self, bound, signature):
        self._bound, self._signature = bound, signature

    def __getitem__(self, signature):
        assert signature == self._signature, f"no signal overload ({signature})"
        return self._bound


class MRMLSceneHolder:
    scene = None

    def setMRMLScene(self, scene):  # noqa: N802 - Qt's name
        self.scene = scene


class ctkCollapsibleButton(QtWidgets.QPushButton):  # noqa: N801 - Slicer's class names
    def setCollapsed(self, collapsed):  # noqa: N802
        self.collapsed = collapsed


class qMRMLNodeComboBox(QtWidgets.QWidget, MRMLSceneHolder):  # noqa: N801
    currentNodeChanged = QtCore.pyqtSignal(object)

    def setNodeTypes(self, types_):  # noqa: N802
        self.nodeTypes = list(types_)

    def setShowChildNodeTypes(self, value):  # noqa: N802
        self.showChildNodeTypes = value

    def setNoneEnabled(self, value):  # noqa: N802
        self.noneEnabled = value

    def setAddEnabled(self, value):  # noqa: N802
        self.addEnabled = value

    def setRemoveEnabled(self, value):  # noqa: N802
        self.removeEnabled = value


class ctkSliderWidget(QtWidgets.QWidget):  # noqa: N801
    valueChanged = QtCore.pyqtSignal(float)

    def setSingleStep(self, value):  # noqa: N802
        self.singleStep = value

    def setMaximum(self, value):  # noqa: N802
        self.maximum = value

    def setDecimals(self, value):  # noqa: N802
        self.decimals = value


class qMRMLTableView(QtWidgets.QTableView, MRMLSceneHolder):  # noqa: N801
    pass


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    sceneChanged = QtCore.pyqtSignal(object)

    @property
    def mrmlSceneChanged(self):  # noqa: N802
        return CppSignal(self.sceneChanged, "vtkMRMLScene*")


STAND_INS = (ctkCollapsibleButton, qMRMLNodeComboBox, ctkSliderWidget, qMRMLTableView, qMRMLWidget)


@pytest.fixture(scope="module")
def panel():
    """The .ui loaded by uic, as slicer.util.loadUI loads it in Slicer."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    for cls in STAND_INS:
        sys.modules[cls.__name__] = types.SimpleNamespace(**{cls.__name__: cls})  # uic imports the <header>
    try:
        yield uic.loadUi(str(UI_FILE))
    finally:
        for cls in STAND_INS:
            sys.modules.pop(cls.__name__, None)
    del app


def widget_names_used():
    """Names the Widget reaches as self.ui.<name>, or as strings in its table of signal connections."""
    connected = set(re.findall(r'\("(\w+)", "(\w+\([^)]*\))"', WIDGET_SOURCE))
    return set(re.findall(r"self\.ui\.(\w+)", WIDGET_SOURCE)) | {name for name, _ in connected}, connected


def signals_of(widget):
    meta = widget.metaObject()
    signatures = [bytes(meta.method(i).methodSignature()).decode() for i in range(meta.methodCount())
                  if meta.method(i).methodType() == QtCore.QMetaMethod.Signal]
    return {(s.split("(")[0], s.count(",") + 1 if "()" not in s else 0) for s in signatures}


def test_every_widget_the_code_uses_is_in_the_ui_with_the_signal_it_connects(panel):
    used, connected = widget_names_used()
    found = {name: panel.findChild(QtCore.QObject, name) for name in used}
    assert used and not [name for name, widget in found.items() if widget is None]
    for name, signature in connected:
        wanted = (signature.split("(")[0], len([a for a in signature[:-1].split("(")[1].split(",") if a]))
        assert wanted in signals_of(found[name]), f"{name} ({type(found[name]).__name__}) has no signal {signature}"


def test_every_mrml_widget_gets_the_scene_of_the_panel(panel):
    scene = object()
    panel.sceneChanged.emit(scene)
    holders = [w for w in panel.findChildren(QtWidgets.QWidget) if isinstance(w, MRMLSceneHolder)]
    assert len(holders) == 3 and all(w.scene is scene for w in holders)


def test_parameter_bindings_match_the_parameter_node_and_the_prompt_is_not_bound(panel):
    bound = {w.property("SlicerParameterName"): w for w in panel.findChildren(QtWidgets.QWidget)
             if w.property("SlicerParameterName")}
    (wrapper,) = [node for node in ast.walk(ast.parse(WIDGET_SOURCE))
                  if isinstance(node, ast.ClassDef) and node.name == "MiniGPTPancreasParameterNode"]
    fields = {item.target.id: ast.unparse(item.annotation) for item in wrapper.body if isinstance(item, ast.AnnAssign)}
    assert set(bound) == set(fields) - {"prompt"}  # prompt: the Widget writes it, see onPromptEdited
    kinds = {"vtkMRMLScalarVolumeNode": qMRMLNodeComboBox, "bool": QtWidgets.QCheckBox,
             "Annotated[int, Minimum(0)]": QtWidgets.QSpinBox,
             "Annotated[float, WithinRange(0.0, 1.0)]": ctkSliderWidget}
    assert {name: type(widget) for name, widget in bound.items()} == {name: kinds[fields[name]] for name in bound}
    assert panel.findChild(QtWidgets.QLineEdit, "promptLineEdit").property("SlicerParameterName") is None


def test_the_resample_check_box_is_bound_passed_to_the_logic_and_labelled_as_the_refusal_says(panel):
    from MiniGPTPancreasLib.volume_requests import RESAMPLE_CHECKBOX_TEXT

    box = panel.findChild(QtWidgets.QCheckBox, "resampleTiltedCheckBox")
    assert box is not None and box.property("SlicerParameterName") == "resampleTilted"
    assert box.text() == RESAMPLE_CHECKBOX_TEXT  # the refusal of a tilted volume tells the user to check it
    assert "nearest axial grid" in box.toolTip() and "resampled grid" in box.toolTip()
    assert "self.logic.resample_tilted = self._parameterNode.resampleTilted" in WIDGET_SOURCE  # before a sweep


def core_modules_imported_by(path: Path) -> set[str]:
    """Modules of SlicerMiniGPTPancreas that `path` imports (absolute or, inside the core, relative)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        inside_core = node.level == 1 and path.parent.name == "SlicerMiniGPTPancreas"
        if node.module and node.module.startswith("SlicerMiniGPTPancreas."):
            found.add(node.module.split(".")[1])
        elif node.module == "SlicerMiniGPTPancreas" or (inside_core and node.module is None):
            found.update(alias.name for alias in node.names)
        elif inside_core:
            found.add(node.module.split(".")[0])
    return found


def test_cmake_installs_every_module_file_and_every_core_module_the_module_needs():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"\$\{MODULE_NAME\}((?:Lib|Gui)/\w+\.py)", cmake))
    packages = [*(MODULE_DIR / "MiniGPTPancreasLib").glob("*.py"), *(MODULE_DIR / "MiniGPTPancreasGui").glob("*.py")]
    assert listed == {path.parent.name.removeprefix("MiniGPTPancreas") + "/" + path.name for path in packages}
    core_block = re.search(r"set\(CORE_MODULES\s+([^)]*)\)", cmake).group(1)
    listed_core = set(core_block.split())
    needed = {"__init__"}
    pending = [MODULE_DIR / "MiniGPTPancreas.py", *packages]
    while pending:
        for name in core_modules_imported_by(pending.pop()) - needed:
            needed.add(name)
            pending.append(ROOT / "SlicerMiniGPTPancreas" / f"{name}.py")
    assert needed <= listed_core, f"not installed with the module: {sorted(needed - listed_core)}"
    assert all((ROOT / "SlicerMiniGPTPancreas" / f"{name}.py").is_file() for name in listed_core)
    resources = re.findall(r"^\s+(UI/\S+|Icons/\S+)$", cmake, re.MULTILINE)
    assert sorted(resources) == ["Icons/${MODULE_NAME}.png", "UI/${MODULE_NAME}.ui"]
    assert all((ROOT / "Resources" / r.replace("${MODULE_NAME}", "MiniGPTPancreas")).is_file() for r in resources)


def test_module_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(ROOT / "Resources" / "Icons" / "MiniGPTPancreas.png") as icon:
        assert (icon.format, icon.size) == ("PNG", (128, 128))
