"""Re-submitting what was already processed infers nothing; --force infers again."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Instance, Result
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done

FILES = ("CT5N_2062.dcm", "CT5N_2392.dcm", "MR_small.dcm")


def _with_new_uid(source: Path, target: Path, uid: str | None = None) -> None:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()  # nor do they join other tests' studies
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)


def _results(stack: Stack, job_id: str) -> list[Result]:
    with stack.sessions() as session:
        query = select(Result).join(Instance).where(Instance.job_id == job_id)
        return list(session.scalars(query.order_by(Result.id)))


def _paths(stack: Stack, paths: list[str], **extra: object) -> dict[str, object]:
    response = stack.http.post("/v1/jobs", json={"paths": paths, **extra})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def test_resubmission_is_all_skipped_with_results_linked(stack: Stack) -> None:
    folder = stack.archive / f"dedup-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for name in FILES:
        # New SOPInstanceUIDs: results of the same samples from earlier tests in this
        # session's database must not count as duplicates of the first submission.
        _with_new_uid(SAMPLES / "real" / name, folder / name)
    first = wait_done(stack.client, _paths(stack, [str(folder)], force=False)["id"])
    assert first["counts"]["done"] == 3
    originals = {r.instance_id: r for r in _results(stack, first["id"])}

    # The same content again, once by path and once uploaded: nothing is inferred.
    upload = stack.client.http.post(
        "/v1/jobs", data={"force": "false"}, files=[("files", (n, (folder / n).read_bytes())) for n in FILES]
    ).json()
    for job in (_paths(stack, [str(folder)], force=False), upload):
        again = wait_done(stack.client, job["id"])
        assert again["counts"]["skipped"] == 3 and again["counts"]["done"] == 0
        reused = _results(stack, again["id"])
        assert len(reused) == 3
        assert {r.reused_from for r in reused} == {r.id for r in originals.values()}
        assert all(r.outputs == next(o for o in originals.values() if o.id == r.reused_from).outputs
                   for r in reused)  # fmt: skip
        for inst in stack.client.instances(again["id"], "skipped"):
            assert inst["reason"].startswith("already processed: same SOPInstanceUID and content")

    # Different bytes under the same SOPInstanceUID are not a duplicate.
    uid = pydicom.dcmread(folder / "MR_small.dcm").SOPInstanceUID
    _with_new_uid(SAMPLES / "real" / "MR_small_padded.dcm", folder / "MR_small.dcm", uid)
    changed = wait_done(stack.client, _paths(stack, [str(folder / "MR_small.dcm")], force=False)["id"])
    assert changed["counts"]["done"] == 1

    forced = wait_done(stack.client, _paths(stack, [str(folder)], force=True)["id"])
    assert forced["options"] == {"dedup": False} and forced["counts"]["done"] == 3
    assert all(r.reused_from is None for r in _results(stack, forced["id"]))


def test_files_without_a_cheap_key_are_still_deduplicated(stack: Stack) -> None:
    """A bare dataset (no preamble or file meta) has no light content key: it is inspected in
    full, as every instance was before, and its resubmission is still reused."""
    folder = stack.archive / f"dedup-bare-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    _with_new_uid(SAMPLES / "real" / "CT_small.dcm", folder / "full.dcm")
    data = (folder / "full.dcm").read_bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000)'s value: the data set
    (folder / "bare.dcm").write_bytes(data[meta_end:])
    (folder / "full.dcm").unlink()
    assert (folder / "bare.dcm").read_bytes()[128:132] != b"DICM"
    first = wait_done(stack.client, _paths(stack, [str(folder)], force=False)["id"])
    assert first["counts"]["done"] == 1, first["counts"]
    again = wait_done(stack.client, _paths(stack, [str(folder)], force=False)["id"])
    assert again["counts"]["skipped"] == 1 and again["counts"]["done"] == 0
    (inst,) = stack.client.instances(again["id"], "skipped")
    assert inst["reason"].startswith("already processed: same SOPInstanceUID and content")
