"""The HTTP API, fuzzed from its own OpenAPI schema, never answers 5xx and keeps to the schema.

The real app runs under uvicorn (``tests.apiserver.serve``) over a fresh SQLite database
and the real Redis; schemathesis reads ``/openapi.json`` from that server and sends every
operation generated requests, valid and invalid, over HTTP.

No 5xx is allowed, 503 included: the database and the broker are both up here, so a 503
would mean a request-dependent error (a SQLite ``OperationalError``, say) passed off as an
outage.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from schemathesis import Case, SerializationContext
from schemathesis.openapi import from_url

from db.migrate import upgrade
from radq.model_card import cards_in
from radq.queue import redis_queue_keys
from radq.routing import all_queues
from radq.settings import Settings
from tests.apiserver import serve
from tests.conftest import SAMPLES, make_settings

CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
    )
]
"""What every response is held to. Left out: ``positive_data_acceptance`` (a schema-valid
request may still name a model the server lacks or a path outside RADQ_ALLOWED_ROOTS,
which is a 400/403 by design) and the checks about auth and stateful links, which this
API has none of."""

STOW_BOUNDARY = "radq-fuzz-boundary"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'


@schemathesis.serializer("multipart/related")
def _one_stow_part(ctx: SerializationContext, value: object) -> bytes:
    """The generated body as the one application/dicom part of a STOW-RS request."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    elif not isinstance(value, bytes):
        value = json.dumps(value).encode()
    head = f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + value + f"\r\n--{STOW_BOUNDARY}--\r\n".encode()


@dataclass
class Server:
    http: httpx.Client
    settings: Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{home / 'radq.db'}"
    upgrade(url)
    app_settings = make_settings(home, url, redis_url, max_upload_bytes=1_000_000, max_archive_members=8)
    try:
        with serve(app_settings) as http:
            yield Server(http, app_settings)
    finally:
        # No worker consumes this server's queue: drop what the fuzzed submissions published.
        cards = cards_in(app_settings.model_dir)
        keys = [key for queue in all_queues(app_settings, cards) for key in redis_queue_keys(queue)]
        redis.Redis.from_url(redis_url).delete(*keys)


@pytest.fixture(scope="module")
def job_ids(server: Server) -> list[str]:
    """Two real jobs, so that ``{job_id}`` operations are fuzzed past their 404 too."""
    sample = SAMPLES / "real" / "CT5N_2062.dcm"
    upload = server.http.post(
        "/v1/jobs", files=[("files", ("a.dcm", sample.read_bytes())), ("files", ("b.dcm", b"x"))]
    )
    shutil.copy(sample, server.settings.allowed_roots[0] / "a.dcm")
    paths = server.http.post("/v1/jobs", json={"paths": [str(server.settings.allowed_roots[0])]})
    assert upload.status_code == paths.status_code == 202, (upload.text, paths.text)
    return [upload.json()["id"], paths.json()["id"]]


@pytest.fixture(scope="module")
def api_schema(server: Server) -> schemathesis.BaseSchema:
    return from_url(f"{server.http.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _legacy_nodeid(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schemas read and rename ``Function._nodeid``, which pytest 9.2
    # no longer has (the node id lives in ``_id``); the rename only labels reports.
    request.node._nodeid = request.node.nodeid


def _aim(case: Case, pick: int, job_ids: list[str], root: Path) -> None:
    """Point some generated requests at things that exist, so fuzzing gets past 404 and 403."""
    if not pick:
        return
    if case.path_parameters and "job_id" in case.path_parameters:
        case.path_parameters["job_id"] = job_ids[pick - 1]
    if isinstance(case.body, dict) and isinstance(case.body.get("paths"), list):
        case.body["paths"] = [f"{root}/{p}" if isinstance(p, str) else p for p in case.body["paths"]]


def _sends_what_it_means(case: Case) -> bool:
    """False for a multipart case that sends a valid request schemathesis holds to be refused:
    an empty list in a field other than ``files`` (sent as no part at all: ``explain_threshold:
    []``, "became array"), or a number as a string (the same part on the wire, "became string")."""
    if not (case.media_type or "").startswith("multipart/form-data") or not isinstance(case.body, dict):
        return True
    if _numeric(case.body.get("explain_threshold")):
        return False
    return not any(value == [] for name, value in case.body.items() if name != "files")


def _numeric(value: object) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:  # "" and words
        return False


@schema.parametrize()
@schema.given(pick=st.integers(min_value=0, max_value=2))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_within_its_schema_and_never_5xx(
    case: Case, pick: int, job_ids: list[str], server: Server
) -> None:
    assume(_sends_what_it_means(case))
    _aim(case, pick, job_ids, server.settings.allowed_roots[0])
    headers = {}
    if any(name.lower() == "authorization" for name in case.headers or {}):
        # A token where the schema's security asks for one; a case that leaves the header out
        # on purpose (negative data) must be refused with 401, so it stays out.
        headers["Authorization"] = server.http.headers["Authorization"]
    if case.media_type and case.media_type.startswith("multipart/related"):
        # Some phases drop the media type's parameters; STOW-RS needs type= and a boundary.
        headers["Content-Type"] = STOW_CONTENT_TYPE
    case.call_and_validate(headers=headers, checks=CHECKS)


# What the fuzzing, and probing around it, found; each answered 500 or broke the schema.


def test_instances_offset_past_sql_bigint_is_refused(server: Server, job_ids: list[str]) -> None:
    path = f"/v1/jobs/{job_ids[0]}/instances"
    response = server.http.get(path, params={"offset": 2**63})
    assert response.status_code == 422, response.text
    assert "offset" in response.json()["detail"]
    assert server.http.get(path, params={"offset": 2**63 - 1}).json()["items"] == []


def test_path_whose_name_is_too_long_is_refused(server: Server) -> None:
    too_long = server.settings.allowed_roots[0] / ("a" * 300)
    response = server.http.post("/v1/jobs", json={"paths": [str(too_long)]})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == f"{too_long}: cannot be read (File name too long)"


def test_since_is_iso_8601_not_unix_time(server: Server) -> None:
    # pydantic reads a number as Unix time: ISO 8601's basic 20240131 would mean 1970-08-23.
    for number in ("20240131", "1.5", ".5", "1.192092896e-07", " -2E3 "):  # the last two found by fuzzing
        response = server.http.get("/v1/jobs", params={"since": number})
        assert response.status_code == 422, (number, response.text)
        assert "ISO 8601" in response.json()["detail"]
    assert server.http.get("/v1/jobs", params={"since": "2024-01-31T00:00:00Z"}).status_code == 200


def test_405_allows_every_method_of_the_path(server: Server) -> None:
    response = server.http.put("/v1/jobs")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert server.http.delete("/v1/jobs/some-id").headers["allow"] == "GET"


def test_schema_documents_the_answers_the_app_gives(server: Server) -> None:
    spec = server.http.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            invalid = operation["responses"].get("422")
            if invalid is not None:
                assert invalid["content"]["application/json"]["schema"] == error, (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    upload = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["files"]["minItems"] == 1
