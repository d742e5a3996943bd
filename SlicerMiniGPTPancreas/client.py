"""HTTP client of the MiniGPT-Pancreas service, for the Slicer module and for scripts (requests; no torch, no Qt).

Every call has explicit (connect, read) timeouts and sends the client's API version. Every failure becomes a
`ClientError` subclass whose message says what happened and what to do, for the user to read, with the original
exception chained as `__cause__`; `transport_error` and `http_error` turn a requests exception or an HTTP error
reply into one. The access token goes only into the `Authorization: Bearer` header: never into messages, logs or
repr. Redirects are not followed (a redirect to another host would drop or leak the token); the message names the
target.

Calls block: in a GUI, make them from a worker thread, one client per thread. Bad arguments (an int16 slice of the
wrong shape, an empty prompt) raise `validation.ProtocolError` before anything is sent.
"""

from __future__ import annotations

import email.utils
import logging
import math
import socket
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import requests
from urllib3.exceptions import NameResolutionError, ReadTimeoutError

from . import protocol as p
from .errors import UserError
from .validation import ProtocolError
from .wire_arrays import encode_scan, encode_volume

DEFAULT_URL = "http://127.0.0.1:8765"
QUICK_READ_TIMEOUT_S = 10.0  # health, info, sweep status and cancel answer without waiting for the GPU
_log = logging.getLogger(__name__)
SchemaT = TypeVar("SchemaT")


# --- the failures -------------------------------------------------------------------------------------------------

class ClientError(UserError):
    """Base of every client failure; `str()` is a message for the user, `status` the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionSettingsError(ClientError, ValueError):
    """The server address or the token is unusable (malformed, or the server redirects to another address)."""


class ServerNotRunningError(ClientError):
    """Nothing listens at the address (connection refused)."""


class ServerUnreachableError(ClientError):
    """The host name does not resolve, the network does not route to it, or TLS failed."""


class ServerTimeoutError(ClientError):
    """Connecting (`phase` "connect") or waiting for the answer (`phase` "read") took longer than `seconds`."""

    def __init__(self, message: str, phase: str, seconds: float) -> None:
        super().__init__(message)
        self.phase = phase
        self.seconds = seconds


class AuthenticationError(ClientError):
    """HTTP 401/403: missing or wrong access token."""


class EndpointNotFoundError(ClientError):
    """HTTP 404 for a route: wrong address or an older server."""


class ResourceNotFoundError(ClientError):
    """HTTP 404 for a volume or job id the server does not (or no longer) know."""


class VersionMismatchError(ClientError):
    """Client and server major API versions differ."""


class PayloadTooLargeError(ClientError):
    """HTTP 413."""


class ServerBusyError(ClientError):
    """HTTP 503; `retry_after_s` from the Retry-After header, None when the server gave none."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message, status=503)
        self.retry_after_s = retry_after_s


class RequestRejectedError(ClientError):
    """Another 4xx: the server found the request invalid (its message says why)."""


class ServerError(ClientError):
    """HTTP 5xx or a server whose model failed to load."""


class InvalidResponseError(ClientError):
    """The reply is not JSON, or not the schema of this API version."""


def transport_error(error: requests.RequestException, url: str, what: str,
                    timeout: tuple[float, float]) -> ClientError:
    """The ClientError for a request `what` ("GET /healthz") to the server at `url` that got no HTTP reply."""
    causes = _causes(error)
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return ServerTimeoutError(
            f"Connecting to {url} took longer than the connect timeout of {timeout[0]:g} s. Check the address "
            "and that the server machine is switched on and reachable (firewall, VPN).", "connect", timeout[0])
    if isinstance(error, requests.exceptions.ReadTimeout) or _has(causes, ReadTimeoutError):
        return ServerTimeoutError(
            f"The server at {url} accepted {what} but sent no answer within the read timeout of "
            f"{timeout[1]:g} s. The model may still be loading or the GPU may be overloaded; try again, or "
            "raise the read timeout for slow (CPU) servers.", "read", timeout[1])
    if isinstance(error, requests.exceptions.SSLError):
        return ServerUnreachableError(
            f"The secure (https) connection to {url} failed: the certificate was refused or the server does "
            "not speak https. Check the address (http or https) and the server's certificate.")
    if _has(causes, NameResolutionError, socket.gaierror):
        return ServerUnreachableError(
            f"The host name '{urlsplit(url).hostname}' in {url} cannot be resolved. Check the server address "
            "for typos, or use its IP address.")
    if _has(causes, ConnectionRefusedError):
        return ServerNotRunningError(
            f"No MiniGPT-Pancreas server answers at {url}. Start it with `minigpt-pancreas serve` or check "
            "the address.")
    if isinstance(error, requests.exceptions.ConnectionError):
        return ServerUnreachableError(
            f"The connection to {url} failed during {what} ({causes[-1]}). Check the address and that the "
            "server is running and reachable from this computer (firewall, VPN).")
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader)):
        return ConnectionSettingsError(f"The server address {url} or the token cannot be used: {error}")
    return ClientError(f"The request {what} to {url} failed: {error}")


def http_error(response: requests.Response, url: str, what: str, token_sent: bool) -> ClientError:
    """The ClientError for a non-2xx reply from the server at `url` to the request `what` ("GET /healthz")."""
    status = response.status_code
    message, code = _error_details(response)
    detail = f": {message}" if message else ""
    if code is p.ErrorCode.VERSION_MISMATCH:
        return VersionMismatchError(f"The server at {url} refuses this client's API {p.API_VERSION}{detail}. "
                                    "Update the older side so both have the same major version.", status)
    if status in (401, 403) and not token_sent:
        return AuthenticationError(f"The server at {url} requires an access token (HTTP {status}). Enter the "
                                   "token the server was started with in the connection settings.", status)
    if status in (401, 403):
        return AuthenticationError(f"The server at {url} rejected the access token (HTTP {status}). Check "
                                   "that it matches the token the server was started with.", status)
    if status == 404 and code is p.ErrorCode.NOT_FOUND:
        return ResourceNotFoundError(f"The server at {url} does not know the item asked for by {what}"
                                     f"{detail}. Upload the volume or start the job again.", status)
    if status == 404:
        return EndpointNotFoundError(f"The server at {url} has no endpoint {what} (HTTP 404). The address "
                                     "may point to another service, or the server is older than this client "
                                     f"(API {p.API_VERSION}): check the URL or update the server.", status)
    if status == 413:
        return PayloadTooLargeError(f"The server at {url} refused {what} as too large (HTTP 413){detail}. "
                                    "Send a smaller volume or slice range, or raise the server's upload "
                                    "limit.", status)
    if code is p.ErrorCode.MODEL_UNAVAILABLE:  # not busy: waiting will not help (its message says what will)
        return ServerError(f"The server at {url} cannot answer {what}{detail}.", status)
    if status == 503:
        retry_after_s = _retry_after_s(response.headers.get("Retry-After"))
        when = "shortly" if retry_after_s is None else f"in {math.ceil(retry_after_s)} s"
        return ServerBusyError(f"The server at {url} is busy with other work (HTTP 503){detail}. "
                               f"Try again {when}.", retry_after_s)
    if status >= 500:
        return ServerError(f"The server at {url} failed while handling {what} (HTTP {status}){detail}. "
                           "Look at the server log (the console running `minigpt-pancreas serve`) for the "
                           "cause.", status)
    if 300 <= status < 400:
        return ConnectionSettingsError(f"The server at {url} redirects {what} to "
                                       f"{response.headers.get('Location', 'another address')}. Use the final "
                                       "address as the server URL.", status)
    return RequestRejectedError(f"The server at {url} refused {what} (HTTP {status}){detail}.", status)


def _causes(error: BaseException) -> list[BaseException]:
    """The exception, its chained causes and the wrapped urllib3 reasons, outermost first."""
    found: list[BaseException] = []
    pending: list[Any] = [error]
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return found


def _has(causes: list[BaseException], *kinds: type[BaseException]) -> bool:
    return any(isinstance(cause, kinds) for cause in causes)


def _error_details(response: requests.Response) -> tuple[str, p.ErrorCode | None]:
    """(the server's message, its ErrorCode) from our error body, FastAPI's {"detail"} or plain text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300], None
    try:
        error = p.ErrorResponse.from_dict(body)
        return error.message, error.code
    except ProtocolError:
        pass
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}]
        detail = "; ".join(f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
                           for item in detail if isinstance(item, dict))
    return (str(detail) if detail else str(body)[:300]), None


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# --- the client ------------------------------------------------------------------------------------------------

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
        except ProtocolError as error:
            raise self._schema_error(error, what) from error
        health = self._parse(p.Health, body, what)
        if health.status == "error":
            why = (f": {health.message}" if health.message else ". Look at the server log (the console running "
                   "`minigpt-pancreas serve`).")
            raise ServerError(f"The server at {self.base_url} is running but its model failed to load{why}")
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
        body, params = encode_volume(volume_src, spacing_mm)
        return self._call(p.VolumeUploadResponse, "POST", p.ROUTE_VOLUMES, read_timeout, data=body, params=params)

    def upload_scan(self, volume_kji: np.ndarray, ijk_to_ras: np.ndarray, *, resample: bool = False,
                    read_timeout: float | None = None) -> p.VolumeUploadResponse:
        """Send a volume as stored [K, J, I] int16 HU with its 4x4 ijk_to_ras; the server makes the model view, and
        with `resample` resamples a tilted volume onto the nearest axial grid (`resampled` in the reply) instead
        of refusing it."""
        body, params = encode_scan(volume_kji, ijk_to_ras, resample)
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
        except ProtocolError as error:
            raise self._schema_error(error, what) from error

    def _schema_error(self, error: ProtocolError, what: str) -> InvalidResponseError:
        return InvalidResponseError(
            f"The server at {self.base_url} sent a reply to {what} that does not follow API {p.API_VERSION} "
            f"({error}). Client and server may come from different releases; update both to the same one.")
