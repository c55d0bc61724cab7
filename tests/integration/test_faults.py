"""Faults in the middle of a job: a worker killed, Redis losing its data, a file that hangs.

Each test runs its own `radq api` and `radq worker` processes (short leases, a fast
maintenance loop) and asserts the end state in SQL: every instance final, exactly one
result row per done instance and model version, the cause recorded for the rest.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Instance, Result
from db.session import make_engine
from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.queue import KOMBU_PRIORITY_STEPS, UNACKED, UNACKED_INDEX, redis_queue_keys
from radq.routing import model_queue
from radq.services import ensure_redis, free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from tests.conftest import SAMPLES, make_settings, unavailable
from tests.integration.test_scale import SLICES, STUDIES, _generate
from tests.jobwait import wait_done

FAST = {
    "lease_seconds": 3,
    "maintenance_seconds": 0.5,
    "reconcile_seconds": 1.0,
    "requeue_after_seconds": 1.0,
    "chunk_size": 16,
}


@dataclass
class Processes:
    settings: Settings
    url: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    client: Client
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"faults-{uuid.uuid4().hex[:6]}@%h"
        log = self.settings.home / f"worker-{name[:13]}.log"
        self.worker = spawn(["worker", "--concurrency", "1", "--hostname", name], env=self.settings.to_env(),
                            log_file=log)  # fmt: skip
        return self.worker


@contextlib.contextmanager
def processes(settings: Settings, *, worker: bool = True) -> Iterator[Processes]:
    env = settings.to_env()
    port = free_port()
    api = spawn(["api", "--port", str(port)], env=env, log_file=settings.home / "api.log")
    url = f"http://127.0.0.1:{port}"
    name = f"faults-{uuid.uuid4().hex[:8]}"
    token = issue_token(settings.resolved_database_url, name=name, scope=Scope.ADMIN)
    running = Processes(settings, url, api, api, Client(url, timeout=60, token=token), token)
    if worker:
        running.start_worker()
    try:
        wait_for_http(f"{url}/healthz", api)
        yield running
    finally:
        running.client.close()
        if running.worker is not api:
            stop(running.worker)
        stop(api)


def submit_paths(running: Processes, paths: list[Path]) -> str:
    response = httpx.post(f"{running.url}/v1/jobs", json={"paths": [str(p) for p in paths]}, timeout=60,
                          headers=running.headers)  # fmt: skip
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def sql_state(database_url: str, job_id: str) -> dict[str, int]:
    """Rows as SQL holds them: instances, done, results, duplicates, instances with lost leases."""
    engine = make_engine(database_url)
    with engine.connect() as conn:
        instances = conn.scalar(select(func.count()).where(Instance.job_id == job_id))
        done = conn.scalar(select(func.count()).where(Instance.job_id == job_id, Instance.status == "done"))
        results = conn.scalar(
            select(func.count()).select_from(Result).join(Instance).where(Instance.job_id == job_id)
        )
        per_key = (
            select(Result.instance_id, Result.model, Result.model_version, func.count().label("n"))
            .join(Instance)
            .where(Instance.job_id == job_id)
            .group_by(Result.instance_id, Result.model, Result.model_version)
            .subquery()
        )
        duplicates = conn.scalar(select(func.count()).select_from(per_key).where(per_key.c.n > 1))
        lost = conn.scalar(select(func.count()).where(Instance.job_id == job_id, Instance.lost_leases > 0))
    engine.dispose()
    state = {"instances": instances or 0, "done": done or 0, "results": results or 0,
            "duplicates": duplicates or 0, "lost_leases": lost or 0}  # fmt: skip
    print(f"end state of job {job_id}: {state}")  # the README's fault table quotes these
    return state


def test_worker_killed_mid_job_loses_and_doubles_nothing(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, redis_url, **{**FAST, "chunk_size": 64})
    root = settings.allowed_roots[0] / "killed"
    _generate(root)
    with processes(settings) as running:
        job_id = submit_paths(running, [root])

        def stopped_mid_chunk() -> bool:
            # Frozen while the counts are read, so the kill lands mid-chunk: a worker let run
            # may finish the chunk and take the next message between the read and the kill.
            os.killpg(running.worker.pid, signal.SIGSTOP)
            counts = running.client.job(job_id)["counts"]
            if counts["done"] >= 32 and counts["processing"] > 0:
                return True
            os.killpg(running.worker.pid, signal.SIGCONT)
            return False

        wait_for(stopped_mid_chunk, 120, "a chunk in progress after the first results")
        os.killpg(running.worker.pid, signal.SIGKILL)  # main process and its decode processes, no warning
        running.worker.wait(10)
        running.start_worker()
        job = wait_done(running.client, job_id, timeout=300)
    total = STUDIES * SLICES
    assert job["counts"]["done"] == total
    state = sql_state(database_url, job_id)
    assert state["results"] == state["done"] == state["instances"] == total
    assert state["duplicates"] == 0
    assert state["lost_leases"] > 0  # the killed worker's chunk came back through the reaper


def take_and_die(broker_url: str, queue: str) -> tuple[str, int]:
    """What a worker killed between taking a message and claiming its instances leaves behind.

    kombu moves a message from its queue into ``unacked`` (and its delivery time into
    ``unacked_index``) as it hands it to the worker; with the worker gone nothing claims
    its instances, acknowledges it or gives it back. Returns its delivery tag and how many
    instances it carried.
    """
    client = redis.Redis.from_url(broker_url)
    raw = next(filter(None, (client.rpop(key) for key in redis_queue_keys(queue))), None)
    assert raw is not None, f"no message waiting in {queue}"
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    client.zadd(UNACKED_INDEX, {tag: time.time()})
    client.hset(UNACKED, tag, json.dumps([message, "", queue]))
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return tag, len(args[1])


def test_message_taken_by_a_worker_that_died_before_claiming_is_sent_again(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, redis_url, **FAST)
    folder = settings.allowed_roots[0] / "orphaned"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"):
        shutil.copy(SAMPLES / "real" / name, folder / name)
    queue = model_queue(settings, "radq-smoke")
    with processes(settings, worker=False) as running:
        job_id = submit_paths(running, [folder])
        wait_for(lambda: running.client.job(job_id)["counts"]["queued"] == 3, 60, "the chunk to be queued")
        tag, carried = take_and_die(redis_url, queue)
        assert carried == 3
        running.start_worker()
        try:
            # Without the check of delivery times the chunk would wait for kombu's visibility
            # timeout (an hour); the reconcile round sends it again once the delivery is a
            # lease old and its instances have been queued for the grace period.
            job = wait_done(running.client, job_id, timeout=120)
        finally:  # the tests share a Redis: leave no orphan for another test's reconcile
            client = redis.Redis.from_url(redis_url)
            client.hdel(UNACKED, tag)
            client.zrem(UNACKED_INDEX, tag)
    assert job["counts"]["done"] == 3
    state = sql_state(database_url, job_id)
    assert state["results"] == state["done"] == 3 and state["duplicates"] == 0
    assert state["lost_leases"] == 0  # never claimed, so nothing came back through the reaper


def test_redis_restarted_without_its_data_mid_job(tmp_path: Path, database_url: str) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    server = ensure_redis(broker, tmp_path / "redis")
    assert server is not None
    settings = make_settings(tmp_path, database_url, broker, **FAST)
    root = settings.allowed_roots[0] / "flushed"
    _generate(root)
    try:
        with processes(settings) as running:
            job_id = submit_paths(running, [root])
            wait_for(lambda: running.client.job(job_id)["counts"]["done"] >= 16, 120, "the first results")
            server.kill()  # Redis dies; what it held (the queued chunks) is gone with it
            server.wait(10)
            server = ensure_redis(broker, tmp_path / "redis")  # an empty Redis comes back
            assert server is not None
            job = wait_done(running.client, job_id, timeout=300)
    finally:
        if server is not None:
            stop(server)
    total = STUDIES * SLICES
    assert job["counts"]["done"] == total
    state = sql_state(database_url, job_id)
    assert state["results"] == state["done"] == total and state["duplicates"] == 0


def test_file_that_hangs_the_reader_fails_alone(tmp_path: Path, database_url: str, redis_url: str) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs a FIFO")
    # One decode process: the four files go to it as one task, which the FIFO hangs. The
    # task is stopped after the timeout and each file goes again alone.
    settings = make_settings(tmp_path, database_url, redis_url, **{**FAST, "decode_timeout": 3.0},
                             decode_processes=1)  # fmt: skip
    folder = settings.allowed_roots[0] / "hang"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"):
        shutil.copy(SAMPLES / "real" / name, folder / name)
    # Reading a FIFO with no writer blocks forever: a stand-in for a stalled mount or a
    # codec that never returns.
    os.mkfifo(folder / "BB_hangs.dcm")
    with processes(settings) as running:
        job = wait_done(running.client, submit_paths(running, [folder]), timeout=180)
        assert running.worker.poll() is None  # the worker replaced its decode process and went on
        failed = running.client.instances(job["id"], "failed")
    assert job["counts"]["done"] == 3 and job["counts"]["failed"] == 1
    assert failed[0]["file_name"].endswith("BB_hangs.dcm")
    assert "decoding took longer than 3 s (RADQ_DECODE_TIMEOUT)" in failed[0]["reason"]
    state = sql_state(database_url, job["id"])
    # Stopped by its own timeout: the other files did not fail with it, no lease was lost.
    assert state["results"] == 3 and state["duplicates"] == 0 and state["lost_leases"] == 0


def test_sigterm_finishes_the_chunk_and_a_restart_loses_nothing(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, redis_url, **FAST)
    root = settings.allowed_roots[0] / "sigterm"
    _generate(root)
    with processes(settings) as running:
        job_id = submit_paths(running, [root])
        wait_for(lambda: running.client.job(job_id)["counts"]["done"] >= 16, 120, "the first results")
        running.worker.send_signal(signal.SIGTERM)  # what systemd, docker stop and k8s send
        assert running.worker.wait(60) == 0  # warm shutdown: the chunk in hand is finished
        counts = running.client.job(job_id)["counts"]
        assert counts["processing"] == 0, counts  # nothing left held by the stopped worker
        running.start_worker()
        job = wait_done(running.client, job_id, timeout=300)
    assert job["counts"]["done"] == STUDIES * SLICES
    state = sql_state(database_url, job_id)
    assert state["results"] == state["done"] == STUDIES * SLICES and state["duplicates"] == 0
    assert state["lost_leases"] == 0  # handed over cleanly, not recovered by the reaper


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb in a temp dir), so it can be stopped."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="radq-pg-"))  # /tmp: reachable by the postgres user
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def test_postgresql_down_for_20_seconds_mid_job(tmp_path: Path, redis_url: str) -> None:
    cluster = PrivateCluster()
    try:
        cluster.start()
        upgrade(cluster.url)
        settings = make_settings(tmp_path, cluster.url, redis_url, **FAST)
        root = settings.allowed_roots[0] / "outage"
        _generate(root)
        with processes(settings) as running:
            job_id = submit_paths(running, [root])
            wait_for(lambda: running.client.job(job_id)["counts"]["done"] >= 16, 120, "the first results")
            cluster.stop()
            down_at = time.monotonic()
            health = httpx.get(f"{running.url}/healthz", timeout=30)
            assert health.status_code == 503 and health.json()["database"].startswith("unreachable")
            status = httpx.get(f"{running.url}/v1/jobs/{job_id}", timeout=30, headers=running.headers)
            assert status.status_code == 503 and status.headers["retry-after"]
            time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
            cluster.start()
            job = wait_done(running.client, job_id, timeout=300)
            assert running.worker.poll() is None and running.api.poll() is None
        total = STUDIES * SLICES
        assert job["counts"]["done"] == total
        state = sql_state(cluster.url, job_id)
        assert state["results"] == state["done"] == total and state["duplicates"] == 0
    finally:
        cluster.remove()


def redeliver_unacked(broker_url: str, queue: str) -> int:
    """Do what kombu does when a message's visibility timeout passes: put it back in its queue.

    kombu runs this on a throttled timer (about every 100 s by default); the test does it
    at the moment it needs, with the message left in ``unacked`` as kombu's restore leaves
    the original delivery's worker holding it.
    """
    client = redis.Redis.from_url(broker_url)
    moved = 0
    for raw in client.hvals(UNACKED):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key != queue:
            continue
        priority = message["properties"].get("priority") or 0
        step = max(p for p in KOMBU_PRIORITY_STEPS if p <= priority)
        client.lpush(redis_queue_keys(queue)[KOMBU_PRIORITY_STEPS.index(step)], json.dumps(message))
        moved += 1
    return moved


def test_message_redelivered_while_its_worker_still_works_infers_nothing_twice(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, database_url, redis_url, **{**FAST, "decode_timeout": 8.0})
    folder = settings.allowed_roots[0] / "slow"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"):
        shutil.copy(SAMPLES / "real" / name, folder / name)
    os.mkfifo(folder / "BB_hangs.dcm")  # keeps the first worker busy on the chunk
    with processes(settings) as running:
        first = running.worker
        job_id = submit_paths(running, [folder])
        wait_for(
            lambda: running.client.job(job_id)["counts"]["processing"] == 4, 60, "the chunk to be claimed"
        )
        second = running.start_worker()
        try:
            assert redeliver_unacked(redis_url, model_queue(settings, "radq-smoke")) == 1
            job = wait_done(running.client, job_id, timeout=180)
        finally:
            stop(second)
            running.worker = first
    logs = "".join(p.read_text(errors="replace") for p in settings.home.glob("worker-*.log"))
    received = [line.split("[", 1)[1].split("]", 1)[0] for line in logs.splitlines()
                if "infer_chunk[" in line and line.rstrip().endswith("received")]  # fmt: skip
    assert any(received.count(task) > 1 for task in received), "the message was never delivered twice"
    assert job["counts"]["done"] == 3 and job["counts"]["failed"] == 1
    state = sql_state(database_url, job["id"])
    assert state["results"] == 3 and state["duplicates"] == 0
