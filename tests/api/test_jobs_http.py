"""The HTTP API against a running API and worker, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile

import httpx
import pytest
from sqlalchemy import func, select

from db.models import Result
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done

BROKEN_REASONS = {
    "CT_declares_4096_carries_10_bytes.dcm": "truncated pixel data: expected 33554432 bytes, found 10",
    "MR_small_cut_in_pixels.dcm": "truncated pixel data: expected 8192 bytes, found 5330",
    "gzipped_MR.dcm.gz": "gzip-compressed file, not DICOM",
    "random_bytes.bin": "not a DICOM file",
    "readme_named_dcm.dcm": "not a DICOM file",
    "zero_bytes.dcm": "empty file (0 bytes)",
}
NO_IMAGE = {"structured_report_no_image.dcm", "waveform_no_image.dcm"}


def _upload(stack: Stack, files: list[tuple[str, bytes]], **data: object) -> httpx.Response:
    parts = [("files", (name, io.BytesIO(body), "application/dicom")) for name, body in files]
    return stack.http.post("/v1/jobs", files=parts, data=data or None, timeout=60)


def test_every_sample_file_gets_a_result_or_a_reason(stack: Stack) -> None:
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.name != "MANIFEST.tsv")
    response = _upload(stack, [(f"{p.parent.name}/{p.name}", p.read_bytes()) for p in files])
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["counts"]["total"] == len(files)

    job = wait_done(stack.client, job["id"])
    counts = job["counts"]
    real = [p for p in files if p.parent.name in ("real", "tolerant")]
    assert counts["done"] == len(real)
    assert counts["failed"] == len(BROKEN_REASONS)
    assert counts["skipped"] == len(NO_IMAGE)
    assert counts["total"] == len(files) and counts["queued"] == counts["processing"] == 0
    assert job["finished_at"] is not None

    failed = stack.client.instances(job["id"], "failed")
    reasons = {i["file_name"].split("/")[-1]: i["reason"] for i in failed}
    for name, expected in BROKEN_REASONS.items():
        assert expected in reasons[name], (name, reasons[name])
    skipped = stack.client.instances(job["id"], "skipped")
    assert {i["file_name"].split("/")[-1] for i in skipped} == NO_IMAGE
    assert all(i["reason"].startswith("no image:") for i in skipped)
    # A broken file whose header is readable still shows its SOPInstanceUID.
    truncated = next(i for i in failed if "MR_small_cut" in i["file_name"])
    assert truncated["sop_instance_uid"]
    tolerated = [i for i in stack.client.instances(job["id"], "done") if "no_meta" in i["file_name"]]
    assert tolerated and "preamble" in tolerated[0]["notes"]
    assert stack.worker.poll() is None, "a bad file must never take the worker down"


def test_study_results_have_series_instances_and_summary(stack: Stack) -> None:
    ct = sorted((SAMPLES / "real").glob("CT5N_*.dcm"))
    job = _upload(stack, [(p.name, p.read_bytes()) for p in ct]).json()
    job = wait_done(stack.client, job["id"])
    assert job["counts"]["done"] == len(ct)
    assert len(job["studies"]) == 1
    study_uid = job["studies"][0]["study_instance_uid"]

    study = stack.client.study_results(study_uid)
    instances = [i for s in study["series"] for i in s["instances"]]
    assert len(instances) == len(ct)
    for inst in instances:
        (result,) = inst["results"]
        assert result["model"] == "radq-smoke" and result["model_version"] == "1.0.0"
        assert len(result["weights_sha256"]) == 64
        assert set(result["outputs"]) == {f"untrained_{i}" for i in range(4)}
        assert all(0.0 <= p <= 1.0 for p in result["outputs"].values())
    (summary,) = study["summary"]
    assert summary["aggregation"] == "max" and summary["instances"] == len(ct)
    for label, value in summary["outputs"].items():
        assert value == max(i["results"][0]["outputs"][label] for i in instances)


def test_archives_are_expanded(stack: Stack) -> None:
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.write(SAMPLES / "real" / "CT_small.dcm", "scans/ct.dcm")
        zf.write(SAMPLES / "real" / "MR_small.dcm", "scans/mr.dcm")
        zf.writestr("__MACOSX/._ct.dcm", b"resource fork")
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        tf.add(SAMPLES / "real" / "CR2_6247.dcm", "cr/cr.dcm")
    response = _upload(stack, [("a.zip", zbuf.getvalue()), ("b.tar.gz", tbuf.getvalue())])
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"])
    assert job["counts"]["total"] == 3 and job["counts"]["done"] == 3
    names = {i["file_name"] for i in stack.client.instances(job["id"])}
    assert names == {"a.zip!scans/ct.dcm", "a.zip!scans/mr.dcm", "b.tar.gz!cr/cr.dcm"}


def test_path_submission_reads_in_place_under_allowed_roots(stack: Stack) -> None:
    folder = stack.archive / "study-a"
    folder.mkdir(exist_ok=True)
    for name in ("CT5N_2062.dcm", "CT5N_2392.dcm"):
        shutil.copy(SAMPLES / "real" / name, folder / name)
    response = stack.http.post("/v1/jobs", json={"paths": [str(folder)]})
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"])
    assert job["counts"]["done"] == 2
    assert all(i["file_name"].startswith(str(folder)) for i in stack.client.instances(job["id"]))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"paths": ["/etc/passwd"]}, 403, "outside the allowed roots"),
        ({"paths": ["relative/path"]}, 400, "must be absolute"),
        ({"paths": []}, 400, "paths"),
        ({"paths": ["/nonexistent-root/x"]}, 403, "outside the allowed roots"),
        ({"nope": 1}, 400, "paths"),
        ({"paths": ["/tmp/a\u0000b"]}, 400, "NUL"),
        ({"paths": "/not/a/list"}, 400, "paths"),
    ],
)
def test_bad_path_submissions_are_refused_clearly(
    stack: Stack, body: dict[str, object], status: int, fragment: str
) -> None:
    response = stack.http.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_symlink_out_of_the_allowed_root_is_refused(stack: Stack) -> None:
    link = stack.archive / "escape"
    if not link.exists():
        link.symlink_to("/etc")
    response = stack.http.post("/v1/jobs", json={"paths": [str(link)]})
    assert response.status_code == 403
    assert "resolves to /etc" in response.json()["detail"]


def test_bad_requests_are_4xx_with_a_message(stack: Stack) -> None:
    http = stack.http
    cases = [
        http.post("/v1/jobs", content=b"hello", headers={"content-type": "text/plain"}),
        http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        http.post("/v1/jobs", data={"models": "radq-smoke"}, files={"other": ("", b"")}),
        _upload(stack, [("x.dcm", (SAMPLES / "real" / "MR_small.dcm").read_bytes())], models="no-such-model"),
        _upload(stack, [("bad.zip", b"PK\x03\x04 not really a zip")]),
        http.get("/v1/jobs/does-not-exist"),
        http.get("/v1/jobs/does-not-exist/instances"),
        http.get("/v1/studies/1.2.3.4.5/results"),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, (response.request.url, response.text)
        assert response.status_code not in (401, 403), (response.request.url, response.text)
        assert response.json()["detail"], response.text
    assert "available: auto, chexnet-densenet121, headct-resnet18, radq-smoke" in cases[3].json()["detail"]
    assert "not a readable zip archive" in cases[4].json()["detail"]
    assert cases[7].status_code == 404 and "1.2.3.4.5" in cases[7].json()["detail"]


def test_health_and_metrics(stack: Stack) -> None:
    health = stack.http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert stack.http.get("/v1/jobs/no-such-job").status_code == 404
    metrics = stack.http.get("/metrics").text
    assert 'radq_instances{status="done"}' in metrics
    # Requests are counted under the route that matched, with the status the client got.
    assert 'radq_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}' in metrics
    assert 'radq_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics


def test_result_rows_are_unique_per_instance_and_model(stack: Stack) -> None:
    with stack.sessions() as session:
        dupes = session.execute(
            select(Result.instance_id, Result.model, Result.model_version, func.count())
            .group_by(Result.instance_id, Result.model, Result.model_version)
            .having(func.count() > 1)
        ).all()
    assert dupes == []


def test_gradcam_maps_on_request(stack: Stack) -> None:
    ct = (SAMPLES / "real" / "CT_small.dcm").read_bytes()
    response = _upload(stack, [("ct.dcm", ct)], explain_threshold="0")
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"])
    assert job["options"] == {"explain_threshold": 0.0, "dedup": False} and job["counts"]["done"] == 1
    study = stack.client.study_results(job["studies"][0]["study_instance_uid"])
    mine = [i for s in study["series"] for i in s["instances"] if i["job_id"] == job["id"]]
    (result,) = mine[0]["results"]
    assert set(result["saliency"]) == set(result["outputs"])  # threshold 0: every label
    png = stack.http.get(result["saliency"]["untrained_0"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert stack.http.get(f"/v1/saliency/{'0' * 64}.png").status_code == 404
    bad = _upload(stack, [("ct.dcm", ct)], explain_threshold="2")
    assert bad.status_code == 400 and "explain_threshold" in bad.json()["detail"]
    twice = _upload(stack, [("ct.dcm", ct)], explain_threshold=["0.9", "0.1"])  # which was meant?
    assert twice.status_code == 400
    assert twice.json()["detail"] == "invalid request: explain_threshold: give it once, not 2 times"
    empty = _upload(stack, [("ct.dcm", ct)], explain_threshold="")  # not taken for "not set"
    assert empty.status_code == 400
    assert empty.json()["detail"].startswith("invalid request: explain_threshold: empty; give a value")
