"""A job's webhook is called with its summary when it ends, retried, and every try recorded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from db.models import WebhookDelivery
from radq.services import free_port
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done


class Receiver:
    """A local HTTP endpoint that fails its first ``failures`` requests with 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[dict[str, object]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(503)
                else:
                    receiver.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=1)
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()


def test_webhook_called_once_the_job_ends_after_a_retry(stack: Stack, receiver: Receiver) -> None:
    job = stack.client.upload([SAMPLES / "real" / "CT_small.dcm"])
    assert job["webhook_url"] is None
    response = stack.client.http.post(
        "/v1/jobs",
        files=[("files", ("ct.dcm", (SAMPLES / "real" / "CT_small.dcm").read_bytes()))],
        data={"webhook_url": receiver.url},
    )
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"])
    deadline = time.monotonic() + 30
    while not receiver.bodies and time.monotonic() < deadline:
        time.sleep(0.2)
    (summary,) = receiver.bodies
    assert summary["id"] == job["id"] and summary["status"] == "done"
    assert summary["counts"]["done"] == 1  # type: ignore[index]
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])
    query = query.order_by(WebhookDelivery.attempt)
    deadline = time.monotonic() + 30
    while True:  # the receiver answers before the worker records the delivery
        with stack.sessions() as session:
            tries = [(t.attempt, t.status_code, t.delivered) for t in session.scalars(query)]
        if len(tries) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert tries == [(1, 503, False), (2, 204, True)]


def test_bad_webhook_url_is_refused(stack: Stack) -> None:
    response = stack.client.http.post("/v1/jobs", json={"paths": ["/x"], "webhook_url": "ftp://example"})
    assert response.status_code == 400 and "webhook_url" in response.json()["detail"]
