"""The HTTP protocol between the Slicer client and the MiniGPT-Pancreas service; both sides import this module.

Versioning: `API_VERSION` is "MAJOR.MINOR"; a client and a server work together when their majors match. A minor
bump only adds routes or optional fields with defaults, so `from_dict` ignores keys it does not know.

Wire format: JSON bodies. A CT slice travels as `{"shape": [R, C], "dtype": "int16", "data": <base64>}`: Hounsfield
units, model-view orientation (geometry.py), the bytes little-endian and row-major. A volume upload is the raw
little-endian int16 bytes of the model-view array [S, R, C] (application/octet-stream), its shape and spacing in the
query string (`encode_volume`). Boxes are `[x_min, y_min, x_max, y_max]` in pixel index coordinates of the slice
that was sent (x = column, y = row, pixel centres at integers), the Box convention of the whole core.

Errors: every non-2xx reply has the body `{"error": {"code": ..., "message": ...}}` with an `ErrorCode`. A version
mismatch is HTTP 409 Conflict, not 426 Upgrade Required: 426 obliges the server to send an `Upgrade` header naming
a transport protocol to switch to (RFC 9110, 15.5.22), which does not fit an application API version.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

import numpy as np

API_VERSION = "1.0"
API_PREFIX = "/api/v1"
API_VERSION_HEADER = "X-MiniGPT-Pancreas-API-Version"  # the client's version, sent with every request

ROUTE_HEALTH = "/healthz"  # GET -> Health; unversioned so that any client can read the server's version
ROUTE_INFO = API_PREFIX + "/info"  # GET -> ModelInfo
ROUTE_QUERY = API_PREFIX + "/query"  # POST SliceQueryRequest -> QueryResponse
ROUTE_VOLUMES = API_PREFIX + "/volumes"  # POST raw int16 body (encode_volume) -> VolumeUploadResponse
ROUTE_SWEEPS = API_PREFIX + "/sweeps"  # POST SweepJobRequest -> SweepJobStatus
ROUTE_SWEEP = API_PREFIX + "/sweeps/{job_id}"  # GET -> SweepJobStatus; DELETE cancels -> SweepJobStatus
ROUTE_CHAT = API_PREFIX + "/chat"  # POST ChatRequest -> ChatResponse

MAX_SLICE_SIDE = 4096  # pixels per slice side; CT slices are 512, large detector ones up to 1024-2048
MAX_VOLUME_SLICES = 4096
MAX_VOLUME_BYTES = 1 << 30  # 1 GiB of int16, e.g. 512 x 512 x 2048
MAX_PROMPT_CHARS = 2000
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

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.NOT_FOUND: 404,
    ErrorCode.VERSION_MISMATCH: 409, ErrorCode.PAYLOAD_TOO_LARGE: 413, ErrorCode.UNSUPPORTED_MEDIA: 415,
    ErrorCode.VALIDATION: 422, ErrorCode.INTERNAL: 500, ErrorCode.BUSY: 503,
}


class ProtocolError(ValueError):
    """A message that breaks the protocol. `field` is the dotted path of the bad field, `problem` what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ApiVersionError(ProtocolError):
    """The two sides speak different major API versions; the message says which side to update."""

    def __init__(self, server_version: str, client_version: str, advice: str) -> None:
        super().__init__("api_version", f"the server speaks API {server_version} but this client speaks API "
                                        f"{client_version}; the major versions must match. {advice}")
        self.server_version = server_version
        self.client_version = client_version


def parse_api_version(text: Any, field: str = "api_version") -> tuple[int, int]:
    """'1.0' -> (1, 0); anything else raises ProtocolError."""
    match = re.fullmatch(r"(\d+)\.(\d+)", text) if isinstance(text, str) else None
    if match is None:
        raise ProtocolError(field, f"expected a version 'MAJOR.MINOR' such as '1.0', got {text!r}")
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


def sweep_route(job_id: str) -> str:
    """The status / cancel route of one sweep job."""
    return ROUTE_SWEEP.format(job_id=_check_id(job_id, "job_id"))


# --- arrays on the wire ---------------------------------------------------------------------------------------------

def encode_slice(slice_hu: np.ndarray, field: str = "slice") -> dict[str, Any]:
    """[R, C] int16 HU slice -> {"shape": [R, C], "dtype": "int16", "data": base64 of little-endian bytes}."""
    _check_int16_array(slice_hu, field, ndim=2)
    data = base64.b64encode(np.ascontiguousarray(slice_hu, dtype="<i2").tobytes()).decode("ascii")
    return {"shape": [int(n) for n in slice_hu.shape], "dtype": "int16", "data": data}


def decode_slice(payload: Any, field: str = "slice") -> np.ndarray:
    """Inverse of encode_slice: a read-only [R, C] int16 array; refuses oversized, malformed or inconsistent input."""
    if not isinstance(payload, Mapping):
        raise ProtocolError(field, f"expected an object with shape, dtype and data, got {_type_name(payload)}")
    for key in ("shape", "dtype", "data"):
        if key not in payload:
            raise ProtocolError(f"{field}.{key}", "required field is missing")
    rows, cols = _check_shape(payload["shape"], f"{field}.shape", (MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    if payload["dtype"] != "int16":
        raise ProtocolError(f"{field}.dtype", f"expected 'int16' (HU, little-endian), got {payload['dtype']!r}")
    data = payload["data"]
    if not isinstance(data, str):
        raise ProtocolError(f"{field}.data", f"expected a base64 string, got {_type_name(data)}")
    n_bytes = rows * cols * 2
    expected_chars = 4 * math.ceil(n_bytes / 3)
    if len(data) != expected_chars:  # checked before decoding so that junk of any size costs nothing
        raise ProtocolError(f"{field}.data", f"has {len(data)} base64 characters but shape [{rows}, {cols}] int16 "
                                             f"needs {expected_chars} ({n_bytes} bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError(f"{field}.data", f"is not valid base64 ({error})") from error
    if len(raw) != n_bytes:  # right length, but padding ('=') hides missing bytes
        raise ProtocolError(f"{field}.data", f"decodes to {len(raw)} bytes but shape [{rows}, {cols}] int16 "
                                             f"needs {n_bytes}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False).reshape(rows, cols)


def encode_volume(volume_src: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[bytes, dict[str, str]]:
    """Model-view volume [S, R, C] int16 + (col, row, slice) spacing -> (request body, query parameters)."""
    _check_int16_array(volume_src, "volume", ndim=3)
    _check_volume_bytes(volume_src.shape, "volume.shape")
    spacing = _check_spacing(spacing_mm, "volume.spacing_mm", 3)
    params = {"shape": ",".join(str(n) for n in volume_src.shape), "dtype": "int16",
              "spacing_mm": ",".join(repr(s) for s in spacing)}
    return np.ascontiguousarray(volume_src, dtype="<i2").tobytes(), params


def decode_volume(body: bytes, params: Mapping[str, str]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Inverse of encode_volume: (read-only [S, R, C] int16 array, (col, row, slice) spacing in mm)."""
    values = {}
    for key in ("shape", "dtype", "spacing_mm"):
        if key not in params:
            raise ProtocolError(key, "required query parameter is missing")
        values[key] = str(params[key]).split(",")
    if values["dtype"] != ["int16"]:
        raise ProtocolError("dtype", f"expected 'int16' (HU, little-endian), got {params['dtype']!r}")
    try:
        shape = [int(part) for part in values["shape"]]
        spacing = [float(part) for part in values["spacing_mm"]]
    except ValueError as error:
        raise ProtocolError("shape/spacing_mm", f"expected comma-separated numbers ({error})") from error
    slices, rows, cols = _check_shape(shape, "shape", (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    n_bytes = _check_volume_bytes(shape, "shape")
    if len(body) != n_bytes:
        raise ProtocolError("body", f"has {len(body)} bytes but shape {shape} int16 needs {n_bytes}")
    array = np.frombuffer(body, dtype="<i2").astype(np.int16, copy=False).reshape(slices, rows, cols)
    return array, _check_spacing(spacing, "spacing_mm", 3)


# --- field checks (all raise ProtocolError naming the field) ---------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_int16_array(array: Any, field: str, ndim: int) -> None:
    if not isinstance(array, np.ndarray):
        raise ProtocolError(field, f"expected a numpy array, got {_type_name(array)}")
    if array.dtype.kind != "i" or array.dtype.itemsize != 2:
        raise ProtocolError(field, f"expected int16 HU values, got dtype {array.dtype}; convert with "
                                   "np.clip(a, -32768, 32767).round().astype(np.int16)")
    limits = (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE)[-ndim:]
    _check_shape(list(array.shape), f"{field}.shape", limits)


def _check_volume_bytes(shape: tuple[int, ...] | list[int], field: str) -> int:
    n_bytes = math.prod(shape) * 2
    if n_bytes > MAX_VOLUME_BYTES:
        raise ProtocolError(field, f"{n_bytes} bytes of int16 exceed the upload limit of {MAX_VOLUME_BYTES} bytes; "
                                   "send a slice range (crop the volume) instead")
    return n_bytes


def _check_shape(shape: Any, field: str, limits: tuple[int, ...]) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) != len(limits):
        raise ProtocolError(field, f"expected {len(limits)} dimensions, got {shape!r}")
    for axis, (size, limit) in enumerate(zip(shape, limits)):
        _check_int(size, f"{field}[{axis}]", 1, limit)
    return tuple(int(size) for size in shape)


def _check_int(value: Any, field: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProtocolError(field, f"expected an integer, got {_type_name(value)} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(field, f"{value} is outside the allowed range [{low}, {high}]")
    return int(value)


def _check_float(value: Any, field: str, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(field, f"expected a number, got {_type_name(value)} {value!r}")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0):
        raise ProtocolError(field, f"expected a finite{' positive' if positive else ''} number, got {number}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ProtocolError(field, f"{number} is outside the allowed range [{low}, {high}]")
    return number


def _check_str(value: Any, field: str, max_len: int = 10_000, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ProtocolError(field, "must not be empty")
    if len(value) > max_len:
        raise ProtocolError(field, f"has {len(value)} characters, more than the limit of {max_len}")
    return value


def _check_choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ProtocolError(field, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(field, f"expected true or false, got {_type_name(value)}")
    return value


def _check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ProtocolError(field, f"expected 1-64 letters, digits, '-' or '_', got {value!r}")
    return value


def _check_list(value: Any, field: str, max_len: int) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(field, f"expected a list, got {_type_name(value)}")
    if len(value) > max_len:
        raise ProtocolError(field, f"has {len(value)} items, more than the limit of {max_len}")
    return tuple(value)


def _check_spacing(value: Any, field: str, n: int) -> tuple[float, ...]:
    items = _check_list(value, field, n)
    if len(items) != n:
        raise ProtocolError(field, f"expected {n} spacings in mm, got {len(items)}")
    return tuple(_check_float(item, f"{field}[{axis}]", positive=True) for axis, item in enumerate(items))


def _check_nested(value: Any, field: str, schema: type) -> Any:
    if not isinstance(value, schema):
        raise ProtocolError(field, f"expected a {schema.__name__}, got {_type_name(value)}")
    return value


# --- schema machinery ---------------------------------------------------------------------------------------------

SchemaT = TypeVar("SchemaT", bound="_Schema")


def _wire(value: Any) -> Any:
    """A field value -> its JSON form."""
    if isinstance(value, _Schema):
        return value.to_dict()
    if isinstance(value, np.ndarray):
        return encode_slice(value)
    if isinstance(value, (list, tuple)):
        return [_wire(item) for item in value]
    return value


def _unwire(value: Any, meta: Mapping[str, Any], path: str) -> Any:
    """A JSON value -> the field value, using the field's metadata ("slice", or "schema" (+ "many"))."""
    if meta.get("slice"):
        return decode_slice(value, path)
    schema = meta.get("schema")
    if schema is None:
        return value
    if not meta.get("many"):
        return _nested_from_dict(schema, value, path)
    items = _check_list(value, path, meta.get("max_len", 100_000))
    return tuple(_nested_from_dict(schema, item, f"{path}[{index}]") for index, item in enumerate(items))


def _nested_from_dict(schema: type[_Schema], value: Any, path: str) -> Any:
    try:
        return schema.from_dict(value)
    except ProtocolError as error:  # "BoxResult.confidence" -> "QueryResponse.boxes[2].confidence"
        _, dot, rest = error.field.partition(".")
        raise ProtocolError(path + dot + rest, error.problem) from None


@dataclass(frozen=True)
class _Schema:
    """Base of every message: `from_dict` checks presence, `__post_init__` checks types and ranges."""

    def to_dict(self) -> dict[str, Any]:
        return {item.name: _wire(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_dict(cls: type[SchemaT], data: Any) -> SchemaT:
        if not isinstance(data, Mapping):
            raise ProtocolError(cls.__name__, f"expected a JSON object, got {_type_name(data)}")
        kwargs = {}
        for item in fields(cls):
            path = f"{cls.__name__}.{item.name}"
            if item.name in data:
                kwargs[item.name] = _unwire(data[item.name], item.metadata, path)
            elif item.default is MISSING and item.default_factory is MISSING:
                raise ProtocolError(path, "required field is missing")
        return cls(**kwargs)

    def _set(self, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
        """Validate (and normalise, e.g. list -> tuple) field `name` with `check(value, path, ...)`."""
        value = check(getattr(self, name), f"{type(self).__name__}.{name}", *args, **kwargs)
        object.__setattr__(self, name, value)

    def _set_optional(self, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, name) is not None:
            self._set(name, check, *args, **kwargs)

    def _set_items(self, name: str, schema: type, max_len: int) -> None:
        path = f"{type(self).__name__}.{name}"
        items = _check_list(getattr(self, name), path, max_len)
        object.__setattr__(self, name, tuple(_check_nested(item, f"{path}[{index}]", schema)
                                             for index, item in enumerate(items)))


# --- messages -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnswerOptions(_Schema):
    """How to generate and decode an answer. temperature 0 = greedy (upstream evaluation: greedy, 20 tokens)."""

    max_new_tokens: int = 20
    temperature: float = 0.0
    box_decoding: str = "center"  # grammar.grid_to_pixels mode; "floor" reproduces upstream numbers
    image_variant: str = "window"  # preprocess.hu_slice_to_gray variant

    def __post_init__(self) -> None:
        self._set("max_new_tokens", _check_int, 1, MAX_NEW_TOKENS_LIMIT)
        self._set("temperature", _check_float, 0.0, 2.0)
        self._set("box_decoding", _check_choice, ("center", "floor"))
        self._set("image_variant", _check_choice, ("window", "paper"))


@dataclass(frozen=True)
class BoxResult(_Schema):
    """One box on the sent slice: (x_min, y_min, x_max, y_max) in pixel index coordinates (x = column)."""

    box: tuple[float, float, float, float]
    label: str | None = None
    confidence: float | None = None  # in [0, 1]

    def __post_init__(self) -> None:
        path = "BoxResult.box"
        coords = _check_list(self.box, path, 4)
        if len(coords) != 4:
            raise ProtocolError(path, f"expected [x_min, y_min, x_max, y_max], got {len(coords)} numbers")
        x_min, y_min, x_max, y_max = (_check_float(c, f"{path}[{i}]") for i, c in enumerate(coords))
        if x_min > x_max or y_min > y_max:
            raise ProtocolError(path, f"min exceeds max in {[x_min, y_min, x_max, y_max]}")
        object.__setattr__(self, "box", (x_min, y_min, x_max, y_max))
        self._set_optional("label", _check_str, 200)
        self._set_optional("confidence", _check_float, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class SliceQueryRequest(_Schema):
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
        self._set("prompt", _check_str, MAX_PROMPT_CHARS)
        _check_int16_array(self.slice_hu, "SliceQueryRequest.slice_hu", ndim=2)
        self._set("pixel_spacing_mm", _check_spacing, 2)
        self._set_optional("slice_index", _check_int, 0)
        self._set_optional("volume_id", _check_id)
        self._set("options", _check_nested, AnswerOptions)


@dataclass(frozen=True)
class QueryResponse(_Schema):
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
        self._set("answer", _check_str, 100_000, allow_empty=True)
        self._set("kind", _check_choice, ANSWER_KINDS)
        self._set("model_id", _check_str, 200)
        self._set_items("boxes", BoxResult, 1000)
        self._set_optional("yes", _check_bool)
        self._set_optional("yes_probability", _check_float, 0.0, 1.0)
        self._set_optional("reason", _check_str, 10_000)
        self._set_optional("slice_index", _check_int, 0)
        self._set("queue_ms", _check_float, 0.0)
        self._set("inference_ms", _check_float, 0.0)


@dataclass(frozen=True)
class Health(_Schema):
    """GET /healthz: cheap, never waits for the GPU."""

    status: str  # ok | loading | error
    api_version: str
    model_id: str
    device: str
    busy: bool

    def __post_init__(self) -> None:
        self._set("status", _check_choice, HEALTH_STATES)
        parse_api_version(self.api_version, "Health.api_version")
        self._set("model_id", _check_str, 200, allow_empty=True)  # empty while loading
        self._set("device", _check_str, 200)
        self._set("busy", _check_bool)


@dataclass(frozen=True)
class ModelInfo(_Schema):
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

    def __post_init__(self) -> None:
        for name in ("model_id", "server_version", "device", "precision"):
            self._set(name, _check_str, 200)
        parse_api_version(self.api_version, "ModelInfo.api_version")
        self._set("image_size", _check_int, 1)
        self._set("max_new_tokens_limit", _check_int, 1)
        self._set("max_upload_bytes", _check_int, 1)
        self._set("example_prompts", _check_list, 100)
        for index, prompt in enumerate(self.example_prompts):
            _check_str(prompt, f"ModelInfo.example_prompts[{index}]", MAX_PROMPT_CHARS)


@dataclass(frozen=True)
class VolumeUploadResponse(_Schema):
    """POST /api/v1/volumes: the id under which the server keeps the model-view volume [S, R, C]."""

    volume_id: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (col, row, slice)

    def __post_init__(self) -> None:
        self._set("volume_id", _check_id)
        self._set("shape", _check_shape, (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
        self._set("spacing_mm", _check_spacing, 3)


@dataclass(frozen=True)
class SweepJobRequest(_Schema):
    """Ask one prompt on model-view slices range(slice_start, slice_stop or S, step) of an uploaded volume."""

    volume_id: str
    prompt: str
    slice_start: int = 0
    slice_stop: int | None = None  # exclusive; None = to the last slice
    step: int = 1
    options: AnswerOptions = field(default_factory=AnswerOptions, metadata={"schema": AnswerOptions})

    def __post_init__(self) -> None:
        self._set("volume_id", _check_id)
        self._set("prompt", _check_str, MAX_PROMPT_CHARS)
        self._set("slice_start", _check_int, 0, MAX_VOLUME_SLICES - 1)
        self._set_optional("slice_stop", _check_int, self.slice_start + 1, MAX_VOLUME_SLICES)
        self._set("step", _check_int, 1, MAX_VOLUME_SLICES)
        self._set("options", _check_nested, AnswerOptions)


@dataclass(frozen=True)
class SweepJobStatus(_Schema):
    """A sweep job: its state, progress (done of total slices) and one QueryResponse per finished slice."""

    job_id: str
    volume_id: str
    state: str  # queued | running | done | cancelled | failed
    done: int
    total: int
    results: tuple[QueryResponse, ...] = field(default=(), metadata={"schema": QueryResponse, "many": True})
    message: str | None = None  # why it failed, for instance

    def __post_init__(self) -> None:
        self._set("job_id", _check_id)
        self._set("volume_id", _check_id)
        self._set("state", _check_choice, SWEEP_STATES)
        self._set("total", _check_int, 0, MAX_VOLUME_SLICES)
        self._set("done", _check_int, 0, self.total)
        self._set_items("results", QueryResponse, MAX_VOLUME_SLICES)
        for index, result in enumerate(self.results):
            if result.slice_index is None:
                raise ProtocolError(f"SweepJobStatus.results[{index}].slice_index", "is required in a sweep")
        self._set_optional("message", _check_str, 10_000)

    @property
    def finished(self) -> bool:
        return self.state in SWEEP_FINISHED_STATES


@dataclass(frozen=True)
class ChatMessage(_Schema):
    role: str  # user | assistant
    text: str

    def __post_init__(self) -> None:
        self._set("role", _check_choice, ("user", "assistant"))
        self._set("text", _check_str, MAX_PROMPT_CHARS)


@dataclass(frozen=True, eq=False)
class ChatRequest(_Schema):
    """A conversation about one slice: turns alternate user/assistant, starting and ending with the user."""

    messages: tuple[ChatMessage, ...] = field(metadata={"schema": ChatMessage, "many": True})
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
        _check_int16_array(self.slice_hu, "ChatRequest.slice_hu", ndim=2)
        self._set("pixel_spacing_mm", _check_spacing, 2)
        self._set("options", _check_nested, AnswerOptions)


@dataclass(frozen=True)
class ChatResponse(_Schema):
    """The assistant's reply, with any boxes it drew on the slice."""

    answer: str
    model_id: str
    boxes: tuple[BoxResult, ...] = field(default=(), metadata={"schema": BoxResult, "many": True})
    inference_ms: float = 0.0

    def __post_init__(self) -> None:
        self._set("answer", _check_str, 100_000, allow_empty=True)
        self._set("model_id", _check_str, 200)
        self._set_items("boxes", BoxResult, 1000)
        self._set("inference_ms", _check_float, 0.0)


@dataclass(frozen=True)
class ErrorResponse:
    """Body of every error reply: {"error": {"code": ..., "message": ...}}."""

    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        codes = tuple(code.value for code in ErrorCode)
        object.__setattr__(self, "code", ErrorCode(_check_choice(self.code, "ErrorResponse.error.code", codes)))
        _check_str(self.message, "ErrorResponse.error.message")

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
