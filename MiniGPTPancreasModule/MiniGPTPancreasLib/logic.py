"""MiniGPTPancreasLogic: the module's logic, usable without the GUI (Python console, scripts, tests).

Every operation comes in steps so that a GUI can keep MRML on its main thread and the network off it:
`prepare_*` reads the volume node (main thread) into a self-contained request (volume_requests), `query_slice` /
`run_sweep` / `chat` talk to the server (blocking: any thread), `add_*_boxes` creates the nodes of a run (main
thread).
`analyze_slice` and `sweep_volume` chain the steps synchronously for scripts.

    logic = MiniGPTPancreasLogic()
    logic.set_server("http://127.0.0.1:8765", token=None)
    info = logic.connect()                                          # the model and the questions it offers
    response = logic.analyze_slice(ct_node, 42, logic.presets[0].prompt)   # boxes become ROIs in ct_node's scene
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.client import (DEFAULT_URL, MiniGPTPancreasClient, ResourceNotFoundError,
                                          normalize_base_url)
from SlicerMiniGPTPancreas.geometry import Box, GeometryError, ModelView

from .boxes_to_markups import PlacedBox, RoiRun, add_box_rois, module_node, move_under, subject_hierarchy
from .chat import ChatSession
from .fusion import apply_threshold, shown_at
from .ground_truth import Comparison, compare_with_truth
from .local_server import LocalServer
from .prompts import PromptPreset, box_label_for_prompt, presets_from_info
from .results import ExportError, export_run, provenance, write_results_table
from .volume_requests import SliceRequest, SweepRequest, slice_request, sweep_geometry, sweep_request

DEFAULT_POLL_INTERVAL_S = 0.5


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
class LastRun:
    """The run a panel acts on next (threshold, export, ground truth): its nodes, answers and volume."""

    run: RoiRun
    responses: dict[int, p.QueryResponse]
    volume_node: Any
    geometry: ModelView  # the grid its slices are on (a resampled sweep's is not the volume's own)
    threshold: float = 0.0  # its boxes below it are hidden


def predictions_of(responses: Mapping[int, p.QueryResponse], threshold: float = 0.0) -> dict[int, list[Box]]:
    """{slice: boxes shown at `threshold`} of answers; a slice without any (nothing found, unreadable, all below the
    threshold) gives an empty list."""
    return {s: [box.box for box in response.boxes if shown_at(box.confidence, threshold)]
            for s, response in responses.items()}


def placed_boxes(responses: Mapping[int, Any]) -> list[PlacedBox]:
    return [PlacedBox(s, box.box, box.confidence, box.label)
            for s, response in sorted(responses.items()) for box in response.boxes]


class MiniGPTPancreasLogic:
    """Talks to one MiniGPT-Pancreas server and turns its answers into MRML nodes. Holds no GUI state."""

    def __init__(self, client: MiniGPTPancreasClient | None = None, *,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client if client is not None else MiniGPTPancreasClient(DEFAULT_URL)
        self._server_settings: tuple | None = None  # set_server's arguments, normalised
        self.poll_interval_s = poll_interval_s
        self._sleep = sleep
        self._uploads: dict[tuple, str] = {}  # SweepRequest.upload_key -> the server's volume id
        # Sweep a tilted volume by having the server resample it onto the nearest axial grid (off: refused)
        self.resample_tilted = False
        self.info: p.ModelInfo | None = None  # what the server said on connect()
        self.local_server = LocalServer()
        self.chat_session = ChatSession()
        self.last_run: LastRun | None = None  # set by every add_*_boxes

    @property
    def client(self) -> MiniGPTPancreasClient:
        return self._client

    @property
    def presets(self) -> tuple[PromptPreset, ...]:
        """The questions the connected server offers (none before connect())."""
        return presets_from_info(self.info) if self.info is not None else ()

    def set_server(self, base_url: str, token: str | None = None, **client_options: Any) -> None:
        """Use the server at `base_url` (ConnectionSettingsError for a bad address or token). The panel calls this
        on every Apply: unchanged settings keep the client, and with it its open keep-alive connection."""
        settings = (normalize_base_url(base_url), token, sorted(client_options.items()))
        if settings == self._server_settings:
            return
        new_client = MiniGPTPancreasClient(base_url, token=token, **client_options)
        if new_client.base_url != self._client.base_url:
            self._uploads.clear()  # volume ids belong to the server that issued them
            self.info = None
        self._client.close()
        self._client, self._server_settings = new_client, settings

    def check_server(self) -> p.Health:
        """The server's health after the API version check ("Test connection"); raises ClientError."""
        return self._client.check_connection()

    def connect(self) -> p.ModelInfo:
        """Check the server, then read /api/v1/info: the model id, whether it is synthetic, its tasks and prompts."""
        self.check_server()
        self.info = self._client.info()
        return self.info

    # --- the local server -----------------------------------------------------------------------------------

    def start_local_server(self, timeout_s: float | None = None,
                           should_cancel: Callable[[], bool] = lambda: False) -> tuple[str, p.ModelInfo]:
        """launch_local_server, then wait_for_server: (REUSED or STARTED, the server's info)."""
        state = self.launch_local_server()
        return state, self.wait_for_server(timeout_s, should_cancel)

    def launch_local_server(self) -> str:
        """Main thread (Slicer's launcher reads the application's environment): reuse the server answering at the
        URL (REUSED) or start `local_server` there (STARTED); does not wait for its model."""
        return self.local_server.start(self._client)

    def wait_for_server(self, timeout_s: float | None = None,
                        should_cancel: Callable[[], bool] = lambda: False) -> p.ModelInfo:
        """Any thread: wait until the server's model is ready, then connect()."""
        options = {} if timeout_s is None else {"timeout_s": timeout_s}
        self.local_server.wait_ready(self._client, should_cancel=should_cancel, **options)
        return self.connect()

    def stop_local_server(self) -> int | None:
        """Stop the server this logic started (a reused one is left running); its exit code or None."""
        return self.local_server.stop()

    # --- one slice --------------------------------------------------------------------------------------------

    def prepare_slice(self, volume_node: Any, model_view_slice: int) -> SliceRequest:
        """Main thread: copy model-view slice `model_view_slice` of the volume as int16 HU."""
        return slice_request(volume_node, model_view_slice)

    def query_slice(self, request: SliceRequest, prompt: str,
                    options: p.AnswerOptions | None = None) -> p.QueryResponse:
        """Any thread: ask `prompt` about the slice; boxes come back in its pixel indices."""
        return self._client.query_slice(request.slice_hu, prompt, request.pixel_spacing_mm,
                                        slice_index=request.slice_index, options=options)

    def add_slice_boxes(self, request: SliceRequest, response: p.QueryResponse, prompt: str, scene: Any,
                        volume_node: Any = None) -> RoiRun:
        """Main thread: one ROI per box of the answer and a results table, under a new run folder."""
        extra = {}
        if response.yes is not None:
            extra["yes"] = "yes" if response.yes else "no"
        if response.yes_probability is not None:
            extra["yesProbability"] = f"{response.yes_probability:.4f}"
        return self._record_run(request.geometry, {request.slice_index: response}, prompt, response.model_id, scene,
                                volume_node, extra)

    def analyze_slice(self, volume_node: Any, model_view_slice: int, prompt: str, scene: Any = None) -> p.QueryResponse:
        """Ask about one model-view slice and draw the boxes as ROIs in `scene` (default: the volume's scene)."""
        request = self.prepare_slice(volume_node, model_view_slice)
        response = self.query_slice(request, prompt)
        self.add_slice_boxes(request, response, prompt, scene or volume_node.GetScene(), volume_node)
        return response

    # --- chat about one slice ------------------------------------------------------------------------------------

    def chat(self, request: SliceRequest, sent: tuple[p.ChatMessage, ...]) -> p.ChatResponse:
        """Any thread: send the conversation `sent` (ChatSession.ask) about the slice; the reply may hold boxes."""
        return self._client.chat(sent, request.slice_hu, request.pixel_spacing_mm)

    def add_chat_boxes(self, request: SliceRequest, sent: tuple[p.ChatMessage, ...], reply: p.ChatResponse,
                       scene: Any, volume_node: Any = None) -> RoiRun | None:
        """Main thread: keep the turn in the session and draw the reply's boxes like any answer's (None: no boxes)."""
        self.chat_session.record(sent, reply.answer)
        if not reply.boxes:
            return None
        answer = p.QueryResponse(reply.answer, "boxes", reply.model_id, boxes=reply.boxes,
                                 slice_index=request.slice_index)
        return self._record_run(request.geometry, {request.slice_index: answer}, sent[-1].text, reply.model_id,
                                scene, volume_node)

    # --- a range of slices ---------------------------------------------------------------------------------------

    def sweep_geometry(self, volume_node: Any) -> ModelView:
        """The model view a sweep of the node is on: the node's own, the nearest axial grid for a tilted volume with
        `resample_tilted`, else the ObliqueVolumeError naming the option (volume_requests.sweep_geometry)."""
        return sweep_geometry(volume_node, self.resample_tilted)

    def prepare_sweep(self, volume_node: Any, slice_range: tuple[int, int] | None = None) -> SweepRequest:
        """Main thread: copy model-view slices first..last (inclusive; None = all) of sweep_geometry as int16 HU; a
        tilted volume whole, for the server to resample, with `resample_tilted`."""
        return sweep_request(volume_node, slice_range, self.resample_tilted)

    def run_sweep(self, request: SweepRequest, prompt: str,
                  progress_callback: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> SweepOutcome:
        """Any thread: upload the slices once, run the sweep, poll until it ends or `should_cancel()` says stop."""
        report = progress_callback or (lambda done, total: None)
        cancelled = should_cancel or (lambda: False)
        total = request.last_slice - request.first_slice + 1
        offset = request.uploaded_first_slice

        def start(volume_id: str) -> p.SweepJobStatus:
            return self._client.start_sweep(volume_id, prompt, slice_start=request.first_slice - offset,
                                            slice_stop=request.last_slice + 1 - offset)

        volume_id = self._upload(request)
        if cancelled():
            return SweepOutcome("cancelled", 0, total, {}, "cancelled before the sweep started")
        try:
            status = start(volume_id)
        except ResourceNotFoundError:  # the server dropped the volume (restart, memory limit): send it again
            self._uploads.pop(request.upload_key, None)
            status = start(self._upload(request))
        while not status.finished:
            report(status.done, status.total)
            if cancelled():
                status = self._client.cancel_sweep(status.job_id)
                break
            self._sleep(self.poll_interval_s)
            status = self._client.sweep_status(status.job_id)
        report(status.done, status.total)
        responses = {offset + r.slice_index: r for r in status.results}
        return SweepOutcome(status.state, status.done, status.total, responses, status.message)

    def add_sweep_boxes(self, request: SweepRequest, outcome: SweepOutcome, prompt: str, scene: Any,
                        volume_node: Any = None, threshold: float = 0.0) -> RoiRun:
        """Main thread: one ROI per box of every answered slice, the results table and the fused 3D ROI (around
        the largest run of consecutive slices with a box at or above `threshold`), under a new run folder. A
        resampled sweep's nodes say so (attribute MiniGPTPancreas.resampled)."""
        model_ids = {response.model_id for response in outcome.responses.values()}
        extra = {"resampled": "nearest axial grid"} if request.resampled else None
        run = self._record_run(request.geometry, outcome.responses, prompt, ", ".join(sorted(model_ids)), scene,
                               volume_node, extra)
        run.fused = self.set_threshold(scene, run, threshold)
        return run

    def set_threshold(self, scene: Any, run: RoiRun | None, threshold: float) -> Any:
        """Hide the run's (default: the last run's) boxes below `threshold` (not deleted) and refit its fused ROI;
        the fused ROI or None."""
        last = self.last_run
        run = run or (last.run if last else None)
        if last is not None and run is last.run:
            self.last_run = replace(last, threshold=threshold)
        return apply_threshold(scene, run.number, threshold, run.title.split(": ", 1)[-1]) if run else None

    def sweep_volume(self, volume_node: Any, prompt: str, slice_range: tuple[int, int] | None = None,
                     progress_callback: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None, scene: Any = None,
                     threshold: float = 0.0) -> SweepOutcome:
        """Ask `prompt` on model-view slices first..last and draw every box (and the fused ROI) in `scene`."""
        request = self.prepare_sweep(volume_node, slice_range)
        outcome = self.run_sweep(request, prompt, progress_callback, should_cancel)
        self.add_sweep_boxes(request, outcome, prompt, scene or volume_node.GetScene(), volume_node, threshold)
        return outcome

    # --- ground truth ---------------------------------------------------------------------------------------------

    def compare_with_ground_truth(self, volume_node: Any, truth_node: Any, predictions: Mapping[int, Sequence[Box]],
                                  *, label_values: Sequence[int] | None = None,
                                  segment_ids: Sequence[str] | None = None, table_name: str | None = None,
                                  scene: Any = None, threshold: float | None = None) -> Comparison:
        """compare_with_truth in `scene` (default: the volume's): IoU table, IoU plot and the truth boxes in green
        (main thread). `threshold`: the confidence the predictions were kept at, named in the table and the plot."""
        return compare_with_truth(scene or volume_node.GetScene(), volume_node, truth_node, predictions,
                                  label_values=label_values, segment_ids=segment_ids, table_name=table_name,
                                  threshold=threshold)

    def compare_last_run(self, truth_node: Any, **selection: Any) -> Comparison:
        """compare_with_ground_truth for the last run's boxes shown (at or above its threshold); ValueError saying
        what to do when it cannot."""
        last = self.last_run
        if last is None or last.volume_node is None or last.volume_node.GetScene() is None:
            raise ValueError("There are no answers on a volume in the scene to compare; ask a question first.")
        if not any(response.kind == "boxes" for response in last.responses.values()):
            raise ValueError("The last answers have no boxes (a yes/no question?). Ask a box question first.")
        return self.compare_with_ground_truth(last.volume_node, truth_node,
                                              predictions_of(last.responses, last.threshold),
                                              threshold=last.threshold, **selection)

    def export_last_run(self, folder: Any) -> tuple[Any, Any]:
        """export_run for the last run: its .mrk.json and .csv paths."""
        if self.last_run is None:
            raise ExportError("There is no run to export yet; ask a question first.")
        return export_run(self.last_run.volume_node.GetScene(), self.last_run.run.number, folder)

    # --- parameter node -----------------------------------------------------------------------------------------

    @staticmethod
    def parameter_node(scene: Any) -> Any:
        """The module's vtkMRMLScriptedModuleNode in `scene` (created when missing), found as Slicer's logic does."""
        return module_node(scene)

    def _record_run(self, geometry: ModelView, responses: Mapping[int, p.QueryResponse], prompt: str, model_id: str,
                    scene: Any, volume_node: Any, extra: Mapping[str, str] | None = None) -> RoiRun:
        attributes = {**provenance(prompt, model_id, self._client.base_url), **(extra or {})}
        run = add_box_rois(scene, geometry, placed_boxes(responses), label=box_label_for_prompt(prompt),
                           volume_node=volume_node, provenance=attributes)
        table = write_results_table(scene, geometry, run.number, run.title, responses, attributes)
        sh_node = subject_hierarchy(scene)
        if sh_node is not None and run.folder_item:
            move_under(sh_node, table, run.folder_item)
        self.last_run = LastRun(run, dict(responses), volume_node, geometry)
        return run

    def _upload(self, request: SweepRequest) -> str:
        volume_id = self._uploads.get(request.upload_key)
        if volume_id is None:
            if request.scan_ijk_to_ras is None:
                uploaded = self._client.upload_volume(request.volume_hu, request.spacing_mm)
            else:
                uploaded = self._client.upload_scan(request.volume_hu, request.scan_ijk_to_ras, resample=True)
                if not uploaded.resampled:  # a server before API 1.1 ignores resample
                    raise GeometryError("The server did not resample the tilted volume; update the server.")
            volume_id = self._uploads[request.upload_key] = uploaded.volume_id
        return volume_id
