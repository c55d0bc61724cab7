"""``radq flower`` watches the same broker as the workers and lists them."""

from __future__ import annotations

import time

import httpx

from radq.services import free_port, spawn, stop
from tests.conftest import Stack


def test_flower_lists_the_running_worker(stack: Stack) -> None:
    port = free_port()
    flower = spawn(
        ["flower", "--port", str(port), "--basic-auth", "ops:secret"],
        env=stack.settings.to_env(),
        log_file=stack.settings.home / "flower.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        workers: dict[str, object] = {}
        while time.monotonic() < deadline and not any(w.startswith("test-") for w in workers):
            try:
                assert httpx.get(f"{url}/api/workers", timeout=5).status_code == 401  # auth required
                response = httpx.get(
                    f"{url}/api/workers?refresh=1", auth=("ops", "secret"), timeout=15
                )
                if response.status_code == 200:
                    workers = response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert any(w.startswith("test-") for w in workers), workers
    finally:
        stop(flower)
