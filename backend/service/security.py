"""Who may talk to the service: the bearer token, the client's API version, and which addresses need a token.

Bound to loopback (127.0.0.1, the default) the service serves only this computer and needs no token; bound beyond
it, a token is required. Tokens are compared in constant time (hmac.compare_digest) and never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from fastapi import Request

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.validation import ProtocolError

from .errors import ApiError

TOKEN_ENV = "MINIGPT_PANCREAS_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost",)
MAKE_TOKEN_HINT = "make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\""


class ServeSettingsError(UserError, ValueError):
    """A host / token combination the service refuses to start with; the message says what to do."""


def is_loopback(host: str) -> bool:
    """True for addresses only this computer can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def resolve_token(cli_token: str | None) -> str | None:
    """The token from --token, else from $MINIGPT_PANCREAS_TOKEN; blank means none."""
    token = cli_token if cli_token is not None else os.environ.get(TOKEN_ENV, "")
    return token.strip() or None


def check_token(token: str | None) -> str | None:
    """Refuse tokens a client cannot send (spaces, control characters) or that are easy to guess."""
    if token is None:
        return None
    if any(char.isspace() or not char.isprintable() for char in token):
        raise ServeSettingsError("the access token must be one word of printable characters (no spaces)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ServeSettingsError(f"the access token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, "
                                 f"{MAKE_TOKEN_HINT}")
    return token


def check_bind(host: str, token: str | None) -> None:
    """A host beyond loopback exposes CT data and the GPU to the network: refuse it without a token."""
    if token is None and not is_loopback(host):
        raise ServeSettingsError(
            f"--host {host} makes the server reachable from other computers, so it needs an access token: pass "
            f"--token or set ${TOKEN_ENV} ({MAKE_TOKEN_HINT}), or keep the default --host 127.0.0.1")


class BearerAuth:
    """Checks `Authorization: Bearer <token>` when a token is set; lets everything through when none is."""

    def __init__(self, token: str | None) -> None:
        self._token = None if token is None else token.encode("utf-8")

    def __repr__(self) -> str:
        return f"BearerAuth(token={'set' if self._token else 'none'})"

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="minigpt-pancreas"'}
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(p.ErrorCode.UNAUTHORIZED, "this server requires an access token: send the header "
                                                     "'Authorization: Bearer <token>'", headers=challenge)
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._token):
            raise ApiError(p.ErrorCode.UNAUTHORIZED, "the access token is wrong", headers=challenge)


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the service's token (if it has one)."""
    request.app.state.service.auth.check(request.headers.get("Authorization"))


def check_client_version(request: Request) -> None:
    """FastAPI dependency: 409 when the client's API major differs from ours (no header: curl, a browser: fine)."""
    client_version = request.headers.get(p.API_VERSION_HEADER)
    if client_version is None:
        return
    try:
        p.check_api_version(p.API_VERSION, client_version)
    except p.ApiVersionError as error:
        raise ApiError(p.ErrorCode.VERSION_MISMATCH, error.problem) from error
    except ProtocolError as error:
        raise ApiError(p.ErrorCode.BAD_REQUEST, f"header {p.API_VERSION_HEADER}: {error.problem}") from error
