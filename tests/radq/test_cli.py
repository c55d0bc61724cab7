"""The ``radq`` command line against a running API (real processes, real HTTP)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done

COMMANDS = [
    "api", "worker", "flower", "db", "db upgrade", "submit", "status", "results", "models list",
    "models show", "models import", "models validate", "demo", "jobs", "cancel", "retry", "scp",
    "tokens", "tokens create", "tokens list", "tokens revoke",
]


def at(stack: Stack) -> dict[str, str]:
    """Where the stack's API is, and its admin token (what RADQ_API_URL, RADQ_API_TOKEN carry)."""
    return {"api_url": stack.api_url, "token": stack.token}


def radq(
    *args: str, api_url: str | None = None, token: str | None = None, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", **env_vars}
    env.pop("RADQ_API_TOKEN", None)
    if api_url:
        env["RADQ_API_URL"] = api_url
    if token:
        env["RADQ_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "radq.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = radq(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_submit_wait_status_and_results(stack: Stack) -> None:
    folder = SAMPLES / "real"
    files = [str(folder / n) for n in ("CT5N_2062.dcm", "CT5N_2392.dcm")]
    broken = str(SAMPLES / "broken" / "zero_bytes.dcm")
    submitted = radq("submit", *files, broken, "--wait", **at(stack))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id)
    assert "zero_bytes.dcm" in submitted.stdout and "empty file (0 bytes)" in submitted.stdout

    status = radq("status", job_id, **at(stack))
    assert status.returncode == 0 and ": done" in status.stdout

    study_uid = stack.client.job(job_id)["studies"][0]["study_instance_uid"]
    as_json = json.loads(radq("results", study_uid, "--format", "json", **at(stack)).stdout)
    assert as_json["study_instance_uid"] == study_uid
    as_csv = list(csv.DictReader(io.StringIO(radq("results", study_uid, "--format", "csv",
                                                  **at(stack)).stdout)))
    assert {row["label"] for row in as_csv} == {f"untrained_{i}" for i in range(4)}
    assert all(0 <= float(row["probability"]) <= 1 for row in as_csv)
    table = radq("results", study_uid, **at(stack))
    assert table.returncode == 0 and "study summary" in table.stdout


def test_unknown_study_and_unreachable_api_exit_nonzero(stack: Stack) -> None:
    missing = radq("results", "1.2.3.999", **at(stack))
    assert missing.returncode == 1 and "404" in missing.stderr and "1.2.3.999" in missing.stderr
    down = radq("status", "x", api_url="http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the radq API" in down.stderr


def test_submit_folder_recursively(stack: Stack) -> None:
    result = radq("submit", str(SAMPLES / "tolerant"), "--wait", **at(stack))
    assert result.returncode == 0, result.stderr
    job = stack.client.job(result.stdout.split()[0])
    assert job["counts"]["done"] == 1


def test_submit_with_explain_returns_saliency_urls(stack: Stack) -> None:
    ct = str(SAMPLES / "real" / "CT5N_3353.dcm")
    result = radq("submit", ct, "--wait", "--explain", "0", "--model", "radq-smoke", **at(stack))
    assert result.returncode == 0, result.stderr
    job = stack.client.job(result.stdout.split()[0])
    assert job["options"] == {"explain_threshold": 0.0, "dedup": False}
    study_uid = job["studies"][0]["study_instance_uid"]
    study = json.loads(radq("results", study_uid, "--format", "json", **at(stack)).stdout)
    mine = [i for s in study["series"] for i in s["instances"] if i["job_id"] == job["id"]]
    assert all(url.endswith(".png") for url in mine[0]["results"][0]["saliency"].values())
    assert len(mine[0]["results"][0]["saliency"]) == 4


def test_jobs_cancel_retry_commands(stack: Stack) -> None:
    target = stack.archive / "cli-retry.dcm"
    target.write_bytes(b"")
    submitted = radq("submit", str(target), "--server-paths", "--priority", "urgent", "--wait",
                     **at(stack))  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    assert stack.client.job(job_id)["priority"] == "urgent"
    listed = radq("jobs", "--status", "done", **at(stack))
    assert listed.returncode == 0 and job_id in listed.stdout
    target.write_bytes((SAMPLES / "real" / "MR_small.dcm").read_bytes())
    retried = radq("retry", job_id, **at(stack))
    assert retried.returncode == 0 and "queued again" in retried.stdout
    assert wait_done(stack.client, job_id)["counts"]["done"] == 1
    late = radq("cancel", job_id, **at(stack))
    assert late.returncode == 1 and "already ended" in late.stderr
    nope = radq("cancel", "no-such-job", **at(stack))
    assert nope.returncode == 1 and "404" in nope.stderr
