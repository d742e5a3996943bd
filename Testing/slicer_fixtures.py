"""Shared helpers for the Slicer module tests (Testing/test_slicer_*.py): scenes, the phantom, CT nodes, expected
model views and truth boxes, and a real server in a thread.

Importing this module skips the importing test module when the slicer-core wheel (MRML without the Slicer
application) is missing, and puts MiniGPTPancreasModule/ on sys.path so `MiniGPTPancreasLib` imports.
The `scene` and `phantom` fixtures built from new_scene() and noise_free_phantom() live in Testing/conftest.py.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel: MRML without the Slicer application

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MiniGPTPancreasModule"
sys.path.insert(0, str(MODULE_DIR))

from backend import prompts as backend_prompts  # noqa: E402  (the strings only: no torch)
from MiniGPTPancreasLib import volume_geometry  # noqa: E402
from SlicerMiniGPTPancreas.geometry import ModelView, mask_box  # noqa: E402
from SlicerMiniGPTPancreas.phantom import make_phantom  # noqa: E402

WAIT_S = 20.0
REFER = backend_prompts.refer_eval_instruction(backend_prompts.PANCREAS_PHRASE)
TUMOUR = backend_prompts.refer_eval_instruction(backend_prompts.TUMOR_PHRASE)
# A linear transform that keeps the grid axis-aligned: 90 degrees about S (x -> y), then a shift.
ROTATE_90_AND_SHIFT = np.array([[0.0, -1.0, 0.0, 12.5], [1.0, 0.0, 0.0, -7.0], [0.0, 0.0, 1.0, 30.0], [0, 0, 0, 1]])


def new_scene():
    """An empty MRML scene (one per test)."""
    return slicer.vtkMRMLScene()


def noise_free_phantom():
    """The noise-free phantom the Slicer tests share (built once per test module)."""
    return make_phantom(3, noise_hu=0.0)


def add_transform(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(volume_geometry.numpy_to_matrix(matrix))
    return node


def add_ct(scene, ph, transform=None, name="CT"):
    """A scalar volume node holding the phantom, optionally under a linear transform."""
    node = volume_geometry.add_volume_node(scene, ph.hu, ph.ijk_to_ras, name)
    if transform is not None:
        node.SetAndObserveTransformNodeID(add_transform(scene, transform).GetID())
    return node


def expected_view(ph, transform=None):
    """The model view of the phantom in world RAS, straight from its arrays and matrix."""
    world = ph.ijk_to_ras if transform is None else transform @ ph.ijk_to_ras
    return ModelView.from_volume(ph.hu, world)


def truth_slices(labels_kji, matrix, values):
    """{s: box} computed slice by slice with the core's mask_box."""
    view = ModelView.from_volume(np.isin(labels_kji, values), matrix)
    boxes = {s: mask_box(view.slice(s)) for s in range(view.shape[0])}
    return {s: box for s, box in boxes.items() if box is not None}


# ----------------------------------------------------------------------------------- a real server

class Gate:
    """In front of the engine (gated_engine.GatedEngine): open by default; while closed, the engine thread waits
    at its next call."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.holding = threading.Event()  # the engine thread is waiting at the gate

    def __call__(self) -> None:
        if not self._open.is_set():
            self.holding.set()
            self._open.wait(WAIT_S)

    def close(self) -> None:
        self.holding.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()
