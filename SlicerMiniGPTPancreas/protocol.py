"""The HTTP protocol between the Slicer client and the MiniGPT-Pancreas service; both sides import this module.

Versioning: `API_VERSION` is "MAJOR.MINOR"; a client and a server work together when their majors match. A minor
bump only adds routes or optional fields with defaults, so `from_dict` ignores keys it does not know.

Wire format: JSON bodies, except a volume upload (raw int16 bytes); how CT arrays travel is wire_arrays.py. Boxes
are `[x_min, y_min, x_max, y_max]` in pixel index coordinates of the slice that was sent (x = column, y = row,
pixel centres at integers), the Box convention of the whole core.

Errors: every non-2xx reply has the body `{"error": {"code": ..., "message": ...}}` with an `ErrorCode`. A version
mismatch is HTTP 409 Conflict, not 426 Upgrade Required: 426 obliges the server to send an `Upgrade` header naming
a transport protocol to switch to (RFC 9110, 15.5.22), which does not fit an application API version.

Messages: each is a frozen dataclass on validation.Schema: `from_dict` checks that required fields are present and
`__post_init__` checks types and ranges, so a message that exists is valid; both raise validation.ProtocolError
naming the bad field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .validation import (
    ProtocolError, Schema, check_bool, check_choice, check_float, check_int, check_list, check_nested, check_shape,
    check_spacing, check_str, excerpt,
)
from .wire_arrays import MAX_SLICE_SIDE, MAX_VOLUME_SLICES, SLICE_FIELD, check_int16_array

API_VERSION = "1.3"  # 1.1: a volume may be uploaded as stored, with its geometry (encode_scan); 1.2: /info
# lists the model's tasks (ModelInfo.tasks); 1.3: a model that failed to load is Health.message and 503
# "model_unavailable"
API_PREFIX = "/api/v1"
API_VERSION_HEADER = "X-MiniGPT-Pancreas-API-Version"  # the client's version, sent with every request

ROUTE_HEALTH = "/healthz"  # GET -> Health; unversioned so that any client can read the server's version
ROUTE_INFO = API_PREFIX + "/info"  # GET -> ModelInfo
ROUTE_QUERY = API_PREFIX + "/query"  # POST SliceQueryRequest -> QueryResponse
ROUTE_VOLUMES = API_PREFIX + "/volumes"  # POST raw int16 body (encode_volume/_scan) -> VolumeUploadResponse
ROUTE_SWEEPS = API_PREFIX + "/sweeps"  # POST SweepJobRequest -> SweepJobStatus
ROUTE_SWEEP = API_PREFIX + "/sweeps/{job_id}"  # GET -> SweepJobStatus; DELETE cancels -> SweepJobStatus
ROUTE_CHAT = API_PREFIX + "/chat"  # POST ChatRequest -> ChatResponse

MAX_PROMPT_CHARS = 2000  # a prompt's wire form; what it may say is backend.prompts.check_question's rule
MAX_NEW_TOKENS_LIMIT = 1024
MAX_CHAT_MESSAGES = 64
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # volume and job ids: safe inside a URL path
ANSWER_KINDS = ("boxes", "yes_no", "text", "invalid")  # grammar.ParsedAnswer.kind
HEALTH_STATES = ("ok", "loading", "error")
SWEEP_STATES = ("queued", "running", "done", "cancelled", "failed")
SWEEP_FINISHED_STATES = ("done", "cancelled", "failed")


class ErrorCode(str, Enum):
    """Machine-readable error codes; `http_status` is the status the service answers with."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    VERSION_MISMATCH = "version_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    VALIDATION = "validation"
    INTERNAL = "internal"
    BUSY = "busy"
    MODEL_UNAVAILABLE = "model_unavailable"  # the model failed to load: retrying will not help, restarting may

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.NOT_FOUND: 404,
    ErrorCode.VERSION_MISMATCH: 409, ErrorCode.PAYLOAD_TOO_LARGE: 413, ErrorCode.UNSUPPORTED_MEDIA: 415,
    ErrorCode.VALIDATION: 422, ErrorCode.INTERNAL: 500, ErrorCode.BUSY: 503, ErrorCode.MODEL_UNAVAILABLE: 503,
}


@dataclass(frozen=True)
class ErrorResponse:
    """Body of every error reply: {"error": {"code": ..., "message": ...}}."""

    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        codes = tuple(code.value for code in ErrorCode)
        object.__setattr__(self, "code", ErrorCode(check_choice(self.code, "ErrorResponse.error.code", codes)))
        check_str(self.message, "ErrorResponse.error.message")

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code.value, "message": self.message}}

    @classmethod
    def from_dict(cls, data: Any) -> ErrorResponse:
        error = data.get("error") if isinstance(data, Mapping) else None
        if not isinstance(error, Mapping):
            raise ProtocolError("ErrorResponse.error", "expected an object {code, message}")
        return cls(error.get("code"), error.get("message"))

    @property
    def http_status(self) -> int:
        return self.code.http_status


class ApiVersionError(ProtocolError):
    """The two sides speak different major API versions; the message says which side to update."""

    def __init__(self, server_version: str, client_version: str, advice: str) -> None:
        super().__init__("api_version", f"the server speaks API {server_version} but this client speaks API "
                                        f"{client_version}; the major versions must match. {advice}")
        self.server_version = server_version
        self.client_version = client_version


def parse_api_version(text: Any, field: str = "api_version") -> tuple[int, int]:
    """'1.0' -> (1, 0); anything else raises ProtocolError."""
    match = re.fullmatch(r"(\d{1,9})\.(\d{1,9})", text) if isinstance(text, str) else None
    if match is None:
        raise ProtocolError(field, f"expected a version 'MAJOR.MINOR' such as '1.0', got {excerpt(text)}")
    return int(match.group(1)), int(match.group(2))


def check_api_version(server_version: str, client_version: str = API_VERSION) -> None:
    """Raise ApiVersionError unless both majors match (a minor difference is compatible)."""
    server_major, _ = parse_api_version(server_version, "server api_version")
    client_major, _ = parse_api_version(client_version, "client api_version")
    if server_major < client_major:
        advice = ("Update the server (pip install -U minigpt-pancreas) and restart `minigpt-pancreas serve`.")
    elif server_major > client_major:
        advice = ("Update the client: the MiniGPT-Pancreas Slicer extension (Extensions Manager) "
                  "or the minigpt-pancreas Python package.")
    else:
        return
    raise ApiVersionError(server_version, client_version, advice)


def check_id(value: Any, field: str) -> str:
    """A volume or job id matching ID_PATTERN."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ProtocolError(field, f"expected 1-64 letters, digits, '-' or '_', got {excerpt(value)}")
    return value


def sweep_route(job_id: str) -> str:
    """The status / cancel route of one sweep job."""
    return ROUTE_SWEEP.format(job_id=check_id(job_id, "job_id"))


# --- the messages -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnswerOptions(Schema):
    """How to generate and decode an answer. temperature 0 = greedy (upstream evaluation: greedy, 20 tokens)."""

    max_new_tokens: int = 20
    temperature: float = 0.0
    box_decoding: str = "center"  # grammar.grid_to_pixels mode; "floor" reproduces upstream numbers
    image_variant: str = "window"  # preprocess.hu_slice_to_gray variant

    def __post_init__(self) -> None:
        self._set("max_new_tokens", check_int, 1, MAX_NEW_TOKENS_LIMIT)
        self._set("temperature", check_float, 0.0, 2.0)
        self._set("box_decoding", check_choice, ("center", "floor"))
        self._set("image_variant", check_choice, ("window", "paper"))


@dataclass(frozen=True)
class BoxResult(Schema):
    """One box on the sent slice: (x_min, y_min, x_max, y_max) in pixel index coordinates (x = column)."""

    box: tuple[float, float, float, float]
    label: str | None = None
    confidence: float | None = None  # in [0, 1]

    def __post_init__(self) -> None:
        path = "BoxResult.box"
        coords = check_list(self.box, path, 4)
        if len(coords) != 4:
            raise ProtocolError(path, f"expected [x_min, y_min, x_max, y_max], got {len(coords)} numbers")
        x_min, y_min, x_max, y_max = (check_float(c, f"{path}[{i}]") for i, c in enumerate(coords))
        if x_min > x_max or y_min > y_max:
            raise ProtocolError(path, f"min exceeds max in {[x_min, y_min, x_max, y_max]}")
        object.__setattr__(self, "box", (x_min, y_min, x_max, y_max))
        self._set_optional("label", check_str, 200)
        self._set_optional("confidence", check_float, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class SliceQueryRequest(Schema):
    """One question about one model-view slice [R, C] of int16 HU, with its (col, row) pixel spacing in mm.

    Holds an array, so `==` compares identity; compare fields (np.array_equal for the slice) instead.
    """

    prompt: str
    slice_hu: np.ndarray = field(metadata=SLICE_FIELD)
    pixel_spacing_mm: tuple[float, float]
    slice_index: int | None = None  # s in the model view, echoed back
    volume_id: str | None = None
    options: AnswerOptions = field(default_factory=AnswerOptions, metadata={"schema": AnswerOptions})

    def __post_init__(self) -> None:
        self._set("prompt", check_str, MAX_PROMPT_CHARS)
        check_int16_array(self.slice_hu, "SliceQueryRequest.slice_hu", ndim=2)
        self._set("pixel_spacing_mm", check_spacing, 2)
        self._set_optional("slice_index", check_int, 0, MAX_VOLUME_SLICES - 1)
        self._set_optional("volume_id", check_id)
        self._set("options", check_nested, AnswerOptions)


@dataclass(frozen=True)
class QueryResponse(Schema):
    """The model's answer: raw text, its kind, boxes (kind "boxes" with no boxes = nothing found), yes/no."""

    answer: str
    kind: str
    model_id: str
    boxes: tuple[BoxResult, ...] = field(default=(), metadata={"schema": BoxResult, "many": True})
    yes: bool | None = None
    yes_probability: float | None = None  # P(yes) read from the logits
    reason: str | None = None  # why the answer is invalid or empty
    slice_index: int | None = None
    queue_ms: float = 0.0  # waiting for the GPU
    inference_ms: float = 0.0

    def __post_init__(self) -> None:
        self._set("answer", check_str, 100_000, allow_empty=True)
        self._set("kind", check_choice, ANSWER_KINDS)
        self._set("model_id", check_str, 200)
        self._set_items("boxes", BoxResult, 1000)
        self._set_optional("yes", check_bool)
        self._set_optional("yes_probability", check_float, 0.0, 1.0)
        self._set_optional("reason", check_str, 10_000)
        self._set_optional("slice_index", check_int, 0, MAX_VOLUME_SLICES - 1)
        self._set("queue_ms", check_float, 0.0)
        self._set("inference_ms", check_float, 0.0)


@dataclass(frozen=True)
class Health(Schema):
    """GET /healthz: cheap, never waits for the GPU."""

    status: str  # ok | loading | error
    api_version: str
    model_id: str
    device: str
    busy: bool
    message: str | None = None  # status "error": why the model failed to load and what to do (API 1.3)

    def __post_init__(self) -> None:
        self._set("status", check_choice, HEALTH_STATES)
        parse_api_version(self.api_version, "Health.api_version")
        self._set("model_id", check_str, 200, allow_empty=True)  # empty while loading
        self._set("device", check_str, 200)
        self._set("busy", check_bool)
        self._set_optional("message", check_str, 10_000)


@dataclass(frozen=True)
class TaskInfo(Schema):
    """One task the model was fine-tuned for (a stage of MiniGPT-Pancreas's cascade) and the prompts that ask it."""

    name: str  # e.g. "pancreas_detection", as the training cascade names its stages
    title: str  # for a menu, e.g. "Pancreas detection"
    kind: str  # what its answers are, one of ANSWER_KINDS: "boxes" or "yes_no" for the cascade's tasks
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        self._set("name", check_str, 200)
        self._set("title", check_str, 200)
        self._set("kind", check_choice, ANSWER_KINDS)
        self._set("prompts", check_list, 100)
        for index, prompt in enumerate(self.prompts):
            check_str(prompt, f"TaskInfo.prompts[{index}]", MAX_PROMPT_CHARS)


@dataclass(frozen=True)
class ModelInfo(Schema):
    """GET /api/v1/info: what the server runs and its limits. `example_prompts` are the prompts of all `tasks`, in
    order (servers before API 1.2 send no tasks, only example prompts)."""

    model_id: str
    api_version: str
    server_version: str
    device: str
    precision: str  # e.g. bfloat16, float32, int8
    image_size: int  # model input side in pixels (448 upstream)
    max_new_tokens_limit: int
    max_upload_bytes: int
    example_prompts: tuple[str, ...] = ()
    synthetic: bool = False  # a demonstration model trained on synthetic CT only; optional: older servers omit it
    tasks: tuple[TaskInfo, ...] = field(default=(), metadata={"schema": TaskInfo, "many": True, "max_len": 100})

    def __post_init__(self) -> None:
        for name in ("model_id", "server_version", "device", "precision"):
            self._set(name, check_str, 200)
        parse_api_version(self.api_version, "ModelInfo.api_version")
        self._set("image_size", check_int, 1)
        self._set("max_new_tokens_limit", check_int, 1)
        self._set("max_upload_bytes", check_int, 1)
        self._set("example_prompts", check_list, 100)
        for index, prompt in enumerate(self.example_prompts):
            check_str(prompt, f"ModelInfo.example_prompts[{index}]", MAX_PROMPT_CHARS)
        self._set("synthetic", check_bool)
        self._set_items("tasks", TaskInfo, 100)


@dataclass(frozen=True)
class VolumeUploadResponse(Schema):
    """POST /api/v1/volumes: the id under which the server keeps the model-view volume [S, R, C]. `resampled`: a
    tilted volume sent as stored with resample=true was resampled onto its nearest axial grid
    (`geometry.nearest_axial_grid` of the ijk_to_ras sent), which slice numbers and boxes then refer to."""

    volume_id: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (col, row, slice)
    resampled: bool = False

    def __post_init__(self) -> None:
        self._set("volume_id", check_id)
        self._set("shape", check_shape, (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
        self._set("spacing_mm", check_spacing, 3)
        self._set("resampled", check_bool)


@dataclass(frozen=True)
class SweepJobRequest(Schema):
    """Ask one prompt on model-view slices range(slice_start, slice_stop or S, step) of an uploaded volume."""

    volume_id: str
    prompt: str
    slice_start: int = 0
    slice_stop: int | None = None  # exclusive; None = to the last slice
    step: int = 1
    options: AnswerOptions = field(default_factory=AnswerOptions, metadata={"schema": AnswerOptions})

    def __post_init__(self) -> None:
        self._set("volume_id", check_id)
        self._set("prompt", check_str, MAX_PROMPT_CHARS)
        self._set("slice_start", check_int, 0, MAX_VOLUME_SLICES - 1)
        self._set_optional("slice_stop", check_int, self.slice_start + 1, MAX_VOLUME_SLICES)
        self._set("step", check_int, 1, MAX_VOLUME_SLICES)
        self._set("options", check_nested, AnswerOptions)


@dataclass(frozen=True)
class SweepJobStatus(Schema):
    """A sweep job: its state, progress (done of total slices) and one QueryResponse per finished slice."""

    job_id: str
    volume_id: str
    state: str  # queued | running | done | cancelled | failed
    done: int
    total: int
    results: tuple[QueryResponse, ...] = field(default=(), metadata={"schema": QueryResponse, "many": True})
    message: str | None = None  # why it failed, for instance

    def __post_init__(self) -> None:
        self._set("job_id", check_id)
        self._set("volume_id", check_id)
        self._set("state", check_choice, SWEEP_STATES)
        self._set("total", check_int, 0, MAX_VOLUME_SLICES)
        self._set("done", check_int, 0, self.total)
        self._set_items("results", QueryResponse, MAX_VOLUME_SLICES)
        for index, result in enumerate(self.results):
            if result.slice_index is None:
                raise ProtocolError(f"SweepJobStatus.results[{index}].slice_index", "is required in a sweep")
        self._set_optional("message", check_str, 10_000)

    @property
    def finished(self) -> bool:
        return self.state in SWEEP_FINISHED_STATES


@dataclass(frozen=True)
class ChatMessage(Schema):
    role: str  # user | assistant
    text: str

    def __post_init__(self) -> None:
        self._set("role", check_choice, ("user", "assistant"))
        self._set("text", check_str, MAX_PROMPT_CHARS)


@dataclass(frozen=True, eq=False)
class ChatRequest(Schema):
    """A conversation about one slice: turns alternate user/assistant, starting and ending with the user."""

    messages: tuple[ChatMessage, ...] = field(metadata={"schema": ChatMessage, "many": True,
                                                        "max_len": MAX_CHAT_MESSAGES})
    slice_hu: np.ndarray = field(metadata=SLICE_FIELD)
    pixel_spacing_mm: tuple[float, float]
    options: AnswerOptions = field(default_factory=lambda: AnswerOptions(max_new_tokens=300),
                                   metadata={"schema": AnswerOptions})

    def __post_init__(self) -> None:
        self._set_items("messages", ChatMessage, MAX_CHAT_MESSAGES)
        if not self.messages:
            raise ProtocolError("ChatRequest.messages", "must hold at least one user message")
        for index, message in enumerate(self.messages):
            expected = "user" if index % 2 == 0 else "assistant"
            if message.role != expected or (index == len(self.messages) - 1 and message.role != "user"):
                raise ProtocolError(f"ChatRequest.messages[{index}].role",
                                    "turns must alternate user/assistant, starting and ending with user")
        check_int16_array(self.slice_hu, "ChatRequest.slice_hu", ndim=2)
        self._set("pixel_spacing_mm", check_spacing, 2)
        self._set("options", check_nested, AnswerOptions)


@dataclass(frozen=True)
class ChatResponse(Schema):
    """The assistant's reply, with any boxes it drew on the slice."""

    answer: str
    model_id: str
    boxes: tuple[BoxResult, ...] = field(default=(), metadata={"schema": BoxResult, "many": True})
    inference_ms: float = 0.0

    def __post_init__(self) -> None:
        self._set("answer", check_str, 100_000, allow_empty=True)
        self._set("model_id", check_str, 200)
        self._set_items("boxes", BoxResult, 1000)
        self._set("inference_ms", check_float, 0.0)
