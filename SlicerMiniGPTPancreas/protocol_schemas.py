"""The request and response messages of the protocol (see protocol.py for the routes that carry them).

Each message is a frozen dataclass: `from_dict` checks that required fields are present and `__post_init__` checks
types and ranges, so a message that exists is valid; both raise ProtocolError naming the bad field. Import the
messages from `protocol`, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .protocol_base import (
    MAX_CHAT_MESSAGES, MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_CHARS, MAX_SLICE_SIDE, MAX_VOLUME_SLICES, ProtocolError,
    Schema, check_bool, check_choice, check_float, check_id, check_int, check_int16_array, check_list,
    check_nested, check_shape, check_spacing, check_str, parse_api_version,
)

ANSWER_KINDS = ("boxes", "yes_no", "text", "invalid")  # grammar.ParsedAnswer.kind
HEALTH_STATES = ("ok", "loading", "error")
SWEEP_STATES = ("queued", "running", "done", "cancelled", "failed")
SWEEP_FINISHED_STATES = ("done", "cancelled", "failed")


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
    slice_hu: np.ndarray = field(metadata={"slice": True})
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

    def __post_init__(self) -> None:
        self._set("status", check_choice, HEALTH_STATES)
        parse_api_version(self.api_version, "Health.api_version")
        self._set("model_id", check_str, 200, allow_empty=True)  # empty while loading
        self._set("device", check_str, 200)
        self._set("busy", check_bool)


@dataclass(frozen=True)
class ModelInfo(Schema):
    """GET /api/v1/info: what the server runs and its limits."""

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


@dataclass(frozen=True)
class VolumeUploadResponse(Schema):
    """POST /api/v1/volumes: the id under which the server keeps the model-view volume [S, R, C]."""

    volume_id: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (col, row, slice)

    def __post_init__(self) -> None:
        self._set("volume_id", check_id)
        self._set("shape", check_shape, (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
        self._set("spacing_mm", check_spacing, 3)


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
    slice_hu: np.ndarray = field(metadata={"slice": True})
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
