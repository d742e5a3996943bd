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

Layout: this module holds the version, the routes, the error envelope and the volume upload encoding, and
re-exports the rest, so import every protocol name from here. protocol_schemas.py defines the messages;
protocol_base.py the limits, ProtocolError, the field validators and the slice encoding they are built from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .protocol_base import (
    ID_PATTERN, MAX_CHAT_MESSAGES, MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_CHARS, MAX_SLICE_SIDE, MAX_VOLUME_BYTES,
    MAX_VOLUME_SLICES, ProtocolError, SchemaT, check_choice, check_id, check_int16_array, check_shape,
    check_spacing, check_str, check_volume_bytes, decode_slice, encode_slice, excerpt, parse_api_version,
)
from .protocol_schemas import (
    ANSWER_KINDS, HEALTH_STATES, SWEEP_FINISHED_STATES, SWEEP_STATES, AnswerOptions, BoxResult, ChatMessage,
    ChatRequest, ChatResponse, Health, ModelInfo, QueryResponse, SliceQueryRequest, SweepJobRequest, SweepJobStatus,
    VolumeUploadResponse,
)

__all__ = [
    # version and routes
    "API_VERSION", "API_PREFIX", "API_VERSION_HEADER", "ROUTE_HEALTH", "ROUTE_INFO", "ROUTE_QUERY", "ROUTE_VOLUMES",
    "ROUTE_SWEEPS", "ROUTE_SWEEP", "ROUTE_CHAT", "sweep_route", "parse_api_version", "check_api_version",
    # limits and enumerations
    "MAX_SLICE_SIDE", "MAX_VOLUME_SLICES", "MAX_VOLUME_BYTES", "MAX_PROMPT_CHARS", "MAX_NEW_TOKENS_LIMIT",
    "MAX_CHAT_MESSAGES", "ID_PATTERN", "ANSWER_KINDS", "HEALTH_STATES", "SWEEP_STATES", "SWEEP_FINISHED_STATES",
    # errors
    "ErrorCode", "ErrorResponse", "ProtocolError", "ApiVersionError",
    # arrays on the wire
    "encode_slice", "decode_slice", "encode_volume", "decode_volume", "parse_volume_params", "excerpt",
    # messages
    "SchemaT", "AnswerOptions", "BoxResult", "SliceQueryRequest", "QueryResponse", "Health", "ModelInfo",
    "VolumeUploadResponse", "SweepJobRequest", "SweepJobStatus", "ChatMessage", "ChatRequest", "ChatResponse",
]

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
    return ROUTE_SWEEP.format(job_id=check_id(job_id, "job_id"))


# --- the volume upload body -----------------------------------------------------------------------------------------

def encode_volume(volume_src: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[bytes, dict[str, str]]:
    """Model-view volume [S, R, C] int16 + (col, row, slice) spacing -> (request body, query parameters)."""
    check_int16_array(volume_src, "volume", ndim=3)
    check_volume_bytes(volume_src.shape, "volume.shape")
    spacing = check_spacing(spacing_mm, "volume.spacing_mm", 3)
    params = {"shape": ",".join(str(n) for n in volume_src.shape), "dtype": "int16",
              "spacing_mm": ",".join(repr(s) for s in spacing)}
    return np.ascontiguousarray(volume_src, dtype="<i2").tobytes(), params


def decode_volume(body: bytes, params: Mapping[str, str]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Inverse of encode_volume: (read-only [S, R, C] int16 array, (col, row, slice) spacing in mm)."""
    shape, spacing, n_bytes = parse_volume_params(params)
    if len(body) != n_bytes:
        raise ProtocolError("body", f"has {len(body)} bytes but shape {list(shape)} int16 needs {n_bytes}")
    return np.frombuffer(body, dtype="<i2").astype(np.int16, copy=False).reshape(shape), spacing


def parse_volume_params(params: Mapping[str, str]) -> tuple[tuple[int, int, int], tuple[float, ...], int]:
    """The query string of a volume upload -> (shape, spacing, body bytes), checked before the body is read."""
    values = {}
    for key in ("shape", "dtype", "spacing_mm"):
        if key not in params:
            raise ProtocolError(key, "required query parameter is missing")
        values[key] = str(params[key]).split(",")
    if values["dtype"] != ["int16"]:
        raise ProtocolError("dtype", f"expected 'int16' (HU, little-endian), got {excerpt(params['dtype'])}")
    # Plain digits only: int() would also read "1_0" as 10 and " 7" as 7, and take any number of digits.
    if not all(re.fullmatch(r"\d{1,9}", part) for part in values["shape"]):
        raise ProtocolError("shape", f"expected comma-separated numbers S,R,C (whole, digits only), got "
                                     f"{excerpt(params['shape'])}")
    if not all(re.fullmatch(r"[0-9.eE+-]{1,32}", part) for part in values["spacing_mm"]):
        raise ProtocolError("spacing_mm", f"expected three comma-separated numbers in mm, got "
                                          f"{excerpt(params['spacing_mm'])}")
    try:
        spacing = [float(part) for part in values["spacing_mm"]]
    except ValueError as error:
        raise ProtocolError("spacing_mm", f"expected comma-separated numbers ({error})") from error
    shape = check_shape([int(part) for part in values["shape"]], "shape",
                        (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    n_bytes = check_volume_bytes(shape, "shape")
    return shape, check_spacing(spacing, "spacing_mm", 3), n_bytes
