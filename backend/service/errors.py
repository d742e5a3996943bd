"""The service's error replies: every non-2xx answer has the protocol's body {"error": {"code", "message"}}.

Handlers raise `ApiError`; `install_error_handlers` turns it, a UserError (a protocol error, input the engine
refuses: 422), FastAPI's own HTTP errors (unknown route, wrong method) and unexpected exceptions (500) into that
body, so the client can map each one to a message a radiologist can act on (client.http_error). Messages are cut
to MAX_MESSAGE_CHARS, whatever client input they quote. Each failure is logged once, on one line, without the query string: a client that leaves
mid-request at INFO, an unexpected exception at ERROR with its traceback and a request id that its 500 names too.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.validation import excerpt

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 1000
REQUEST_ID_HEADER = "X-Request-ID"  # on a 500: the id its log entry names


class ApiError(Exception):
    """An error reply: `code` decides the HTTP status unless `status` overrides it; `headers` go on the reply."""

    def __init__(self, code: p.ErrorCode, message: str, *, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = code.http_status if status is None else status
        self.headers = dict(headers or {})


def busy(message: str, retry_after_s: int) -> ApiError:
    """503 with a Retry-After header (whole seconds, as RFC 9110 requires)."""
    return ApiError(p.ErrorCode.BUSY, message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; there is no one to answer."""


def shortened(message: str) -> str:
    """At most MAX_MESSAGE_CHARS: what a reply quotes (client input, a model's load error) stays readable."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


def error_reply(error: ApiError) -> JSONResponse:
    body = p.ErrorResponse(error.code, shortened(error.message)).to_dict()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through `error_reply`."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_reply(error)

    @app.exception_handler(UserError)  # a ProtocolError, or input the engine refuses: the client's to fix
    async def _user_error(_: Request, error: UserError) -> JSONResponse:
        return error_reply(ApiError(p.ErrorCode.VALIDATION, str(error)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg')}"
                             for item in error.errors())
        return error_reply(ApiError(p.ErrorCode.VALIDATION, problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_reply(_from_http_exception(request, error))

    app.add_middleware(LastResort)


class LastResort:
    """Outermost handler (inside Starlette's own): a client gone is one INFO line, any other exception one ERROR
    entry with its traceback and a 500 with the error body. (An `exception_handler(Exception)` would be logged
    twice: Starlette re-raises after calling it, and uvicorn logs it again.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        what = f"{scope.get('method')} {scope.get('path')}"
        try:
            await self.app(scope, receive, send)
        except (ClientDisconnect, ClientGone):
            log.info("the client closed the connection during %s; nothing was answered", what)
        except Exception as error:  # noqa: BLE001 - the last resort: a server fault, answered and logged once
            request_id = secrets.token_hex(6)  # ties the reply the user reports to the log entry with the traceback
            log.exception("unexpected error in %s (request id %s)", what, request_id)
            message = (f"internal error ({type(error).__name__}), request id {request_id}; the server log has the "
                       "details under that id")
            reply = error_reply(ApiError(p.ErrorCode.INTERNAL, message, headers={REQUEST_ID_HEADER: request_id}))
            try:
                await reply(scope, receive, send)
            except Exception:  # noqa: BLE001 - the answer had already started, or the client is gone
                pass


def _from_http_exception(request: Request, error: StarletteHTTPException) -> ApiError:
    what = f"{request.method} {excerpt(request.url.path)}"
    if error.status_code == 404:
        # Not "not_found": that code means an unknown volume or job id; an unknown route is a wrong URL or an older
        # server, and the client tells those apart by the code.
        return ApiError(p.ErrorCode.BAD_REQUEST, f"there is no endpoint {what} on this server (API "
                                                 f"{p.API_VERSION}); the routes are listed at /docs", status=404)
    if error.status_code == 405:
        return ApiError(p.ErrorCode.BAD_REQUEST, f"{what}: method not allowed on this endpoint", status=405,
                        headers=error.headers)
    code = next((code for code in p.ErrorCode if code.http_status == error.status_code), p.ErrorCode.BAD_REQUEST)
    return ApiError(code, f"{what}: {error.detail}", status=error.status_code, headers=error.headers)
