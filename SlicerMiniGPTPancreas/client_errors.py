"""The failures of the MiniGPT-Pancreas client, and how a requests exception or an HTTP error reply becomes one.

Every failure is a `ClientError` subclass whose message says what happened and what to do, for the user to read;
callers chain the original exception as `__cause__`. Import these from `client`, which re-exports them.
"""

from __future__ import annotations

import email.utils
import math
import socket
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NameResolutionError, ReadTimeoutError

from . import protocol as p

class ClientError(Exception):
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
    except p.ProtocolError:
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
