"""With the broker unreachable the API says so (503), loses nothing it accepted, and
queues it by itself once the broker is back."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Instance
from db.session import make_engine
from db.status import InstanceStatus
from radq.routing import model_queue
from radq.services import ensure_redis, free_port, stop
from tests.api.test_registration import queued_instance_ids
from tests.apiserver import serve
from tests.conftest import SAMPLES, make_settings

DEAD_BROKER = "redis://127.0.0.1:9/0"  # discard port: nothing listens


def test_health_names_the_broker_and_submission_keeps_the_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, DEAD_BROKER)
    with serve(settings) as http:
        start = time.monotonic()
        health = http.get("/healthz")
        assert time.monotonic() - start < 15
        assert health.status_code == 503
        assert health.json()["database"] == "ok"
        assert health.json()["broker"].startswith("unreachable")

        ct = (SAMPLES / "real" / "CT_small.dcm").read_bytes()
        response = http.post("/v1/jobs", files=[("files", ("ct.dcm", ct))])
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    detail = response.json()["detail"]
    assert "recorded but could not be queued" in detail
    job_id = detail.split()[1]

    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.status).where(Instance.job_id == job_id)).scalars().all()
    engine.dispose()
    assert rows == [InstanceStatus.PENDING]  # recorded, waiting to be queued again


def test_work_recorded_while_the_broker_was_down_is_queued_when_it_returns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    broker = f"redis://127.0.0.1:{free_port()}/0"  # no Redis there yet
    settings = make_settings(tmp_path, url, broker, maintenance_seconds=0.5, requeue_after_seconds=1.0)
    folder = settings.allowed_roots[0] / "study"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes((SAMPLES / "real" / name).read_bytes())
    with serve(settings) as http:
        upload = http.post("/v1/jobs", files=[("files", ("ct.dcm", (folder / "CT_small.dcm").read_bytes()))])
        assert upload.status_code == 503 and "queued automatically" in upload.json()["detail"]
        paths = http.post("/v1/jobs", json={"paths": [str(folder)]})
        assert paths.status_code == 202  # the walk records; publishing waits for the broker
        deadline = time.monotonic() + 30
        while (job := http.get(f"/v1/jobs/{paths.json()['id']}").json())["registration"]["status"] != "done":
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["counts"]["pending"] == 2 and job["counts"]["queued"] == 0

        server = ensure_redis(broker, tmp_path / "redis")  # the broker comes back
        assert server is not None
        try:
            deadline = time.monotonic() + 30
            while True:
                counts = [http.get(f"/v1/jobs/{j}").json()["counts"] for j in
                          (upload.json()["detail"].split()[1], paths.json()["id"])]  # fmt: skip
                if all(c["queued"] == c["total"] for c in counts):
                    break
                assert time.monotonic() < deadline, counts
                time.sleep(0.2)
            assert len(queued_instance_ids(broker, model_queue(settings, "radq-smoke"))) == 3
        finally:
            redis.Redis.from_url(broker).shutdown(nosave=True)
            stop(server)
