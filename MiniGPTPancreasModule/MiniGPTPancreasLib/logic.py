"""MiniGPTPancreasLogic: the module's logic, usable without the GUI (Python console, scripts, tests).

Every operation comes in steps so that a GUI can keep MRML on its main thread and the network off it:
`prepare_*` reads the volume node (main thread) into a self-contained request, `query_slice` / `run_sweep` talk to
the server (blocking: any thread), `add_*_boxes` creates the ROI nodes (main thread). `analyze_slice` and
`sweep_volume` chain the steps synchronously for scripts.

    logic = MiniGPTPancreasLogic()
    logic.set_server("http://127.0.0.1:8765", token=None)
    response = logic.analyze_slice(ct_node, 42, PRESETS[0].prompt)     # boxes become ROIs in ct_node's scene
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.client import DEFAULT_URL, MiniGPTPancreasClient, ResourceNotFoundError
from SlicerMiniGPTPancreas.geometry import Box, GeometryError, ModelView

from .boxes_to_markups import PlacedBox, RoiRun, add_box_rois
from .ground_truth import SliceComparison, compare_boxes, mean_iou, truth_boxes, truth_mask, write_comparison_table
from .prompts import box_label_for_prompt
from .volume_geometry import model_view, model_view_geometry, to_int16_hu, volume_array_and_matrix

MODULE_NAME = "MiniGPTPancreas"
DEFAULT_POLL_INTERVAL_S = 0.5


@dataclass(frozen=True, eq=False)
class SliceRequest:
    """One model-view slice read from a volume node, ready to send from any thread."""

    volume_name: str
    geometry: ModelView  # world geometry of the whole volume, without voxels
    slice_index: int
    slice_hu: np.ndarray  # [R, C] int16 copy
    pixel_spacing_mm: tuple[float, float]  # (col, row)


@dataclass(frozen=True, eq=False)
class SweepRequest:
    """Model-view slices first..last (inclusive) of a volume node, ready to upload from any thread."""

    volume_name: str
    geometry: ModelView
    first_slice: int
    last_slice: int
    volume_hu: np.ndarray  # [last - first + 1, R, C] int16 copy
    spacing_mm: tuple[float, float, float]  # (col, row, slice)
    upload_key: tuple  # identifies these voxels: the same key reuses the server's copy


@dataclass(frozen=True)
class SweepOutcome:
    """How a sweep ended and the answer for every slice it finished, keyed by MODEL-VIEW slice of the volume."""

    state: str  # done | cancelled | failed
    done: int
    total: int
    responses: dict[int, p.QueryResponse]
    message: str | None = None

    @property
    def predictions(self) -> dict[int, list[Box]]:
        return predictions_of(self.responses)


@dataclass(frozen=True)
class Comparison:
    rows: list[SliceComparison]
    mean_iou: float | None
    table_node: Any


def predictions_of(responses: Mapping[int, p.QueryResponse]) -> dict[int, list[Box]]:
    """{slice: boxes} of answers; answers without boxes (nothing found, unreadable) give an empty list."""
    return {s: [box.box for box in response.boxes] for s, response in responses.items()}


def placed_boxes(responses: Mapping[int, p.QueryResponse]) -> list[PlacedBox]:
    return [PlacedBox(s, box.box, box.confidence, box.label)
            for s, response in sorted(responses.items()) for box in response.boxes]


class MiniGPTPancreasLogic:
    """Talks to one MiniGPT-Pancreas server and turns its answers into MRML nodes. Holds no GUI state."""

    def __init__(self, client: MiniGPTPancreasClient | None = None, *,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client if client is not None else MiniGPTPancreasClient(DEFAULT_URL)
        self.poll_interval_s = poll_interval_s
        self._sleep = sleep
        self._uploads: dict[tuple, str] = {}  # SweepRequest.upload_key -> the server's volume id

    @property
    def client(self) -> MiniGPTPancreasClient:
        return self._client

    def set_server(self, base_url: str, token: str | None = None, **client_options: Any) -> None:
        """Use the server at `base_url` (ConnectionSettingsError for a bad address or token)."""
        new_client = MiniGPTPancreasClient(base_url, token=token, **client_options)
        if new_client.base_url != self._client.base_url:
            self._uploads.clear()  # volume ids belong to the server that issued them
        self._client.close()
        self._client = new_client

    def check_server(self) -> p.Health:
        """The server's health after the API version check ("Test connection"); raises ClientError."""
        return self._client.check_connection()

    # --- one slice --------------------------------------------------------------------------------------------

    def prepare_slice(self, volume_node: Any, model_view_slice: int) -> SliceRequest:
        """Main thread: copy model-view slice `model_view_slice` of the volume as int16 HU."""
        view = model_view(volume_node)
        slice_hu = to_int16_hu(view.slice(model_view_slice))  # GeometryError for a slice outside the volume
        return SliceRequest(volume_node.GetName(), model_view_geometry(volume_node), int(model_view_slice), slice_hu,
                            view.spacing[:2])

    def query_slice(self, request: SliceRequest, prompt: str,
                    options: p.AnswerOptions | None = None) -> p.QueryResponse:
        """Any thread: ask `prompt` about the slice; boxes come back in its pixel indices."""
        return self._client.query_slice(request.slice_hu, prompt, request.pixel_spacing_mm,
                                        slice_index=request.slice_index, options=options)

    def add_slice_boxes(self, request: SliceRequest, response: p.QueryResponse, prompt: str, scene: Any,
                        volume_node: Any = None) -> RoiRun:
        """Main thread: one ROI per box of the answer, under a new run folder."""
        return add_box_rois(scene, request.geometry, placed_boxes({request.slice_index: response}),
                            label=box_label_for_prompt(prompt), volume_node=volume_node)

    def analyze_slice(self, volume_node: Any, model_view_slice: int, prompt: str, scene: Any = None) -> p.QueryResponse:
        """Ask about one model-view slice and draw the boxes as ROIs in `scene` (default: the volume's scene)."""
        request = self.prepare_slice(volume_node, model_view_slice)
        response = self.query_slice(request, prompt)
        self.add_slice_boxes(request, response, prompt, scene or volume_node.GetScene(), volume_node)
        return response

    # --- a range of slices ---------------------------------------------------------------------------------------

    def prepare_sweep(self, volume_node: Any, slice_range: tuple[int, int] | None = None) -> SweepRequest:
        """Main thread: copy model-view slices first..last (inclusive; None = all) as int16 HU."""
        view = model_view(volume_node)
        first, last = (0, view.shape[0] - 1) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
        if not 0 <= first <= last < view.shape[0]:
            raise GeometryError(f"The slice range {first} to {last} is not inside the volume (slices 0 to "
                                f"{view.shape[0] - 1}); the first slice must not come after the last.")
        p.check_volume_bytes((last - first + 1,) + view.shape[1:], "the slice range")
        image = volume_node.GetImageData()
        key = (volume_node.GetID(), image.GetMTime(), view.ijk_to_ras.tobytes(), first, last)
        return SweepRequest(volume_node.GetName(), model_view_geometry(volume_node), first, last,
                            to_int16_hu(view.array[first:last + 1]), view.spacing, key)

    def run_sweep(self, request: SweepRequest, prompt: str,
                  progress_callback: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> SweepOutcome:
        """Any thread: upload the slices once, run the sweep, poll until it ends or `should_cancel()` says stop."""
        report = progress_callback or (lambda done, total: None)
        cancelled = should_cancel or (lambda: False)
        total = request.last_slice - request.first_slice + 1
        volume_id = self._upload(request)
        if cancelled():
            return SweepOutcome("cancelled", 0, total, {}, "cancelled before the sweep started")
        try:
            status = self._client.start_sweep(volume_id, prompt)
        except ResourceNotFoundError:  # the server dropped the volume (restart, memory limit): send it again
            self._uploads.pop(request.upload_key, None)
            status = self._client.start_sweep(self._upload(request), prompt)
        while not status.finished:
            report(status.done, status.total)
            if cancelled():
                status = self._client.cancel_sweep(status.job_id)
                break
            self._sleep(self.poll_interval_s)
            status = self._client.sweep_status(status.job_id)
        report(status.done, status.total)
        responses = {request.first_slice + r.slice_index: r for r in status.results}
        return SweepOutcome(status.state, status.done, status.total, responses, status.message)

    def add_sweep_boxes(self, request: SweepRequest, outcome: SweepOutcome, prompt: str, scene: Any,
                        volume_node: Any = None) -> RoiRun:
        """Main thread: one ROI per box of every answered slice plus the fused 3D ROI, under a new run folder."""
        return add_box_rois(scene, request.geometry, placed_boxes(outcome.responses),
                            label=box_label_for_prompt(prompt), volume_node=volume_node, add_fused_roi=True)

    def sweep_volume(self, volume_node: Any, prompt: str, slice_range: tuple[int, int] | None = None,
                     progress_callback: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None, scene: Any = None) -> SweepOutcome:
        """Ask `prompt` on model-view slices first..last and draw every box (and the fused ROI) in `scene`."""
        request = self.prepare_sweep(volume_node, slice_range)
        outcome = self.run_sweep(request, prompt, progress_callback, should_cancel)
        self.add_sweep_boxes(request, outcome, prompt, scene or volume_node.GetScene(), volume_node)
        return outcome

    # --- ground truth ---------------------------------------------------------------------------------------------

    def compare_with_ground_truth(self, volume_node: Any, truth_node: Any, predictions: Mapping[int, Sequence[Box]],
                                  *, label_values: Sequence[int] | None = None,
                                  segment_ids: Sequence[str] | None = None, table_name: str | None = None,
                                  scene: Any = None) -> Comparison:
        """IoU per predicted slice against the truth's boxes, written to a new table node (main thread)."""
        mask = truth_mask(truth_node, volume_node, label_values=label_values, segment_ids=segment_ids)
        _, matrix = volume_array_and_matrix(volume_node)
        rows = compare_boxes(predictions, truth_boxes(mask, matrix))
        name = table_name or f"MiniGPT-Pancreas IoU vs {truth_node.GetName()}"
        table = write_comparison_table(scene or volume_node.GetScene(), rows, name)
        return Comparison(rows, mean_iou(rows), table)

    # --- parameter node -----------------------------------------------------------------------------------------

    @staticmethod
    def parameter_node(scene: Any) -> Any:
        """The module's vtkMRMLScriptedModuleNode in `scene` (created when missing), found as Slicer's logic does."""
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
            if node.GetAttribute("ModuleName") == MODULE_NAME:
                return node
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    def _upload(self, request: SweepRequest) -> str:
        volume_id = self._uploads.get(request.upload_key)
        if volume_id is None:
            volume_id = self._client.upload_volume(request.volume_hu, request.spacing_mm).volume_id
            self._uploads[request.upload_key] = volume_id
        return volume_id
