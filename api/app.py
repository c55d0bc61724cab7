"""The FastAPI application, built from settings by :func:`create_app`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import radq
from api.deps import default_scope
from api.maintenance import Maintenance
from api.metrics import Metrics
from api.multipart import remove_stale_spools
from api.registration import Registrar
from api.routes import audit, dicomweb, health, jobs, studies
from api.schemas import ErrorOut
from api.state import AppState
from radq.errors import LimitExceeded, PathNotAllowed, StorageFull, SubmissionError, TransientError
from radq.settings import Settings

log = logging.getLogger(__name__)

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""Methods a 405's ``Allow`` may name."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LimitExceeded)
    async def _limit(_: Request, exc: LimitExceeded) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(PathNotAllowed)
    async def _forbidden(_: Request, exc: PathNotAllowed) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(SubmissionError)
    async def _bad_submission(_: Request, exc: SubmissionError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StorageFull)
    async def _no_room(_: Request, exc: StorageFull) -> JSONResponse:
        log.error("%s", exc)
        return _error(
            507, f"{exc}; nothing from this request was kept: send it again once the server has room",
            {"Retry-After": "300"},
        )  # fmt: skip

    @app.exception_handler(TransientError)
    async def _transient(_: Request, exc: TransientError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "30"})

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unreachable: %s", exc.orig)
        return _error(503, "the database is unreachable; try again shortly", {"Retry-After": "30"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error(422, f"invalid {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return _error(exc.status_code, str(exc.detail), headers)


def _allowed_methods(request: Request) -> str:
    """The methods served at the request's path, for the ``Allow`` header of a 405.

    Starlette's 405 names only the methods of the first route matching the path, so
    ``PUT /v1/jobs`` would answer ``Allow: POST`` although ``GET /v1/jobs`` exists too;
    each method is asked of the router instead.
    """
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


class LimitsAndMetrics:
    """Refuses a body declared over ``RADQ_MAX_UPLOAD_BYTES``; counts and times every request.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    the app in a task of its own and streams each response through a memory channel, for
    every request.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            too_big = _error(
                413,
                f"request body of {length.decode()} bytes is over the limit of {self.max_body_bytes} "
                "bytes (RADQ_MAX_UPLOAD_BYTES)",
            )
            await too_big(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router notes the matched route in the scope it was given (this one).
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


def create_app(settings: Settings) -> FastAPI:
    """Build the API. Engines and the broker producer are created here, not at import."""
    state = AppState.build(settings)
    engine = state.engine
    if not settings.auth:
        log.warning("RADQ_AUTH is false: every request is served without a token, as 'anonymous' admin")

    registrar = Registrar(state)
    maintenance = Maintenance(state, registrar)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        removed = await run_in_threadpool(remove_stale_spools, state.blobs.spool_dir)
        if removed:
            log.warning("removed %d request spool(s) left by an API process that died mid-upload", removed)
        maintenance.start()
        yield
        await run_in_threadpool(maintenance.stop)
        await run_in_threadpool(registrar.stop)
        engine.dispose()

    app = FastAPI(
        title="radq",
        version=radq.__version__,
        description="Bulk CNN inference over DICOM archives.",
        lifespan=lifespan,
    )
    app.state.radq = state
    app.state.registrar = registrar
    app.state.metrics = metrics = Metrics(state)
    _install_error_handlers(app)

    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_upload_bytes, metrics=metrics)

    # Every route but /healthz and /metrics needs a token (RADQ_AUTH): reading 'read',
    # anything else 'submit' at least; routes name a higher scope themselves.
    guarded: dict[str, Any] = {
        "dependencies": [Depends(default_scope)],
        "responses": {
            401: {"model": ErrorOut, "description": "No token, or an unknown or revoked one"},
            403: {"model": ErrorOut, "description": "The token's scope is not enough (or a path refused)"},
        },
    }
    app.include_router(jobs.router, **guarded)
    app.include_router(studies.router, **guarded)
    app.include_router(audit.router, **guarded)
    app.include_router(dicomweb.router, **guarded)
    app.include_router(health.router)
    return app
