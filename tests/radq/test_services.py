"""radq.services: the Redis that radq starts (demo, bench, tests) stops with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from radq.services import ensure_redis, free_port, redis_answers, stop


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_redis_radq_started_is_gone_after_stop(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    server = ensure_redis(url, tmp_path / "redis")
    assert server is not None and redis_answers(url)
    stop(server)
    assert server.poll() is not None and not redis_answers(url)  # not left running, orphaned
