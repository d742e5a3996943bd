"""HTTP client of the MiniGPT-Pancreas service, for the Slicer module and for scripts (requests; no torch, no Qt).

Every call has explicit (connect, read) timeouts and sends the client's API version. Every failure becomes a
`ClientError` subclass whose message says what happened and what to do, with the original exception chained as
`__cause__`. The access token goes only into the `Authorization: Bearer` header: never into messages, logs or repr.
Redirects are not followed (a redirect to another host would drop or leak the token); the message names the target.

Calls block: in a GUI, make them from a worker thread, one client per thread. Bad arguments (an int16 slice of the
wrong shape, an empty prompt) raise `protocol.ProtocolError` before anything is sent.

The ClientError hierarchy and the mapping of failures onto it live in client_errors.py; this module re-exports
them, so import every client name from here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import requests

from . import protocol as p
from .client_errors import (
    AuthenticationError, ClientError, ConnectionSettingsError, EndpointNotFoundError, InvalidResponseError,
    PayloadTooLargeError, RequestRejectedError, ResourceNotFoundError, ServerBusyError, ServerError,
    ServerNotRunningError, ServerTimeoutError, ServerUnreachableError, VersionMismatchError, http_error,
    transport_error,
)

__all__ = [
    "DEFAULT_URL", "QUICK_READ_TIMEOUT_S", "SchemaT", "MiniGPTPancreasClient", "normalize_base_url",
    "ClientError", "ConnectionSettingsError", "ServerNotRunningError", "ServerUnreachableError", "ServerTimeoutError",
    "AuthenticationError", "EndpointNotFoundError", "ResourceNotFoundError", "VersionMismatchError",
    "PayloadTooLargeError", "ServerBusyError", "RequestRejectedError", "ServerError", "InvalidResponseError",
]

DEFAULT_URL = "http://127.0.0.1:8765"
QUICK_READ_TIMEOUT_S = 10.0  # health, info, sweep status and cancel answer without waiting for the GPU
_log = logging.getLogger(__name__)
SchemaT = TypeVar("SchemaT")


def normalize_base_url(url: Any) -> str:
    """'http://host:port[/]' -> 'http://host:port'; anything else raises ConnectionSettingsError."""
    example = f"e.g. {DEFAULT_URL}"
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ConnectionSettingsError(f"The server address is empty. Enter it as http://HOST:PORT, {example}.")
    parts = urlsplit(text)
    if "://" not in text or parts.scheme not in ("http", "https"):
        raise ConnectionSettingsError(f"The server address '{text}' must start with http:// or https://, {example}.")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if not parts.hostname or port == 0:
        raise ConnectionSettingsError(f"The server address '{text}' needs a host name and, if given, a port in "
                                      f"1-65535, {example}.")
    if parts.username or parts.password:
        raise ConnectionSettingsError("The server address must not contain a user name or password; "
                                      "enter the access token in its own field.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConnectionSettingsError(f"The server address '{text}' must be only scheme, host and port, {example}, "
                                      f"without a path such as '{p.API_PREFIX}'.")
    return f"{parts.scheme}://{parts.netloc}"


def _check_token(token: str | None) -> str | None:
    """Strip pasted whitespace; an empty token means none."""
    if token is None or not token.strip():
        return None
    token = token.strip()
    if any(char.isspace() or not char.isprintable() for char in token):
        raise ConnectionSettingsError("The access token contains spaces, line breaks or control characters; "
                                      "paste it again as one word.")
    return token


def _check_timeout(seconds: float, name: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


class MiniGPTPancreasClient:
    """Talks to one MiniGPT-Pancreas server. Use as a context manager, or call close()."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, connect_timeout: float = 3.05,
                 read_timeout: float = 120.0, session: requests.Session | None = None) -> None:
        self.base_url = normalize_base_url(base_url)
        self._token = _check_token(token)
        self.connect_timeout = _check_timeout(connect_timeout, "connect_timeout")
        self.read_timeout = _check_timeout(read_timeout, "read_timeout")  # CPU inference takes tens of seconds
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()

    def __repr__(self) -> str:
        return f"MiniGPTPancreasClient({self.base_url!r}, token={'set' if self._token else 'none'})"

    def __enter__(self) -> MiniGPTPancreasClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    # --- the API ------------------------------------------------------------------------------------------------

    def health(self) -> p.Health:
        return self._call(p.Health, "GET", p.ROUTE_HEALTH, self._quick_timeout)

    def check_connection(self) -> p.Health:
        """Health plus the API version check ("Test connection"). A loading model is not an error."""
        what = "GET " + p.ROUTE_HEALTH
        body = self._request("GET", p.ROUTE_HEALTH, self._quick_timeout)
        server_version = body.get("api_version") if isinstance(body, dict) else None
        try:
            p.check_api_version(server_version)
        except p.ApiVersionError as error:
            raise VersionMismatchError(f"The server at {self.base_url} is incompatible: {error.problem}") from error
        except p.ProtocolError as error:
            raise self._schema_error(error, what) from error
        health = self._parse(p.Health, body, what)
        if health.status == "error":
            raise ServerError(f"The server at {self.base_url} is running but its model failed to load. "
                              "Look at the server log (the console running `minigpt-pancreas serve`).")
        return health

    def info(self) -> p.ModelInfo:
        return self._call(p.ModelInfo, "GET", p.ROUTE_INFO, self._quick_timeout)

    def query_slice(self, slice_hu: np.ndarray, prompt: str, pixel_spacing_mm: tuple[float, float], *,
                    slice_index: int | None = None, volume_id: str | None = None,
                    options: p.AnswerOptions | None = None, read_timeout: float | None = None) -> p.QueryResponse:
        """Ask `prompt` about one model-view slice [R, C] int16 HU; boxes come back in its pixel indices."""
        request = p.SliceQueryRequest(prompt, slice_hu, pixel_spacing_mm, slice_index, volume_id,
                                      options or p.AnswerOptions())
        return self._call(p.QueryResponse, "POST", p.ROUTE_QUERY, read_timeout, json=request.to_dict())

    def upload_volume(self, volume_src: np.ndarray, spacing_mm: tuple[float, float, float], *,
                      read_timeout: float | None = None) -> p.VolumeUploadResponse:
        """Send a model-view volume [S, R, C] int16 HU with its (col, row, slice) spacing, once, for sweeps."""
        body, params = p.encode_volume(volume_src, spacing_mm)
        return self._call(p.VolumeUploadResponse, "POST", p.ROUTE_VOLUMES, read_timeout, data=body, params=params)

    def start_sweep(self, volume_id: str, prompt: str, *, slice_start: int = 0, slice_stop: int | None = None,
                    step: int = 1, options: p.AnswerOptions | None = None) -> p.SweepJobStatus:
        request = p.SweepJobRequest(volume_id, prompt, slice_start, slice_stop, step, options or p.AnswerOptions())
        return self._call(p.SweepJobStatus, "POST", p.ROUTE_SWEEPS, None, json=request.to_dict())

    def sweep_status(self, job_id: str) -> p.SweepJobStatus:
        return self._call(p.SweepJobStatus, "GET", p.sweep_route(job_id), self._quick_timeout)

    def cancel_sweep(self, job_id: str) -> p.SweepJobStatus:
        return self._call(p.SweepJobStatus, "DELETE", p.sweep_route(job_id), self._quick_timeout)

    def chat(self, messages: Sequence[p.ChatMessage], slice_hu: np.ndarray, pixel_spacing_mm: tuple[float, float],
             *, options: p.AnswerOptions | None = None, read_timeout: float | None = None) -> p.ChatResponse:
        request = p.ChatRequest(tuple(messages), slice_hu, pixel_spacing_mm,
                                options or p.AnswerOptions(max_new_tokens=300))
        return self._call(p.ChatResponse, "POST", p.ROUTE_CHAT, read_timeout, json=request.to_dict())

    # --- transport ------------------------------------------------------------------------------------------------

    def _call(self, schema: type[SchemaT], method: str, route: str, read_timeout: float | None,
              **body: Any) -> SchemaT:
        return self._parse(schema, self._request(method, route, read_timeout, **body), f"{method} {route}")

    @property
    def _quick_timeout(self) -> float:
        return min(QUICK_READ_TIMEOUT_S, self.read_timeout)

    def _request(self, method: str, route: str, read_timeout: float | None, **body: Any) -> Any:
        """Send one request (read_timeout None: the client's); return its decoded JSON or raise a ClientError."""
        what = f"{method} {route}"
        headers = {p.API_VERSION_HEADER: p.API_VERSION, "Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        if "data" in body:
            headers["Content-Type"] = "application/octet-stream"
        read = self.read_timeout if read_timeout is None else _check_timeout(read_timeout, "read_timeout")
        timeout = (self.connect_timeout, read)
        _log.debug("%s %s (timeouts %s)", method, self.base_url + route, timeout)  # no headers: they hold the token
        try:
            response = self._session.request(method, self.base_url + route, headers=headers, timeout=timeout,
                                             allow_redirects=False, **body)
        except requests.RequestException as error:
            raise transport_error(error, self.base_url, what, timeout) from error
        if not 200 <= response.status_code < 300:
            raise http_error(response, self.base_url, what, token_sent=self._token is not None)
        try:
            return response.json()
        except ValueError as error:
            raise InvalidResponseError(
                f"The server at {self.base_url} sent a reply to {what} that is not valid JSON (HTTP "
                f"{response.status_code}, begins {response.text[:60]!r}). The address may point to another "
                "service; check the URL, and the server log.", response.status_code) from error

    def _parse(self, schema: type[SchemaT], body: Any, what: str) -> SchemaT:
        try:
            return schema.from_dict(body)  # type: ignore[attr-defined]
        except p.ProtocolError as error:
            raise self._schema_error(error, what) from error

    def _schema_error(self, error: p.ProtocolError, what: str) -> InvalidResponseError:
        return InvalidResponseError(
            f"The server at {self.base_url} sent a reply to {what} that does not follow API {p.API_VERSION} "
            f"({error}). Client and server may come from different releases; update both to the same one.")
