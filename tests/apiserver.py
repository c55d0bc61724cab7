"""The real API under uvicorn in a thread of the test process, on a free port."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from api.app import create_app
from db.status import Scope
from db.tokens import issue_token
from radq.services import free_port
from radq.settings import Settings


def bearer(database_url: str, scope: Scope = Scope.ADMIN) -> dict[str, str]:
    """Headers carrying a new token of ``scope``, created in the database at ``database_url``."""
    token = issue_token(database_url, name=f"test-{uuid.uuid4().hex[:10]}", scope=scope)
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def serve(settings: Settings) -> Iterator[httpx.Client]:
    """Serve ``create_app(settings)`` until the block ends (lifespan included).

    The client sends an admin token when ``settings.auth`` is on (the database must be migrated).
    """
    headers = bearer(settings.resolved_database_url) if settings.auth else None
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)
