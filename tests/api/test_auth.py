"""API tokens against the running API: 401 and 403 as a user meets them, never a token in a log."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from db.status import Scope
from db.tokens import issue_token
from radq.client import ApiError, Client
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done
from tests.radq.test_cli import radq

CT = SAMPLES / "real" / "CT_small.dcm"


def _token(stack: Stack, scope: Scope) -> tuple[str, str]:
    name = f"{scope}-{uuid.uuid4().hex[:8]}"
    return name, issue_token(stack.settings.resolved_database_url, name=name, scope=scope)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _guarded_operations(stack: Stack) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI schema under /v1 and /dicomweb, parameters filled."""
    schema = httpx.get(f"{stack.api_url}/openapi.json").json()
    found = []
    for path, operations in schema["paths"].items():
        if path.startswith(("/v1/", "/dicomweb/")):
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            found += [(method.upper(), concrete) for method in operations]
    return found


def test_every_v1_and_dicomweb_route_needs_a_token(stack: Stack) -> None:
    operations = _guarded_operations(stack)
    assert ("POST", "/v1/jobs") in operations and ("GET", "/v1/audit") in operations
    assert ("POST", "/dicomweb/studies") in operations
    for method, path in operations:
        for headers in ({}, _bearer("not-a-token"), {"Authorization": f"Basic {stack.token}"}):
            response = httpx.request(method, f"{stack.api_url}{path}", headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer", (method, path)
    missing = httpx.get(f"{stack.api_url}/v1/jobs").json()["detail"]
    assert "Authorization: Bearer" in missing and "radq tokens create" in missing
    assert httpx.get(f"{stack.api_url}/v1/jobs", headers=_bearer("nope")).json()["detail"] == (
        "invalid or revoked API token"
    )
    # Health and metrics stay open (probes and Prometheus); they carry counts, no identifiers.
    assert httpx.get(f"{stack.api_url}/healthz").status_code == 200
    assert httpx.get(f"{stack.api_url}/metrics").status_code == 200


def test_read_token_reads_but_cannot_submit_cancel_or_audit(stack: Stack) -> None:
    job = wait_done(stack.client, stack.client.upload([CT])["id"])
    _, read = _token(stack, Scope.READ)
    with httpx.Client(base_url=stack.api_url, headers=_bearer(read), timeout=60) as http:
        assert http.get(f"/v1/jobs/{job['id']}").json()["counts"]["done"] == 1
        study = job["studies"][0]["study_instance_uid"]
        assert http.get(f"/v1/studies/{study}/results").status_code == 200
        for response in (
            http.post("/v1/jobs", files=[("files", ("ct.dcm", CT.read_bytes()))]),
            http.post("/v1/jobs", json={"paths": [str(stack.archive)]}),
            http.post(f"/v1/jobs/{job['id']}/retry"),
            http.post(f"/v1/jobs/{job['id']}/cancel"),
            http.post("/dicomweb/studies", content=b"", headers={"content-type": "multipart/related"}),
        ):
            assert response.status_code == 403, (response.request.url, response.text)
            assert "scope 'submit'" in response.json()["detail"], response.text
        audit = http.get("/v1/audit")
        assert audit.status_code == 403 and "scope 'admin'" in audit.json()["detail"]


def test_submit_token_submits_and_polls(stack: Stack) -> None:
    _, submit = _token(stack, Scope.SUBMIT)
    client = Client(stack.api_url, timeout=60, token=submit)
    try:
        job = wait_done(client, client.upload([CT])["id"])
        assert job["counts"]["done"] == 1
        with pytest.raises(ApiError, match="403"):
            client._request("GET", "/v1/audit")
    finally:
        client.close()


def test_revoked_token_is_refused_and_the_cli_manages_tokens(stack: Stack) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    env = {"RADQ_DATABASE_URL": stack.settings.resolved_database_url}
    created = radq("tokens", "create", "--name", name, "--scope", "read", **env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert len(token) >= 40 and "shown only now" in created.stderr
    assert radq("tokens", "create", "--name", name, "--scope", "read", **env).returncode == 1

    listed = radq("tokens", "list", **env)
    row = next(line for line in listed.stdout.splitlines() if name in line)
    assert f"{token[:6]}…" in row and token not in listed.stdout and "read" in row

    status = radq("jobs", api_url=stack.api_url, token=token)
    assert status.returncode == 0, status.stderr
    revoked = radq("tokens", "revoke", name, **env)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(f"{stack.api_url}/v1/jobs", headers=_bearer(token)).status_code == 401
    refused = radq("jobs", api_url=stack.api_url, token=token)
    assert refused.returncode == 1 and "401" in refused.stderr and "RADQ_API_TOKEN" in refused.stderr
    assert radq("tokens", "revoke", name, **env).returncode == 1  # revoked already
    no_token = radq("jobs", api_url=stack.api_url)
    assert no_token.returncode == 1 and "missing API token" in no_token.stderr


def test_reading_a_study_is_audited_with_the_readers_name(stack: Stack) -> None:
    job = wait_done(stack.client, stack.client.upload([CT])["id"])
    study = job["studies"][0]["study_instance_uid"]
    reader, token = _token(stack, Scope.READ)
    with httpx.Client(base_url=stack.api_url, headers=_bearer(token), timeout=60) as http:
        assert http.get(f"/v1/studies/{study}/results").status_code == 200
        assert http.get(f"/v1/jobs/{job['id']}/instances").status_code == 200

    events = stack.http.get("/v1/audit", params={"actor": reader}).json()["items"]
    assert [(e["action"], e["study_instance_uid"], e["job_id"]) for e in events] == [
        ("job.instances", None, job["id"]),
        ("study.read", study, None),
    ]
    submitted = stack.http.get("/v1/audit", params={"job_id": job["id"], "action": "job.submit"}).json()
    assert [e["actor"] for e in submitted["items"]] == [stack.client_name]


def test_tokens_never_reach_the_api_log(stack: Stack) -> None:
    """Valid, wrong and revoked tokens in requests that pass, fail and are refused."""
    _, live = _token(stack, Scope.READ)
    wrong = "w" * 43
    for token in (live, wrong, stack.token):
        for path in ("/v1/jobs", "/v1/jobs/no", "/v1/studies/1.2.3/results", "/v1/audit", "/v1/jobs?limit=x"):
            response = httpx.get(f"{stack.api_url}{path}", headers=_bearer(token))
            assert token not in response.text
    text = (stack.settings.home / "api.log").read_text(errors="replace")
    assert "GET /v1/audit" in text  # the access log is on: requests are logged, tokens are not
    for token in (live, wrong, stack.token):
        assert token not in text
