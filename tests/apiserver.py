"""The real API under uvicorn in a thread of the test process, on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from api.app import create_app
from radq.services import free_port
from radq.settings import Settings


@contextmanager
def serve(settings: Settings) -> Iterator[httpx.Client]:
    """Serve ``create_app(settings)`` until the block ends (lifespan included)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)
