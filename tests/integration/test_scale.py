"""A few hundred generated instances across several studies, on both databases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done

STUDIES = 6
SLICES = 50


def _generate(root: Path) -> dict[str, int]:
    """Write STUDIES x SLICES CT slices (real CT_small header, new UIDs and pixels)."""
    template = pydicom.dcmread(SAMPLES / "real" / "CT_small.dcm")
    rng = np.random.default_rng(7)
    per_study: dict[str, int] = {}
    for s in range(STUDIES):
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = root / f"study{s}"
        folder.mkdir(parents=True)
        for i in range(SLICES):
            ds = template.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.PixelData = rng.integers(-1000, 1500, (128, 128), dtype=np.int16).tobytes()
            ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
        per_study[study_uid] = SLICES
    return per_study


def test_hundreds_of_instances_across_studies(stack: Stack) -> None:
    root = stack.archive / f"scale-{stack.settings.queue}"
    expected = _generate(root)
    response = stack.http.post("/v1/jobs", json={"paths": [str(root)]}, timeout=60)
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, response.json()["id"], timeout=600)

    total = STUDIES * SLICES
    assert job["counts"] == {
        "total": total, "pending": 0, "queued": 0, "processing": 0,
        "done": total, "failed": 0, "skipped": 0,
    }
    assert {s["study_instance_uid"]: s["instances"] for s in job["studies"]} == expected
    for study_uid in expected:
        study = stack.client.study_results(study_uid)
        instances = [i for series in study["series"] for i in series["instances"]]
        assert len(instances) == SLICES
        assert len({i["sop_instance_uid"] for i in instances}) == SLICES
        assert all(len(i["results"]) == 1 for i in instances)
        assert study["summary"][0]["instances"] == SLICES
