"""With the broker unreachable the API says so (503) and loses nothing it accepted."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from db.migrate import upgrade
from db.models import Instance
from db.session import make_engine
from db.status import InstanceStatus
from tests.api.test_limits import serve
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
