"""``radq demo``: the embedded mode end to end on the bundled sample DICOM (auth off).

Starts what is missing (Redis), migrates the SQLite database, runs the API and one
worker as child processes, submits ``radq/samples``, waits, prints the results, and
stops what it started.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import uuid
from pathlib import Path

from rich.console import Console

from db.migrate import upgrade
from radq.client import Client
from radq.render import job_table, problems_table, studies_table, wait_for_job
from radq.services import ensure_redis, free_port, spawn, stop, wait_for_http
from radq.settings import Settings

SAMPLES = Path(__file__).resolve().parent / "samples"


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through ``finally``, which stops the children


def run_demo(settings: Settings, console: Console, *, timeout: float) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings.ensure_dirs()
    home = settings.home.resolve()
    logs = home / "logs"
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis_proc = ensure_redis(settings.broker_url, home / "redis")
        if redis_proc is not None:
            started.append(redis_proc)
            console.print(f"started redis-server for {settings.broker_url}")
        upgrade(settings.resolved_database_url)
        console.print(f"database: {settings.resolved_database_url}")

        port = free_port()
        api_url = f"http://127.0.0.1:{port}"
        env = {
            "RADQ_HOME": str(home),
            "RADQ_DATABASE_URL": settings.resolved_database_url,
            "RADQ_BROKER_URL": settings.broker_url,
            # A queue of its own: the demo never feeds, or is fed by, other workers.
            "RADQ_QUEUE": f"radq-demo-{uuid.uuid4().hex[:8]}",
            # The embedded demo is one user on 127.0.0.1: no tokens. Everything else requires them.
            "RADQ_AUTH": "false",
            "RADQ_ENV": "development",
        }
        api = spawn(["api", "--port", str(port)], env=env, log_file=logs / "api.log")
        started.append(api)
        worker = spawn(["worker", "--concurrency", "1"], env=env, log_file=logs / "worker.log")
        started.append(worker)
        wait_for_http(f"{api_url}/healthz", api)
        console.print(f"API {api_url} (docs at {api_url}/docs), worker started; logs in {logs}")

        client = Client(api_url)
        job = client.upload([SAMPLES / "real", SAMPLES / "tolerant", SAMPLES / "broken"])
        console.print(f"submitted {job['counts']['total']} files from {SAMPLES} as job {job['id']}")

        def alive() -> str | None:
            for name, proc in (("worker", worker), ("API", api)):
                if proc.poll() is not None:
                    return f"the {name} exited with code {proc.returncode}; see {logs}"
            return None

        job = wait_for_job(client, job["id"], console, timeout=timeout, alive=alive)
        console.print(job_table(job))
        studies = [client.study_results(s["study_instance_uid"]) for s in job["studies"]]
        console.print(studies_table(studies))
        problems = client.instances(job["id"], "failed") + client.instances(job["id"], "skipped")
        if problems:
            console.print(problems_table(problems))
        console.print(
            "[yellow]note:[/yellow] radq's bundled models have random weights for pipeline "
            "testing; their outputs carry no clinical meaning (see `radq models list`)."
        )
        return 0 if job["status"] == "done" else 1
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                stop(proc)
