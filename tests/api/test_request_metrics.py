"""Requests are counted with the status the client got, a failing app's included."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import Message, Receive, Scope, Send

from api.app import LimitsAndMetrics


def _metrics() -> SimpleNamespace:
    registry = CollectorRegistry()
    return SimpleNamespace(
        registry=registry,
        requests=Counter("radq_http_requests", "", ["method", "route", "status"], registry=registry),
        latency=Histogram("radq_http_request_seconds", "", ["method", "route"], registry=registry),
    )


async def _failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


def _call(middleware: LimitsAndMetrics, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_a_request_the_app_fails_is_counted_as_500() -> None:
    metrics = _metrics()
    with pytest.raises(RuntimeError):  # Starlette's outer error middleware answers it
        _call(LimitsAndMetrics(_failing_app, max_body_bytes=10, metrics=metrics), [])  # type: ignore[arg-type]
    labels = {"method": "POST", "route": "unmatched", "status": "500"}
    assert metrics.registry.get_sample_value("radq_http_requests_total", labels) == 1.0


def test_a_body_declared_over_the_limit_is_refused_before_the_app_runs() -> None:
    metrics = _metrics()
    middleware = LimitsAndMetrics(_failing_app, max_body_bytes=10, metrics=metrics)  # type: ignore[arg-type]
    sent = _call(middleware, [(b"content-length", b"11")])
    assert sent[0]["status"] == 413
    assert b"RADQ_MAX_UPLOAD_BYTES" in sent[1]["body"]
