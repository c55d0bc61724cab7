"""DICOMweb STOW-RS against a running API and worker, on SQLite and PostgreSQL.

The happy path goes through a real third-party client (dicomweb-client); bodies with
bad parts are built by hand, byte for byte, and sent with httpx.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from api.dicomweb import (
    FailureReason,
    UnsupportedMediaType,
    boundary_of,
)
from api.multipart import MalformedMultipart, Part, PartSpool
from api.routes.dicomweb import check_and_submit
from api.state import AppState
from db.migrate import upgrade
from db.models import Instance as InstanceRow
from db.models import Job, Result
from db.session import make_engine
from radq.blobs.file import FileBlobStore
from radq.errors import LimitExceeded
from tests.apiserver import serve
from tests.conftest import SAMPLES, Stack, make_settings
from tests.jobwait import wait_done

REAL = SAMPLES / "real"
CT5N = sorted(REAL.glob("CT5N_*.dcm"))
CT5N_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.1"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary='


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _body(parts: list[bytes | tuple[str, bytes]], boundary: str, *, close: bool = True) -> bytes:
    """A multipart/related body; a (headers, bytes) part carries its own header lines."""
    out = b""
    for part in parts:
        headers, payload = part if isinstance(part, tuple) else ("Content-Type: application/dicom\r\n", part)
        out += f"--{boundary}\r\n{headers}\r\n".encode() + payload + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def _stow(
    stack: Stack, parts: list[bytes | tuple[str, bytes]], path: str = "/dicomweb/studies", **kw: str
) -> httpx.Response:
    boundary = uuid.uuid4().hex
    return stack.http.post(
        path,
        content=_body(parts, boundary),
        # The type parameter unquoted on purpose: dicomweb-client quotes it, others do not.
        headers={"content-type": f"multipart/related; type=application/dicom; boundary={boundary}", **kw},
        timeout=60,
    )


def _dataset(response: httpx.Response) -> Dataset:
    assert response.headers["content-type"] == "application/dicom+json", response.text
    return Dataset.from_json(response.json())


def _jobs(stack: Stack) -> int:
    with stack.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _results(stack: Stack, job_id: str) -> int:
    with stack.sessions() as session:
        query = select(func.count()).select_from(Result).join(InstanceRow).where(InstanceRow.job_id == job_id)
        return int(session.scalar(query) or 0)


def test_dicomweb_client_stores_instances_as_one_job(stack: Stack) -> None:
    files = [REAL / "CT_small.dcm", REAL / "MR_small.dcm", *CT5N]
    datasets = [pydicom.dcmread(p) for p in files]
    # A small chunk size makes the client send chunked transfer encoding: no Content-Length.
    client = DICOMwebClient(url=f"{stack.api_url}/dicomweb", chunk_size=16 * 1024, headers=stack.headers)
    answer = client.store_instances(datasets=datasets, additional_params={"models": "radq-smoke"})

    assert "FailedSOPSequence" not in answer
    referenced = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert referenced == {(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets}
    assert answer.RetrieveURL.startswith("/v1/jobs/")
    job_id = answer.RetrieveURL.rsplit("/", 1)[1]

    job = wait_done(stack.client, job_id)
    assert job["models"] == ["radq-smoke"]
    assert job["counts"]["total"] == job["counts"]["done"] == len(files)
    done = stack.client.instances(job_id, "done")
    assert {i["sop_instance_uid"] for i in done} == {str(ds.SOPInstanceUID) for ds in datasets}
    assert _results(stack, job_id) == len(files)


def test_bad_parts_fail_alone_and_good_ones_are_processed(stack: Stack) -> None:
    good = [p.read_bytes() for p in CT5N[:2]]
    ct = (REAL / "CT_small.dcm").read_bytes()
    noise = os.urandom(3000)
    cut_header = ct[:700]  # preamble, meta and the start of the data set: SOPInstanceUID, no study
    # The second good part has no Content-Type of its own: it takes the request's type.
    response = _stow(stack, [good[0], noise, ("", good[1]), cut_header])

    assert response.status_code == 202, response.text
    warnings = response.headers.get_list("warning")
    assert len(warnings) == 2 and all(w.startswith('299 radq "part ') for w in warnings)
    assert "part 2 is not a DICOM file" in warnings[0]
    assert "part 4 lacks StudyInstanceUID" in warnings[1]
    answer = _dataset(response)
    noise_item, cut_item = answer.FailedSOPSequence
    assert noise_item.FailureReason == FailureReason.CANNOT_UNDERSTAND == 0xC000
    assert noise_item.ReferencedSOPInstanceUID == ""  # unknown, but present for clients that read it
    assert cut_item.FailureReason == FailureReason.DOES_NOT_MATCH == 0xA900
    assert cut_item.ReferencedSOPInstanceUID == _uid(REAL / "CT_small.dcm")
    stored = [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence]
    assert stored == [_uid(p) for p in CT5N[:2]]

    job_id = response.headers["x-radq-job-id"]
    assert response.headers["location"] == answer.RetrieveURL == f"/v1/jobs/{job_id}"
    job = wait_done(stack.client, job_id)
    assert job["counts"]["total"] == job["counts"]["done"] == 2
    assert _results(stack, job_id) == 2


def test_study_url_refuses_instances_of_another_study(stack: Stack) -> None:
    mr = REAL / "MR_small.dcm"
    parts = [CT5N[2].read_bytes(), mr.read_bytes(), CT5N[3].read_bytes()]
    response = _stow(stack, parts, path=f"/dicomweb/studies/{CT5N_STUDY}")

    assert response.status_code == 202, response.text
    (failed,) = _dataset(response).FailedSOPSequence
    # PS3.18 names no code for a study mismatch; A9xx is the nearest (Azure uses 0xA901).
    assert failed.FailureReason == 0xA900
    assert failed.ReferencedSOPInstanceUID == _uid(mr)
    assert f"not to {CT5N_STUDY} named in the URL" in response.headers["warning"]
    job = wait_done(stack.client, response.headers["x-radq-job-id"])
    assert job["counts"]["done"] == 2
    assert [s["study_instance_uid"] for s in job["studies"]] == [CT5N_STUDY]

    whole = _stow(stack, [CT5N[4].read_bytes()], path=f"/dicomweb/studies/{CT5N_STUDY}")
    assert whole.status_code == 200, whole.text
    assert "warning" not in whole.headers and "FailedSOPSequence" not in _dataset(whole)


def test_no_part_stored_is_409_and_no_job(stack: Stack) -> None:
    before = _jobs(stack)
    mr = (REAL / "MR_small.dcm").read_bytes()
    text = ("Content-Type: text/plain; charset=utf-8\r\n", b"a report")
    response = _stow(stack, [b"", os.urandom(500), mr[:140], text])
    assert response.status_code == 409, response.text
    assert "location" not in response.headers and "x-radq-job-id" not in response.headers
    answer = _dataset(response)
    assert "ReferencedSOPSequence" not in answer and answer.RetrieveURL == ""
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [0xC000] * 4
    reasons = response.headers.get_list("warning")
    assert "part 1 is empty" in reasons[0] and "no data set after it" in reasons[2]
    assert "part 4 has Content-Type text/plain, not application/dicom" in reasons[3]
    assert _jobs(stack) == before


@pytest.mark.parametrize(
    ("content_type", "body", "status", "fragment"),
    [
        ("application/dicom", b"DICM", 415, "application/dicom is not supported"),
        ("multipart/form-data; boundary=x", _body([b"x"], "x"), 415, "multipart/form-data is not supported"),
        ("multipart/related; boundary=x", _body([b"x"], "x"), 415, "without a type parameter"),
        (
            'multipart/related; type="application/dicom+json"; boundary=x',
            _body([b"{}"], "x"),
            415,
            "accepts only type=",
        ),
        ('multipart/related; type="application/dicom"', _body([b"x"], "x"), 400, "no boundary parameter"),
        (STOW_TYPE + "x", b"this is not multipart at all", 400, "does not begin with --x"),
        (STOW_TYPE + "x", b"--x--\r\n", 400, "has no parts"),
    ],
)
def test_requests_that_are_not_stow_rs_are_refused(
    stack: Stack, content_type: str, body: bytes, status: int, fragment: str
) -> None:
    before = _jobs(stack)
    response = stack.http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert _jobs(stack) == before


def test_body_cut_short_is_400_and_stores_nothing(stack: Stack) -> None:
    before = _jobs(stack)
    whole = _body([p.read_bytes() for p in CT5N[:3]], "cut")
    cut = whole[: len(whole) - 2000]  # two parts complete, the third cut in its middle
    response = stack.http.post("/dicomweb/studies", content=cut, headers={"content-type": STOW_TYPE + "cut"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "ends after 2 complete part(s) without its closing boundary --cut--" in detail
    assert "nothing was stored" in detail
    assert _jobs(stack) == before


def test_unknown_model_and_unacceptable_response_type(stack: Stack) -> None:
    part = [(REAL / "MR_small.dcm").read_bytes()]
    bad_model = _stow(stack, part, path="/dicomweb/studies?models=no-such-model")
    assert bad_model.status_code == 400 and "unknown model(s) no-such-model" in bad_model.json()["detail"]
    xml = _stow(stack, part, accept="application/dicom+xml")
    assert xml.status_code == 406 and "application/dicom+json" in xml.json()["detail"]


@pytest.fixture
def small_server(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, str, Path]]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, redis_url, max_upload_bytes=20_000, max_archive_members=3)
    with serve(settings) as http:
        yield http, url, settings.resolved_blob_dir


def _job_rows(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return int(n or 0)


def test_limits_are_413_and_leave_nothing(small_server: tuple[httpx.Client, str, Path]) -> None:
    http, url, blobs = small_server
    small = (REAL / "CR2_6247.dcm").read_bytes()  # 2.3 kB
    many = http.post(
        "/dicomweb/studies", content=_body([small] * 4, "m"), headers={"content-type": STOW_TYPE + "m"}
    )
    assert many.status_code == 413 and "more than 3 parts (RADQ_MAX_ARCHIVE_MEMBERS)" in many.json()["detail"]

    big = _body([(REAL / "CT_small.dcm").read_bytes()], "b")  # 39 kB, sent chunked: no Content-Length
    chunked = http.post(
        "/dicomweb/studies",
        content=(big[i : i + 4096] for i in range(0, len(big), 4096)),
        headers={"content-type": STOW_TYPE + "b"},
    )
    assert chunked.status_code == 413 and "RADQ_MAX_UPLOAD_BYTES" in chunked.json()["detail"]
    assert _job_rows(url) == 0
    assert not [p for p in blobs.iterdir() if p.name.startswith(".stow-")], "the spool must be removed"


@pytest.mark.parametrize(
    "header",
    [
        'multipart/related; type="application/dicom"; boundary="0f3c-b"',
        "multipart/related; type=application/dicom; boundary=0f3c-b",
        'Multipart/Related; Type="Application/DICOM"; Boundary="0f3c-b"',
        'multipart/related;boundary=0f3c-b;type="application/dicom; transfer-syntax=*"',
    ],
)
def test_content_type_variants_are_tolerated(header: str) -> None:
    assert boundary_of(header) == b"0f3c-b"


def test_missing_type_is_unsupported_not_malformed() -> None:
    with pytest.raises(UnsupportedMediaType, match="without a type parameter"):
        boundary_of("multipart/related; boundary=x")
    with pytest.raises(MalformedMultipart, match="no boundary"):
        boundary_of("multipart/related; type=application/dicom")


def test_spool_splits_parts_across_chunk_edges(tmp_path: Path) -> None:
    payloads = [(REAL / "MR_small.dcm").read_bytes(), b"\r\n--not-the-boundary\r\n", CT5N[0].read_bytes()]
    body = b"\r\n" + _body(payloads, "edge") + b"epilogue is ignored"
    spool = PartSpool(b"edge", tmp_path, max_bytes=len(body), max_parts=3)
    try:
        for i in range(0, len(body), 7):  # boundaries fall inside chunks and across them
            spool.feed(body[i : i + 7])
        parts = spool.finish()
        assert [p.path.read_bytes() for p in parts if p.path] == payloads
    finally:
        spool.cleanup()
    assert list(tmp_path.iterdir()) == []
    over = PartSpool(b"edge", tmp_path, max_bytes=len(body) - 1, max_parts=3)
    with pytest.raises(LimitExceeded, match="RADQ_MAX_UPLOAD_BYTES"):
        over.feed(body)
    over.cleanup()


def test_parts_the_store_cannot_take_fail_with_a700_and_make_no_job(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    state = AppState.build(make_settings(tmp_path, url, redis_url))
    not_a_dir = tmp_path / "blobs-file"
    not_a_dir.write_text("a file where the blob store should be")
    state.blobs = FileBlobStore(not_a_dir)
    parts = []
    for number, path in enumerate(CT5N[:2], start=1):
        spooled = tmp_path / f"part{number}.dcm"
        spooled.write_bytes(path.read_bytes())
        part = Part(number, "application/dicom", spooled, spooled.stat().st_size)
        part.sha256 = hashlib.sha256(spooled.read_bytes()).hexdigest()  # as the spool computes it
        parts.append(part)
    try:
        outcome, job_id = check_and_submit(state, parts, None, ["radq-smoke"])
    finally:
        state.engine.dispose()
    assert job_id is None and outcome.stored == []
    assert [(f.part_number, f.code) for f in outcome.failed] == [(1, 0xA700), (2, 0xA700)]
    assert outcome.failed[0].reason == "part 1 could not be stored: Not a directory"
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in CT5N[:2]]
    assert [f.sop_instance_uid for f in outcome.failed] == uids
    with make_engine(url).connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Job)) == 0
