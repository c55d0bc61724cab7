"""``radq flower`` watches the same broker as the workers, behind basic auth from settings, and
sees their tasks: workers send task events only while Flower asks for them."""

from __future__ import annotations

import json
import time

import httpx

from radq.services import free_port, spawn, stop
from radq.tasks import INFER_CHUNK
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done


def test_flower_takes_auth_from_settings_lists_the_worker_and_keeps_state(stack: Stack) -> None:
    port = free_port()
    home = stack.settings.home
    db = home / "flower-state" / "flower.db"
    env = {
        **stack.settings.to_env(),
        "RADQ_FLOWER_BASIC_AUTH": "ops:secret",
        "RADQ_FLOWER_DB": str(db),
        "RADQ_LOG_FORMAT": "json",
    }
    log_file = home / "flower.log"
    flower = spawn(["flower", "--port", str(port)], env=env, log_file=log_file)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        workers: dict[str, object] = {}
        unauthenticated = wrong_password = None
        while time.monotonic() < deadline and not any(w.startswith("test-") for w in workers):
            try:
                unauthenticated = httpx.get(f"{url}/api/workers", timeout=5).status_code
                wrong_password = httpx.get(f"{url}/api/workers", auth=("ops", "nope"), timeout=5).status_code
                response = httpx.get(f"{url}/api/workers?refresh=1", auth=("ops", "secret"), timeout=15)
                if response.status_code == 200:
                    workers = response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert unauthenticated == 401 and wrong_password == 401, (unauthenticated, wrong_password)
        assert any(w.startswith("test-") for w in workers), workers
        # Flower turns the workers' task events on (every 5 s): a job run now shows up as a task.
        tasks: dict[str, dict[str, object]] = {}
        while time.monotonic() < deadline + 30 and not tasks:
            job = stack.client.upload([SAMPLES / "real" / "CT_small.dcm"], force=True)
            wait_done(stack.client, job["id"])
            time.sleep(1.0)
            response = httpx.get(f"{url}/api/tasks", params={"taskname": INFER_CHUNK}, auth=("ops", "secret"))
            tasks = {k: t for k, t in response.json().items() if t.get("state") == "SUCCESS"}
        assert tasks, "Flower saw no finished task of the worker"
        # Flower's state file (persistent mode) is opened at start under RADQ_FLOWER_DB.
        assert list(db.parent.glob("flower.db*")), f"no state file under {db.parent}"
    finally:
        stop(flower)
    saved = list(db.parent.glob("flower.db*"))
    assert saved and any(p.stat().st_size > 0 for p in saved), saved
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    assert lines, "flower logged nothing"
    for line in lines:
        record = json.loads(line)  # RADQ_LOG_FORMAT=json: one object per line
        assert {"time", "level", "logger", "message"} <= set(record), record
