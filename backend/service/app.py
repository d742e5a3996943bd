"""`create_app`: the FastAPI application around one inference engine (or a function that loads it).

The app's lifespan starts the engine thread and, on shutdown, cancels the sweeps, fails the requests still
waiting and stops the thread. Run it with `server.make_server` (`minigpt-pancreas serve` does, on 127.0.0.1:8765 by
default): its shutdown first lets the service answer every waiting request within the grace period.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backend import prompts
from backend.engine import InferenceEngine
from SlicerMiniGPTPancreas import protocol as p

from .errors import ApiError, busy, error_reply, install_error_handlers
from .engine_calls import EngineCalls
from .routes import api_router, health_router
from .security import BearerAuth, check_token
from .state import Service, ServiceLimits
from .worker import EngineWorker, QueueFullError, WorkerUnavailableError

# What /api/v1/info offers: the tasks of MiniGPT-Pancreas's cascade (named as training/configs/cascade.json names
# its stages), each asked with upstream's evaluation prompt. Multi-organ's fourth organ, the pancreas, is asked by
# pancreas detection's prompt.
TASKS = (
    p.TaskInfo("pancreas_detection", "Pancreas detection", "boxes",
               (prompts.refer_eval_instruction(prompts.PANCREAS_PHRASE),)),
    p.TaskInfo("tumor_classification", "Pancreatic tumour yes/no", "yes_no", (prompts.TC_EVAL_PROMPT,)),
    p.TaskInfo("tumor_detection", "Pancreatic tumour detection", "boxes",
               (prompts.refer_eval_instruction(prompts.TUMOR_PHRASE),)),
    p.TaskInfo("multi_organ", "Liver, kidney and spleen detection", "boxes",
               tuple(prompts.refer_eval_instruction(organ) for organ in prompts.ABD_ORGANS
                     if organ != prompts.PANCREAS_PHRASE)),
)
DESCRIPTION = (
    "MiniGPT-Pancreas answers questions about axial CT slices with text, yes/no and bounding boxes. Slices and "
    "volumes are model-view int16 HU arrays (see SlicerMiniGPTPancreas/protocol.py); every error reply has the body "
    '{"error": {"code", "message"}}. Send the header ' + p.API_VERSION_HEADER + " with the client's API version "
    "and, when the server has a token, 'Authorization: Bearer <token>'."
)


def create_app(engine: InferenceEngine | None = None, *, load_engine: Callable[[], InferenceEngine] | None = None,
               token: str | None = None, limits: ServiceLimits = ServiceLimits(), constrain_boxes: bool = False,
               device_hint: str = "unknown") -> FastAPI:
    """The service around `engine`, or around the engine `load_engine()` builds on the engine thread (the server
    answers /healthz with status "loading" meanwhile, and "error" if it fails).

    token: required as 'Authorization: Bearer <token>' on every route but the docs (None: no token, for loopback).
    constrain_boxes: detection prompts ("[refer] ...") may only be answered with one box (EngineCalls).
    device_hint: the device /healthz names while loading.
    """
    worker = EngineWorker(engine, load_engine=load_engine, max_queue=limits.max_queue,
                          max_sweeps=limits.max_sweeps)
    service = Service(worker, BearerAuth(check_token(token)), limits, EngineCalls(constrain_boxes),
                      device_hint=device_hint, tasks=TASKS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            service.jobs.cancel_all("the server shut down")
            worker.stop()
            service.volumes.clear()

    app = FastAPI(title="MiniGPT-Pancreas", version=service.server_version, description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    _install_worker_error_handlers(app, service)
    app.include_router(health_router)
    app.include_router(api_router)
    return app


def _install_worker_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, error: QueueFullError) -> JSONResponse:
        return error_reply(busy(f"the server is busy: {error}", error.retry_after_s))

    @app.exception_handler(WorkerUnavailableError)
    async def _unavailable(_: Request, error: WorkerUnavailableError) -> JSONResponse:
        if service.worker.state == "error":  # the server's model, not the request: 503, the message says why
            return error_reply(ApiError(p.ErrorCode.MODEL_UNAVAILABLE, str(error)))
        if error.retry_after_s is None:
            return error_reply(ApiError(p.ErrorCode.BUSY, str(error)))
        return error_reply(busy(str(error), error.retry_after_s))
