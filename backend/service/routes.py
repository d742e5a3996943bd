"""The HTTP routes (protocol.py names them). Handlers validate, queue work for the engine thread and wait for it;
they never call the model themselves."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from backend.prompts import check_question
from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.validation import Schema
from SlicerMiniGPTPancreas.wire_arrays import int16_array, parse_scan_params, parse_volume_params

from .bodies import (
    MAX_SMALL_JSON_BYTES, check_declared_length, drain, read_exactly, read_message, require_content_type,
)
from .engine_calls import chat_response, check_greedy, check_temperature, query_response
from .errors import ApiError, ClientGone, busy, shortened
from .jobs import SweepJob
from .security import check_client_version, require_token
from .volumes import model_view_of_scan
from .state import Service

log = logging.getLogger(__name__)

_JSON = {"application/json": {}}
_OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description + ' (body {"error": {"code", "message"}})'}
    for status, description in ((401, "missing or wrong access token"), (409, "incompatible client API version"),
                                (413, "body too large"), (422, "invalid request"),
                                (503, "busy, loading, or the model failed to load (model_unavailable)"))}

health_router = APIRouter(dependencies=[Depends(require_token)])
# The token first: a client without it learns nothing else (not even whether its version would fit).
api_router = APIRouter(dependencies=[Depends(require_token), Depends(check_client_version)], responses=_ERRORS)


def _service(request: Request) -> Service:
    return request.app.state.service


def _reply(message: Schema, status: int = 200) -> JSONResponse:
    return JSONResponse(message.to_dict(), status_code=status)


@health_router.get(p.ROUTE_HEALTH, summary="Server status and API version; never waits for the model")
def health(request: Request) -> JSONResponse:
    service = _service(request)
    engine = service.worker.engine
    state = service.worker.state
    return _reply(p.Health(status=state, api_version=p.API_VERSION,
                           model_id=engine.model_id if engine is not None else "",
                           device=engine.device if engine is not None else service.device_hint,
                           busy=service.worker.busy,
                           message=shortened(service.worker.load_error) if state == "error" else None))


@api_router.get(p.ROUTE_INFO, summary="The model, its tasks and prompts, its device and the server's limits")
def info(request: Request) -> JSONResponse:
    service = _service(request)
    engine = service.ready_engine()
    return _reply(p.ModelInfo(
        model_id=engine.model_id, api_version=p.API_VERSION, server_version=service.server_version,
        device=engine.device, precision=engine.precision, image_size=engine.image_size,
        max_new_tokens_limit=p.MAX_NEW_TOKENS_LIMIT, max_upload_bytes=service.limits.max_upload_bytes,
        example_prompts=service.example_prompts, synthetic=engine.synthetic, tasks=service.tasks))


@api_router.post(p.ROUTE_QUERY, summary="Ask one question about one slice",
                 openapi_extra={"requestBody": {"required": True, "content": _JSON,
                                                "description": "SliceQueryRequest (protocol.py)"}})
async def query(request: Request) -> JSONResponse:
    service = _service(request)
    service.worker.check_room()  # a full queue is refused before the body is read
    message = await read_message(request, p.SliceQueryRequest, service.bodies)
    check_greedy(message.options, "slice queries")
    future = service.worker.submit(
        lambda engine: service.engine_calls.run(engine, [message.slice_hu], message.prompt, message.options)[0])
    timed = await _wait(service, request, future)
    return _reply(query_response(timed.value, service.worker.engine.model_id, slice_index=message.slice_index,
                                 queue_ms=timed.queue_ms))


@api_router.post(p.ROUTE_CHAT, summary="One chat turn about one slice",
                 openapi_extra={"requestBody": {"required": True, "content": _JSON,
                                                "description": "ChatRequest (protocol.py)"}})
async def chat(request: Request) -> JSONResponse:
    service = _service(request)
    service.worker.check_room()
    message = await read_message(request, p.ChatRequest, service.bodies)
    check_temperature(message.options)
    future = service.worker.submit(lambda engine: service.engine_calls.chat(engine, message))
    timed = await _wait(service, request, future)
    return _reply(chat_response(timed.value, service.worker.engine.model_id))


@api_router.post(p.ROUTE_VOLUMES, status_code=201,
                 summary="Upload a volume as raw little-endian int16 for sweeps: the model view [S, R, C], or as "
                         "stored [K, J, I] with its ijk_to_ras",
                 openapi_extra={"requestBody": {"required": True, "content": _OCTETS}, "parameters": [
                     {"name": name, "in": "query", "required": required, "schema": {"type": "string"},
                      "description": text} for name, required, text in (
                         ("shape", True, "S,R,C (K,J,I with ijk_to_ras)"), ("dtype", True, "int16"),
                         ("spacing_mm", False, "col,row,slice spacing in mm (without ijk_to_ras)"),
                         ("ijk_to_ras", False, "16 numbers, row by row: the body is the volume as stored"),
                         ("resample", False, "true: resample a tilted volume onto the nearest axial grid"))]})
async def upload_volume(request: Request) -> JSONResponse:
    service = _service(request)
    require_content_type(request, "application/octet-stream")
    shape, spacing, n_bytes = parse_volume_params(request.query_params)  # ProtocolError -> 422
    ijk_to_ras, resample = parse_scan_params(request.query_params)
    await check_declared_length(request, n_bytes, service.limits.max_upload_bytes)
    try:
        reservation = service.volumes.reserve(n_bytes)
    except ApiError:
        await drain(request.stream())  # so that the client hears why instead of a connection reset
        raise
    with reservation:
        array = int16_array(await read_exactly(request, n_bytes), shape)
        array.flags.writeable = False
        resampled = False
        if ijk_to_ras is not None:  # sent as stored: the model view (resampled when tilted and asked) is made here
            array, spacing, resampled = await asyncio.to_thread(model_view_of_scan, array, ijk_to_ras, resample)
        volume = service.volumes.add(array, spacing, reserved=True)
    return _reply(p.VolumeUploadResponse(volume.volume_id, array.shape, spacing, resampled), status=201)


@api_router.post(p.ROUTE_SWEEPS, status_code=202,
                 summary="Start asking one prompt on a range of slices of an uploaded volume",
                 openapi_extra={"requestBody": {"required": True, "content": _JSON,
                                                "description": "SweepJobRequest (protocol.py)"}})
async def start_sweep(request: Request) -> JSONResponse:
    service = _service(request)
    message = await read_message(request, p.SweepJobRequest, service.bodies, MAX_SMALL_JSON_BYTES)
    check_greedy(message.options, "sweeps")
    check_question(message.prompt, "SweepJobRequest.prompt")  # a PromptError: refused before it is queued
    volume = service.volumes.get(message.volume_id)
    slices = volume.array.shape[0]
    stop = slices if message.slice_stop is None else message.slice_stop
    if message.slice_start >= slices or stop > slices:
        raise ApiError(p.ErrorCode.VALIDATION, f"slices {message.slice_start} to {stop} (exclusive) are outside "
                                               f"volume '{volume.volume_id}', which has {slices} slices (0 to "
                                               f"{slices - 1})")
    engine = service.ready_engine()
    job = SweepJob(volume, range(message.slice_start, stop, message.step), engine.batch_size,
                   lambda engine, batch: service.engine_calls.run(engine, batch, message.prompt, message.options))
    service.worker.add_sweep(job)
    service.jobs.add(job)
    return _reply(job.status(), status=202)


@api_router.get(p.ROUTE_SWEEP, summary="A sweep's state, progress and answers so far")
def sweep_status(request: Request, job_id: str) -> JSONResponse:
    return _reply(_service(request).jobs.get(job_id).status())


@api_router.delete(p.ROUTE_SWEEP, summary="Cancel a sweep (its answers so far stay)")
def cancel_sweep(request: Request, job_id: str) -> JSONResponse:
    job = _service(request).jobs.get(job_id)
    job.cancel()
    return _reply(job.status())


async def _wait(service: Service, request: Request, future: Future) -> Any:
    """The task's Timed result. A task whose client leaves, or that waits longer than the query timeout (503), is
    dropped if it has not started yet (a running engine call cannot be stopped; its answer is discarded)."""
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((answer, gone), timeout=service.limits.query_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():
        answer.cancel()  # also cancels the task if the engine has not started it
        if gone.done() and not gone.cancelled():
            raise ClientGone()
        raise busy(f"no answer within {service.limits.query_timeout_s:g} s: the model is busy with other "
                   "requests", 30)
    return answer.result()  # a UserError (input the engine refuses) is answered 422, anything else 500


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is the close)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
