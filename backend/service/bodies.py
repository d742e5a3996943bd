"""Reading request bodies within limits, and turning them into protocol messages (clear 4xx for bad input).

Bodies are read by hand rather than by FastAPI's pydantic models: the protocol's own `from_dict` validates every
message (one validator for client and server), and a size limit must stop a body before it is held in memory.
A body found too large is drained (up to DRAIN_LIMIT_BYTES) before the 413 is sent: a server that answers and
closes while the client is still sending makes the client see a connection reset instead of the 413.

Memory is committed only after what can be checked without the body was: a volume upload's shape comes from the
query string, so its size, the server's capacity and the Content-Length are checked first and the bytes then land
in one array of exactly that size; a query's queue room is checked before its body is read (routes); and at most
`BodySlots.limit` JSON bodies are read or parsed at once, the rest wait unread.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.validation import ProtocolError, SchemaT
from SlicerMiniGPTPancreas.wire_arrays import MAX_SLICE_SIDE

from .errors import ApiError

DRAIN_LIMIT_BYTES = 64 << 20
# A slice query carries the largest slice as base64, plus the prompt and options; a chat adds its messages.
MAX_JSON_BYTES = 4 * math.ceil(MAX_SLICE_SIDE ** 2 * 2 / 3) + p.MAX_CHAT_MESSAGES * p.MAX_PROMPT_CHARS * 6 + 65536
MAX_SMALL_JSON_BYTES = 65536  # sweep requests


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("Content-Length")
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(p.ErrorCode.BAD_REQUEST, f"the Content-Length header {value!r} is not a byte count")
    return int(value)


class BodySlots:
    """At most `limit` JSON bodies read or parsed at once (each may take tens of MiB); the others wait their turn
    before a byte of theirs is read (TCP flow control then holds the client back at no cost to the server)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        async with self._semaphore:
            yield


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop what the client still sends (up to DRAIN_LIMIT_BYTES), so that it hears the error reply.
    `chunks` is `request.stream()`, or the stream a reader has begun: Starlette opens a body's stream once, and a
    chunked body that overflows in its last chunk has already been read to its end."""
    drained = 0
    async for chunk in chunks:
        drained += len(chunk)
        if drained > DRAIN_LIMIT_BYTES:
            break


async def _too_large(chunks: AsyncIterator[bytes], size: str, limit: int) -> ApiError:
    await drain(chunks)
    return ApiError(p.ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the request body has {size} bytes, more than this endpoint's limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole body, refused with 413 above `limit` bytes (checked on Content-Length first, then as it streams)."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise await _too_large(request.stream(), str(declared), limit)
    body = bytearray()
    chunks = request.stream()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise await _too_large(chunks, f"more than {limit}", limit)
    return body


async def read_exactly(request: Request, n_bytes: int) -> np.ndarray:
    """A body of exactly `n_bytes` (Content-Length, if given, was checked) into one uint8 array of that size."""
    buffer = np.empty(n_bytes, np.uint8)
    received = 0
    chunks = request.stream()
    async for chunk in chunks:
        if received + len(chunk) > n_bytes:
            await drain(chunks)
            raise ApiError(p.ErrorCode.VALIDATION, f"body: has more than the {n_bytes} bytes the shape needs")
        buffer[received:received + len(chunk)] = np.frombuffer(chunk, np.uint8)
        received += len(chunk)
    if received != n_bytes:
        raise ApiError(p.ErrorCode.VALIDATION, f"body: has {received} bytes but the shape needs {n_bytes}")
    return buffer


async def check_declared_length(request: Request, n_bytes: int, limit: int) -> None:
    """Before reading: 413 above `limit`, 422 when Content-Length differs from the `n_bytes` the shape needs."""
    if n_bytes > limit:
        raise await _too_large(request.stream(), str(n_bytes), limit)
    declared = _declared_length(request)
    if declared is not None and declared != n_bytes:
        await drain(request.stream())
        raise ApiError(p.ErrorCode.VALIDATION, f"body: Content-Length is {declared} but the shape needs {n_bytes} "
                                               "bytes")


def require_content_type(request: Request, expected: str) -> None:
    """415 unless the body is declared as `expected` (parameters such as charset are fine)."""
    given = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if given != expected:
        raise ApiError(p.ErrorCode.UNSUPPORTED_MEDIA,
                       f"expected a body of Content-Type {expected}, got {given or 'none'}")


async def read_message(request: Request, schema: type[SchemaT], slots: BodySlots,
                       limit: int = MAX_JSON_BYTES) -> SchemaT:
    """A JSON body as the protocol message `schema`: 413 too large, 415 not JSON, 422 malformed or invalid; read
    when one of `slots` is free."""
    require_content_type(request, "application/json")
    async with slots.take():
        body = await read_body(request, limit)
        # Decoding a slice of up to 4096 x 4096 takes a while: keep it off the event loop (health stays quick).
        return await run_in_threadpool(parse_message, bytes(body), schema)


def parse_message(body: bytes, schema: type[SchemaT]) -> SchemaT:
    try:
        data: Any = json.loads(body)
    except RecursionError:
        raise ApiError(p.ErrorCode.VALIDATION, "the body is not valid JSON: it is nested too deeply") from None
    except ValueError as error:  # not JSON, not UTF-8, or an integer beyond Python's digit limit
        raise ApiError(p.ErrorCode.VALIDATION, f"the body is not valid JSON ({error})") from None
    try:
        return schema.from_dict(data)  # type: ignore[attr-defined]
    except ProtocolError as error:
        raise ApiError(p.ErrorCode.VALIDATION, str(error)) from error
    except RecursionError:
        raise ApiError(p.ErrorCode.VALIDATION, f"{schema.__name__}: a value is nested too deeply") from None
