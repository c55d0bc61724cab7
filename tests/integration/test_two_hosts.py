"""Two worker hosts share one job over the network; one is cut off and the other finishes.

The hosts are network namespaces (their own interfaces and loopback), so a worker
there reaches the broker, the database and the blob store only over the network,
as a worker on another machine does. API, Redis, PostgreSQL and an S3 endpoint
(moto's server) sit on a third address. Uploads go to S3, so the hosts share no
files through the radq home or the blob directory.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import boto3
import numpy as np
import pydicom
import pytest
from botocore.exceptions import EndpointConnectionError
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Instance, Result
from db.session import make_engine, make_sessionmaker
from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.services import free_port, spawn, stop, wait_for_http
from tests.conftest import SAMPLES, PostgresServer, unavailable
from tests.integration.netns import Network, TcpForwarder, netns_unavailable_reason, spawn_on

INSTANCES = 480
BUCKET = "radq-hosts"
S3_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


def _ct_zip(count: int) -> bytes:
    """``count`` CT slices (real CT_small header, new UIDs and pixels) in four studies, zipped."""
    template = pydicom.dcmread(SAMPLES / "real" / "CT_small.dcm")
    rng = np.random.default_rng(11)
    studies = [(generate_uid(), generate_uid()) for _ in range(4)]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            ds = template.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = studies[i % len(studies)]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.PixelData = rng.integers(-1000, 1500, (128, 128), dtype=np.int16).tobytes()
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            archive.writestr(f"ct/{i:04d}.dcm", buf.getvalue())
    return out.getvalue()


@pytest.fixture
def network() -> Iterator[Network]:
    reason = netns_unavailable_reason()
    if reason:
        unavailable(reason)
    net = Network.create(hosts=2)
    try:
        yield net
    finally:
        net.remove()


@contextmanager
def _s3_server(address: str, log_file: Path) -> Iterator[str]:
    """moto's standalone S3 server on ``address``, with the bucket radq uses; yields its URL."""
    port = free_port()
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", address, "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://{address}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=url, **S3_CREDENTIALS).create_bucket(Bucket=BUCKET)
                break
            except (EndpointConnectionError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def _per_worker(sessions, job_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        rows = session.execute(
            select(Instance.worker, func.count())
            .where(Instance.job_id == job_id, Instance.status == "done")
            .group_by(Instance.worker)
        ).all()
    return {str(worker): n for worker, n in rows}


def test_two_hosts_share_a_job_and_one_finishes_when_the_other_is_cut_off(
    network: Network, postgres: PostgresServer, redis_url: str, tmp_path: Path
) -> None:
    database_url = postgres.create_database()
    upgrade(database_url)
    services = network.services_address
    s3 = _s3_server(services, tmp_path / "s3.log")
    s3_endpoint = s3.__enter__()
    redis_fwd = TcpForwarder(services, ("127.0.0.1", int(redis_url.split(":")[2].split("/")[0])))
    pg_fwd = TcpForwarder(services, ("127.0.0.1", 5432))
    processes = []
    try:
        queue = f"radq-hosts-{uuid.uuid4().hex[:6]}"
        bucket_url = f"s3://{BUCKET}/{queue}"
        common = {
            "RADQ_QUEUE": queue,
            "RADQ_QUEUE_PREFIX": f"{queue}-",
            "RADQ_BLOB_URL": bucket_url,
            "RADQ_DEFAULT_MODELS": "radq-smoke",
            "RADQ_DEDUP": "false",
            # One key for every host, or each would pseudonymise PatientIDs its own way.
            "RADQ_PSEUDONYM_KEY": "two-hosts-pseudonym-key-0123456789abcdef",
            "RADQ_CHUNK_SIZE": "8",
            "RADQ_BATCH_SIZE": "8",
            "RADQ_DECODE_PROCESSES": "1",
            # A cut-off host's instances come back once their leases lapse.
            "RADQ_LEASE_SECONDS": "6",
            "RADQ_MAINTENANCE_SECONDS": "1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        redis_db = redis_url.rsplit("/", 1)[1]
        api_home = tmp_path / "services"
        api_home.mkdir()
        api_env = {
            **common,
            "RADQ_HOME": str(api_home),
            "RADQ_DATABASE_URL": database_url,
            "RADQ_BROKER_URL": redis_url,
            "AWS_ENDPOINT_URL": s3_endpoint,
        }
        api = spawn(["api", "--host", services, "--port", "8000"], env=api_env, log_file=api_home / "api.log")
        processes.append(api)
        api_url = f"http://{services}:8000"
        wait_for_http(f"{api_url}/healthz", api)

        pg_port = pg_fwd.address[1]
        worker_names = []
        for host in network.hosts:
            home = tmp_path / host.name
            home.mkdir()
            name = f"{host.name}@{host.address}"
            worker_names.append(name)
            env = {
                **common,
                "RADQ_HOME": str(home),
                "RADQ_DATABASE_URL": database_url.replace("127.0.0.1:5432", f"{services}:{pg_port}"),
                "RADQ_BROKER_URL": f"redis://{services}:{redis_fwd.address[1]}/{redis_db}",
                "AWS_ENDPOINT_URL": s3_endpoint,
            }
            processes.append(
                spawn_on(
                    host,
                    ["worker", "--concurrency", "1", "--hostname", name],
                    env=env,
                    log_file=home / "worker.log",
                )
            )

        engine = make_engine(database_url)
        sessions = make_sessionmaker(engine)
        token = issue_token(database_url, name="two-hosts", scope=Scope.SUBMIT)
        with closing(Client(api_url, timeout=120, token=token)) as client:
            archive = tmp_path / "archive.zip"
            archive.write_bytes(_ct_zip(INSTANCES))
            job = client.upload([archive])
            job_id = job["id"]
            # Both hosts take part before one is cut off.
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                per_worker = _per_worker(sessions, job_id)
                if all(per_worker.get(n, 0) >= 16 for n in worker_names):
                    break
                time.sleep(0.2)
            assert all(per_worker.get(n, 0) >= 16 for n in worker_names), per_worker
            done_before = sum(per_worker.values())
            assert done_before < INSTANCES, "the job ended before a host could be cut off"

            network.hosts[1].cut_off()
            deadline = time.monotonic() + 300
            while client.job(job_id)["status"] != "done" and time.monotonic() < deadline:
                time.sleep(0.5)
            final = client.job(job_id)

        assert final["status"] == "done", final
        assert final["counts"]["done"] == INSTANCES and final["counts"]["failed"] == 0, final["counts"]
        per_worker = _per_worker(sessions, job_id)
        survivor, cut = worker_names
        # The surviving host finished its share and the cut-off host's unfinished one.
        assert per_worker[survivor] + per_worker.get(cut, 0) == INSTANCES
        assert per_worker[survivor] >= INSTANCES - done_before and per_worker[cut] >= 16
        with sessions() as session:
            results = session.scalar(
                select(func.count()).select_from(Result).join(Instance).where(Instance.job_id == job_id)
            )
        assert results == INSTANCES  # one result per instance: nothing written twice
        engine.dispose()
    finally:
        for proc in processes:
            stop(proc, timeout=10)
        redis_fwd.close()
        pg_fwd.close()
        s3.__exit__(None, None, None)
        postgres.drop_database(database_url)
