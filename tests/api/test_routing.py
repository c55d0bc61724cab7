"""`auto` routes each instance to the models whose cards match it; provenance is visible."""

from __future__ import annotations

import io

import pydicom
import torch
from pydicom.uid import generate_uid

from radq.model_card import read_card
from radq.settings import BUNDLED_MODEL_DIR
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done
from workers.models.loader import PRECISION_NAMES, Runtime


def _chest_cr() -> bytes:
    """A real CR header (C-spine) relabelled as a chest radiograph, with its own UIDs."""
    ds = pydicom.dcmread(SAMPLES / "real" / "CR2_6247.dcm")
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_auto_routes_by_modality_and_body_part(stack: Stack) -> None:
    files = {
        name: (SAMPLES / "real" / name).read_bytes()
        for name in ("J2K_pixelrep_mismatch.dcm", "examples_rgb_color.dcm", "CR3_6278.dcm", "MR_small.dcm")
    }
    files["chest.dcm"] = _chest_cr()
    for broken in ("MR_small_cut_in_pixels.dcm", "structured_report_no_image.dcm"):
        files[broken] = (SAMPLES / "broken" / broken).read_bytes()
    parts = [("files", (name, io.BytesIO(body))) for name, body in files.items()]
    response = stack.http.post("/v1/jobs", files=parts, data={"models": "auto"}, timeout=60)
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"], timeout=300)
    assert job["models"] == ["auto"]
    assert job["counts"]["done"] == 3 and job["counts"]["skipped"] == 3 and job["counts"]["failed"] == 1
    # Broken files are reported as broken whether or not a model applies to them.
    (failed,) = stack.client.instances(job["id"], "failed")
    assert failed["reason"] == "truncated pixel data: expected 8192 bytes, found 5330"

    skipped = {i["file_name"]: i["reason"] for i in stack.client.instances(job["id"], "skipped")}
    assert skipped["CR3_6278.dcm"].startswith("no model for CR CSPINE")
    assert skipped["MR_small.dcm"].startswith("no model for MR")
    assert skipped["structured_report_no_image.dcm"].startswith("no image: SR")

    expected = {
        "J2K_pixelrep_mismatch.dcm": ("headct-resnet18", 6),
        "examples_rgb_color.dcm": ("us-abdomen-smallcnn", 7),
        "chest.dcm": ("chexnet-densenet121", 14),
    }
    done = {i["file_name"]: i for i in stack.client.instances(job["id"], "done")}
    for name, (model, n_labels) in expected.items():
        study = stack.client.study_results(done[name]["study_instance_uid"])
        inst = next(i for s in study["series"] for i in s["instances"] if i["job_id"] == job["id"])
        (result,) = inst["results"]
        assert result["model"] == model and result["model_version"] == "0.1.0-random"
        assert len(result["outputs"]) == n_labels
        assert len(result["weights_sha256"]) == 64 and result["radq_version"]
        assert '"frame"' in result["preprocessing"]  # the recipe travels with the result
        card = read_card(BUNDLED_MODEL_DIR / model)
        autocast = Runtime(torch.device("cpu"), stack.settings.precision).autocast_for(card)
        assert result["precision"] == PRECISION_NAMES[autocast]  # as the worker computed it
        # Earlier jobs may have run other models on the same study: each has its own summary.
        summary = next(s for s in study["summary"] if s["model"] == model)
        assert summary["model_version"] == "0.1.0-random" and summary["aggregation"] == "max"
    us = next(
        i
        for s in stack.client.study_results(done["examples_rgb_color.dcm"]["study_instance_uid"])["series"]
        for i in s["instances"]
        if i["job_id"] == job["id"]
    )
    assert abs(sum(us["results"][0]["outputs"].values()) - 1.0) < 1e-3  # softmax card
